"""report.html in a real headless Chromium (Playwright driving Debian's /usr/bin/chromium).

A two-variant run against the fake OpenAI server, in which ``direct`` is clearly more coherent than
the baseline ``socratic`` and the tutor and judge answer with hostile markup, is opened twice: as
written (every session in the page) and rendered lazily (sessions as JSON, drawn by the script).
A generated run of 1,000 sessions checks the paging of a large report. Every page must load with
no console error, no request but the file itself and no dialog, and show the numbers of
summary.json. Without Chromium or the ``playwright`` package these tests skip, or fail when
SIMBENCH_REQUIRE_CHROMIUM=1 (as in CI).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import RecordingFake, base_matrix, run_cli
from fake_openai import judge_name

from simbench.evaluators.sessions import rebuild_sessions
from simbench.reports.html import LAZY_THRESHOLD, PAGE_SIZE, script_json, write_report
from simbench.store import RunStore
from simbench.tracing.local import spans_dataframe

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "benchmarks" / "screenshots" / "report.png"

# Tutor and judge text that would run if the report ever parsed model text as HTML.
HOSTILE_TUTOR = ('<script>alert("xss-script")</script> </script><script>alert("xss-close")</script> '
                 '<img src=x onerror=alert("xss-img")> </textarea><textarea>alert("xss-textarea")</textarea> '
                 '<b>not bold</b>')
HOSTILE_JUDGE = "<img src=x onerror=alert('xss-judge')> </script><script>alert('xss-judge-script')</script>"
# One unbroken 300-character token, as a small judge writes when it loops ("14:22:53.232.232..."):
# it must wrap inside its session, not widen the page.
LONG_TOKEN = "14:22:53" + ".232" * 73
SOCRATIC_MARK = "What do you think the common denominator is?"
DIRECT_MARK = "Here is the method: rewrite both fractions over 6."
HARD_TOPIC = "percent <b>&</b> ratios"
PASS_FAIL = {"coherence": ("coherent", "incoherent"), "correctness": ("correct", "incorrect")}


# -- the browser ------------------------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if os.environ.get("SIMBENCH_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"{reason} and SIMBENCH_REQUIRE_CHROMIUM=1")
    pytest.skip(f"{reason} (set SIMBENCH_REQUIRE_CHROMIUM=1 to make this a failure)")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A page of the report with everything it logged, requested and tried to show in a dialog."""

    def __init__(self, browser, path: Path, viewport=(1280, 1000)):
        self.url = path.resolve().as_uri()
        self.console: list[tuple[str, str]] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e))))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", self._dialog)
        self.page.goto(self.url, wait_until="load", timeout=120_000)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def assert_clean(self) -> None:
        """No console message (errors, CSP violations, warnings), no request but the file, no dialog."""
        assert self.console == [], self.console
        assert [u for u in self.requests if u.split("#")[0] != self.url] == [], self.requests
        assert self.dialogs == [], f"model text ran: {self.dialogs}"

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(browser):
    pages: list[Page] = []

    def open_(path: Path, **kwargs: Any) -> Page:
        page = Page(browser, path, **kwargs)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.assert_clean()  # whatever a test clicked, nothing may have run or been fetched
        page.close()


# -- the fixture runs -------------------------------------------------------------------------------


def _tutor(request: dict) -> str:
    system = request["messages"][0]["content"]
    turn = sum(1 for m in request["messages"] if m["role"] == "assistant") + 1
    text = SOCRATIC_MARK if "patient tutor" in system else DIRECT_MARK
    return f"Turn {turn}. {text}" + (f" {HOSTILE_TUTOR}" if turn == 2 else "")


def _judge(prompt: str, labels: list[str]) -> str:
    """coherence fails every socratic session; correctness fails every session of the hard topic."""
    name = judge_name(prompt)
    good, bad = PASS_FAIL[name]
    failed = SOCRATIC_MARK in prompt if name == "coherence" else "2/3 of 9" in prompt
    return json.dumps({"explanation": f"{name} judged. {HOSTILE_JUDGE} {LONG_TOKEN}", "label": bad if failed else good})


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """A finished two-variant run (24 sessions) and a lazily rendered copy of its report."""
    tmp = tmp_path_factory.mktemp("browser-run")
    with pytest.MonkeyPatch.context() as mp, RecordingFake(latency=0, tutor=_tutor, judge_reply=_judge) as fake:
        mp.setenv("SIMBENCH_CACHE", str(tmp / "cache.sqlite"))
        mp.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))
        matrix = base_matrix(fake.base_url, max_turns=2, repeats=2,
                             personas=["impatient", "terse", "confused_novice"])
        matrix["topics"].append({"name": HARD_TOPIC, "opening": "What is 2/3 of 9?",
                                 "reference": "2/3 of 9 is 6.", "goal": "The student can take a fraction of a number."})
        path = tmp / "matrix.yaml"
        path.write_text(yaml.safe_dump(matrix, sort_keys=False), encoding="utf-8")
        out = tmp / "run"
        result = run_cli(path, out, "--cache", tmp / "cache.sqlite")
    assert result.exit_code == 0, result.output
    return {"dir": out, **_both_reports(out)}


def _both_reports(out: Path) -> dict:
    """The run's summary, its report as written, and a lazily rendered copy."""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    store = RunStore.open_run_dir(out)
    try:
        lazy = write_report(store, summary, out, embedded=False, lazy=True, path=out / "report-lazy.html")
    finally:
        store.close()
    return {"summary": summary, "inline": out / "report.html", "lazy": lazy}


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("report_scale", ROOT / "benchmarks" / "report_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def large_run(tmp_path_factory):
    """1,000 generated sessions (2 variants x 10 topics x 10 personas x 5 repeats) x 4 judges."""
    bench = _load_benchmark()
    out = tmp_path_factory.mktemp("large-run")
    bench.build_run(out, topics=10, personas=10, repeats=5, judges=4, seed=1)
    bench.build_report(out)
    store = RunStore.open_run_dir(out)
    try:
        run_id = store.run()["run_id"]
        transcripts = {t.session_id: [m.content for m in t.messages]
                       for t in rebuild_sessions(spans_dataframe(store, f"{run_id}/"))}
    finally:
        store.close()
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {"dir": out, "report": out / "report.html", "summary": summary, "transcripts": transcripts}


# -- helpers ----------------------------------------------------------------------------------------


def pct(v):
    return "–" if v is None else f"{100 * v:.0f}%"


def points(v):
    return "–" if v is None else f"{100 * v:+.0f}"


VISIBLE_SESSIONS = """() => Array.from(document.querySelectorAll('#sessions article.session'))
  .filter(a => !a.hidden && !a.closest('details.pair').hidden)
  .map(a => ({anchor: a.id, variant: a.dataset.variant, persona: a.dataset.persona, topic: a.dataset.topic,
              labels: a.dataset.labels.split(' '), session: a.querySelector('code').textContent,
              messages: Array.from(a.querySelectorAll('.msg')).map(m => m.lastChild.textContent)}))"""

OPEN_PAGE_GROUPS = """() => { document.querySelectorAll('#session-list details.pair').forEach(d => { d.open = true; }); }"""
PAGE_GROUPS_BUILT = """() => Array.from(document.querySelectorAll('#session-list details.pair'))
  .every(d => d.querySelector('article.session'))"""


def visible_sessions(p: Page) -> list[dict]:
    """The sessions the list shows under the current filters; in a lazy report, every page is opened."""
    page = p.page
    if page.locator("#session-list").count() == 0:
        return page.evaluate(VISIBLE_SESSIONS)
    out: list[dict] = []
    first = page.locator("nav.pager >> nth=0 >> button[data-page=first]")
    if not first.is_disabled():
        first.click()
    while True:
        page.evaluate(OPEN_PAGE_GROUPS)
        page.wait_for_function(PAGE_GROUPS_BUILT)
        out += page.evaluate(VISIBLE_SESSIONS)
        next_button = page.locator("nav.pager >> nth=0 >> button[data-page=next]")
        if next_button.is_disabled():
            return out
        next_button.click()


def heatmaps(p: Page) -> list[dict]:
    return p.page.evaluate("""() => Array.from(document.querySelectorAll('#heatmaps table.heatmap')).map(t => {
      const rows = Array.from(t.rows);
      const dims = Array.from(rows[0].cells).slice(1).map(c => c.textContent.trim());
      return {dims, rows: rows.slice(1).map(r => ({name: r.cells[0].textContent.trim(),
        cells: Array.from(r.cells).slice(1).map(c => c.textContent.replace(/\\s+/g, ' ').trim())}))};
    })""")


def comparison_rows(p: Page) -> list[list[str]]:
    return p.page.evaluate("""() => Array.from(document.querySelectorAll('#verdicts table.comparisons tr')).slice(1)
      .map(r => Array.from(r.cells).map(c => c.textContent.replace(/\\s+/g, ' ').trim()))""")


MODES = ["inline", "lazy"]


# -- the fixture run, as written and rendered lazily ------------------------------------------------


def test_session_json_cannot_close_its_script_block():
    text = "</script><!-- <script>alert(1)</script> & \u2028 \u2029 </SCRIPT >"
    encoded = str(script_json({"m": [["tutor", text]]}))
    assert not set("<>&\u2028\u2029") & set(encoded)
    assert json.loads(encoded) == {"m": [["tutor", text]]}


def test_fixture_reports_are_written_in_both_modes(fixture_run):
    inline = fixture_run["inline"].read_text(encoding="utf-8")
    lazy = fixture_run["lazy"].read_text(encoding="utf-8")
    assert fixture_run["summary"]["sessions"]["completed"] == 24 <= LAZY_THRESHOLD
    assert 'id="session-data"' not in inline and inline.count('<article class="session"') == 24
    assert 'id="session-data"' in lazy and '<article class="session"' not in lazy
    # The JSON block holds the hostile text with no "<" at all: nothing in it can close the script.
    block = lazy.split('<script type="application/json" id="session-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in block and ">" not in block and "&" not in block
    assert "\\u003c/script\\u003e" in block
    data = json.loads(block)
    assert len(data["sessions"]) == 24 and any(HOSTILE_TUTOR in m[1] for s in data["sessions"] for m in s["m"])


@pytest.mark.parametrize("mode", MODES)
def test_page_loads_clean_and_shows_the_summary_numbers(browser, fixture_run, open_page, mode):
    p = open_page(fixture_run[mode])
    summary = fixture_run["summary"]
    assert p.page.title().startswith("simbench: test-matrix")
    p.assert_clean()

    # Heatmaps: persona, topic and variant x dimension, each cell the failure rate and its counts.
    tables = heatmaps(p)
    assert len(tables) == 3
    dims = list(summary["dimensions"])
    for table, key in zip(tables, ("by_persona", "by_topic", "by_variant")):
        assert table["dims"] == dims
        names = [r["name"] for r in table["rows"]]
        assert sorted(names) == sorted(summary["dimensions"][dims[0]][key])
        for row in table["rows"]:
            for dim, text in zip(dims, row["cells"]):
                c = summary["dimensions"][dim][key][row["name"]]
                assert text.startswith(pct(c["fail_rate"])), (key, row["name"], dim, text)
                assert f"{c['fail']} fail / {c['judged']} judged" in text
                assert f"95% CI {pct(c['fail_ci'][0])}–{pct(c['fail_ci'][1])}" in text
    by_variant = {r["name"]: r["cells"] for r in tables[2]["rows"]}
    assert by_variant["socratic"][dims.index("coherence")].startswith("100%")
    assert by_variant["direct"][dims.index("coherence")].startswith("0%")

    # The comparison: direct against the baseline, per dimension, as summary.json has it.
    rows = comparison_rows(p)
    expected = summary["comparisons"]["direct"]
    assert [(r[0], r[1]) for r in rows] == [("direct", dim) for dim in expected]
    for r in rows:
        c = expected[r[1]]
        assert r[2] == pct(c["baseline_pass_rate"]) and r[3] == pct(c["variant_pass_rate"])
        assert r[4].startswith(f"{points(c['diff'])} [{points(c['ci'][0])}, {points(c['ci'][1])}]")
        assert r[5] == f"{c['b']} / {c['c']}"
        assert r[6].startswith(str(c["n"]))
        assert r[9].startswith(c["verdict"]) and c["statement"] in r[9]
    verdicts = {r[1]: expected[r[1]]["verdict"] for r in rows}
    assert verdicts == {"coherence": "better", "correctness": "no detectable difference"}
    assert expected["coherence"]["c"] == 12 and expected["coherence"]["b"] == 0


def test_screenshot_of_the_first_screen(browser, fixture_run, open_page, tmp_path):
    p = open_page(fixture_run["inline"], viewport=(1280, 900))
    shot = tmp_path / "report.png"
    p.page.screenshot(path=str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 1_000_000, len(data)
    if os.environ.get("SIMBENCH_SAVE_SCREENSHOT") == "1":  # refresh the one kept in the repo on demand
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


@pytest.mark.parametrize("mode", MODES)
def test_filters_narrow_the_session_list(browser, fixture_run, open_page, mode):
    p = open_page(fixture_run[mode])
    page = p.page
    everything = visible_sessions(p)
    assert len(everything) == 24
    assert page.inner_text("#filter-count") == "24 session(s) shown"

    page.select_option("#filters select[name=variant]", "direct")
    shown = visible_sessions(p)
    assert len(shown) == 12 and {s["variant"] for s in shown} == {"direct"}
    assert page.inner_text("#filter-count") == "12 session(s) shown"

    # A label filter: coherence failed, any variant -> exactly the baseline's sessions.
    page.select_option("#filters select[name=variant]", "")
    page.select_option("#filters select[name=dim]", "coherence")
    page.select_option("#filters select[name=label]", "@fail")
    shown = visible_sessions(p)
    assert len(shown) == 12 and {s["variant"] for s in shown} == {"socratic"}
    assert all("coherence:@fail" in s["labels"] for s in shown)

    # A judge's own label, with the hostile topic as a second filter.
    page.select_option("#filters select[name=label]", "incorrect")
    page.select_option("#filters select[name=dim]", "")
    page.select_option("#filters select[name=topic]", HARD_TOPIC)
    shown = visible_sessions(p)
    assert len(shown) == 12 and {s["topic"] for s in shown} == {HARD_TOPIC}

    page.click("#filters button[type=reset]")
    page.wait_for_function("() => document.getElementById('filter-count').textContent === '24 session(s) shown'")
    assert len(visible_sessions(p)) == 24

    # The links under a verdict open the failed sessions of one side, filtered.
    page.click("#verdicts table.comparisons a:has(bdi:text-is('socratic')) >> nth=0")
    page.wait_for_function("() => document.getElementById('filter-count').textContent === '12 session(s) shown'")
    assert page.eval_on_selector("#filters select[name=variant]", "s => s.value") == "socratic"
    assert {s["variant"] for s in visible_sessions(p)} == {"socratic"}


@pytest.mark.parametrize("mode", MODES)
def test_heatmap_cell_drills_down_to_a_transcript(browser, fixture_run, open_page, mode):
    p = open_page(fixture_run[mode])
    page = p.page
    # persona x coherence: its first listed session failed coherence (failures first).
    cell = page.locator("#heatmaps table.heatmap >> nth=0").locator("td.heat a").first
    persona = page.locator("#heatmaps table.heatmap >> nth=0").locator("td.name").first.inner_text()
    cell.click()
    drill = page.locator("details.drill[open]")
    drill.first.wait_for(state="attached")  # the report opens it on hashchange, which fires after the click
    assert drill.count() == 1 and persona in drill.locator("summary").inner_text()
    link = drill.locator("ul.drill-list a").first
    anchor = link.get_attribute("href")[1:]
    link.click()
    article = page.locator(f"article#{anchor}")
    article.wait_for(state="visible")
    assert article.get_attribute("data-persona") == persona
    assert "coherence:@fail" in article.get_attribute("data-labels").split(" ")
    messages = article.locator(".msg")
    assert messages.count() >= 4
    assert messages.first.locator(".who").inner_text() == "student"
    assert "coherence" in article.locator("table").inner_text()


@pytest.mark.parametrize("mode", MODES)
def test_hostile_model_text_stays_inert(browser, fixture_run, open_page, mode):
    p = open_page(fixture_run[mode])
    page = p.page
    sessions = visible_sessions(p)  # opens every group: every transcript is in the DOM now
    assert len(sessions) == 24
    assert sum(HOSTILE_TUTOR in m for s in sessions for m in s["messages"]) == 24
    counts = page.evaluate("""() => ({
      img: document.querySelectorAll('img').length,
      textarea: document.querySelectorAll('textarea').length,
      bold: document.querySelectorAll('.msg b').length,
      scripts: Array.from(document.scripts).map(s => s.type || 'text/javascript'),
      judge: Array.from(document.querySelectorAll('article.session td.name')).filter(td => td.textContent.includes("onerror=alert('xss-judge')")).length,
    })""")
    assert counts["img"] == 0 and counts["textarea"] == 0 and counts["bold"] == 0
    assert counts["scripts"] == (["text/javascript"] if mode == "inline" else ["application/json", "text/javascript"])
    assert counts["judge"] >= 24
    # The hostile topic name is text in the filters and headings, not markup.
    assert HARD_TOPIC in page.inner_text("#heatmaps")
    assert page.locator(f"#filters select[name=topic] option[value='{HARD_TOPIC}']").count() == 1
    p.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_a_long_unbroken_token_wraps_inside_its_session(browser, fixture_run, open_page, mode):
    p = open_page(fixture_run[mode])
    assert len(visible_sessions(p)) == 24  # opens every group: every transcript is in the DOM now
    widths = p.page.evaluate(f"""() => ({{
      long: Array.from(document.querySelectorAll('article.session td.name')).filter(td => td.textContent.includes({LONG_TOKEN!r})).length,
      page: [document.documentElement.scrollWidth, document.documentElement.clientWidth],
      sessions: Array.from(document.querySelectorAll('article.session')).map(a => [a.scrollWidth, a.clientWidth]),
      // the judge's name and its label stay whole: one line box each, not broken to make room
      broken: Array.from(document.querySelectorAll('article.session tr')).flatMap(tr => Array.from(tr.cells).slice(0, 2))
        .filter(td => {{
          const tops = new Set(), walk = document.createTreeWalker(td, NodeFilter.SHOW_TEXT);
          for (let n = walk.nextNode(); n; n = walk.nextNode()) {{
            const r = document.createRange(); r.selectNodeContents(n);
            for (const box of r.getClientRects()) tops.add(Math.round(box.top));
          }}
          return tops.size > 1;
        }})
        .map(td => td.textContent),
    }})""")
    assert widths["long"] >= 24 and widths["broken"] == []
    assert widths["page"][0] <= widths["page"][1], widths["page"]
    overflowing = [w for w in widths["sessions"] if w[0] > w[1] + 1]
    assert len(widths["sessions"]) == 24 and not overflowing, overflowing
    p.assert_clean()


# -- a large run: paging, opening, jumping ----------------------------------------------------------


def test_large_run_is_rendered_lazily(browser, large_run, open_page):
    html = large_run["report"].read_text(encoding="utf-8")
    assert 'id="session-data"' in html and "<article" not in html
    summary = large_run["summary"]
    assert summary["sessions"]["planned"] == 1000
    groups = 500  # 1,000 sessions, two variants per pair key
    pages = math.ceil(groups / PAGE_SIZE)

    p = open_page(large_run["report"])
    page = p.page
    info = page.locator("nav.pager >> nth=0 >> .page-info")
    assert info.inner_text() == f"pair groups 1–{PAGE_SIZE} of {groups} · page 1 of {pages}"
    assert page.inner_text("#filter-count") == "1000 session(s) shown"
    assert page.locator("#session-list details.pair").count() == PAGE_SIZE
    assert page.locator("#session-list article.session").count() == 0  # nothing drawn before it is opened
    assert page.locator("nav.pager >> nth=0 >> button[data-page=prev]").is_disabled()

    page.click("nav.pager >> nth=0 >> button[data-page=next]")
    page.click("nav.pager >> nth=1 >> button[data-page=next]")
    assert info.inner_text().endswith(f"page 3 of {pages}")
    group = page.locator("#session-list details.pair").first
    group.locator("summary").click()
    articles = group.locator("article.session")
    articles.first.wait_for(state="visible")
    assert articles.count() == 2
    for shown in page.evaluate(VISIBLE_SESSIONS):
        assert shown["messages"] == large_run["transcripts"][shown["session"]]
        assert len(shown["messages"]) >= 1

    page.click("nav.pager >> nth=0 >> button[data-page=last]")
    assert info.inner_text() == f"pair groups {(pages - 1) * PAGE_SIZE + 1}–{groups} of {groups} · page {pages} of {pages}"
    assert page.locator("nav.pager >> nth=0 >> button[data-page=next]").is_disabled()

    # Filters search every session, not only the page shown.
    page.select_option("#filters select[name=variant]", "direct")
    page.select_option("#filters select[name=dim]", "coherence")
    page.select_option("#filters select[name=label]", "@fail")
    fails = summary["dimensions"]["coherence"]["by_variant"]["direct"]["fail"]
    assert page.inner_text("#filter-count") == f"{fails} session(s) shown"
    assert info.inner_text().endswith(f"page 1 of {math.ceil(fails / PAGE_SIZE)}")
    shown = visible_sessions(p)
    assert len(shown) == fails and {s["variant"] for s in shown} == {"direct"}
    assert all("coherence:@fail" in s["labels"] for s in shown)


def test_large_run_links_jump_to_sessions_on_other_pages(browser, large_run, open_page):
    p = open_page(large_run["report"])
    page = p.page
    # A session far down the list, hidden by a filter: the link clears the filters and draws its page.
    target = page.evaluate("""() => {
      const data = JSON.parse(document.getElementById('session-data').textContent);
      const s = data.sessions[data.groups[data.groups.length - 3].s.slice(-1)[0]];
      return {anchor: s.a, id: s.id, variant: data.names.variant[s.v], variants: data.names.variant,
              groups: data.groups.length, messages: s.m.map(m => m[1])};
    }""")
    assert target["messages"] == large_run["transcripts"][target["id"]]
    other = next(v for v in target["variants"] if v != target["variant"])
    page.select_option("#filters select[name=variant]", other)
    page.evaluate(f"() => {{ location.hash = '#{target['anchor']}'; }}")
    article = page.locator(f"article#{target['anchor']}")
    article.wait_for(state="visible")
    assert article.locator("code").first.inner_text() == target["id"]
    assert article.locator(".msg").evaluate_all("ms => ms.map(m => m.lastChild.textContent)") == target["messages"]
    assert page.eval_on_selector("#filters select[name=variant]", "s => s.value") == ""
    pages = math.ceil(target["groups"] / PAGE_SIZE)
    assert page.inner_text("nav.pager >> nth=0 >> .page-info").endswith(f"page {pages} of {pages}")

    # A heatmap cell -> its drill list -> the last session it lists.
    page.click("#heatmaps table.heatmap >> nth=1 >> td.heat a >> nth=2")
    drill = page.locator("details.drill[open]")
    drill.first.wait_for(state="attached")  # opened on hashchange, after the click
    assert drill.count() == 1
    links = drill.locator("ul.drill-list a")
    assert links.count() == 20  # a large report lists 20 per cell and links to the filtered list for the rest
    anchor = links.last.get_attribute("href")[1:]
    links.last.click()
    article = page.locator(f"article#{anchor}")
    article.wait_for(state="visible")
    assert article.locator(".msg").count() >= 1
    session = article.locator("code").first.inner_text()
    assert article.locator(".msg").evaluate_all("ms => ms.map(m => m.lastChild.textContent)") \
        == large_run["transcripts"][session]


# -- judge samples: unstable judgements are marked and can be listed ---------------------------------


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    """Three imported sessions judged 3 times each: coherence of "a" unstable (2 of 3), "b" fails, "c" passes."""
    from test_judge_samples import _scripted_judge

    tmp = tmp_path_factory.mktemp("sampled-run")
    label = _scripted_judge()
    lines = [json.dumps({"session_id": m, "metadata": {"reference": "5/6"}, "messages": [
        {"role": "user", "content": "What is 1/2 + 1/3?"},
        {"role": "assistant", "content": f"<<{m}>> Use sixths."}]}) for m in "abc"]
    (tmp / "t.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with RecordingFake(latency=0, judge_label=label) as fake:
        (tmp / "m.yaml").write_text(yaml.safe_dump(base_matrix(fake.base_url)), encoding="utf-8")
        # In a process of its own: Playwright's sync API may already run an event loop in this one.
        result = subprocess.run(
            [sys.executable, "-m", "simbench", "judge", "--transcripts", str(tmp / "t.jsonl"), "--matrix",
             str(tmp / "m.yaml"), "--out", str(tmp / "run"), "-q", "--judge-samples", "3",
             "--cache", str(tmp / "cache.sqlite")],
            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return _both_reports(tmp / "run")


@pytest.mark.parametrize("mode", MODES)
def test_unstable_judgements_are_marked_and_listed(browser, sampled_run, open_page, mode):
    p = open_page(sampled_run[mode])
    page = p.page
    coherence_row = page.locator("#judge-consistency tr", has_text="coherence")
    assert coherence_row.locator("td").nth(4).inner_text() == "1"  # the unstable column: session a
    page.click("#judge-consistency a[href*='unstable']")
    page.wait_for_function("() => document.querySelector('#filters select[name=label]').value === '@unstable'")
    shown = visible_sessions(p)
    assert [s["messages"][1] for s in shown] == ["<<a>> Use sixths."]
    assert "coherence:@unstable" in shown[0]["labels"]
    assert page.eval_on_selector("#filters select[name=label]", "s => s.value") == "@unstable"
    if mode == "inline":
        assert "coherence: coherent (unstable)" in page.text_content(f"#{shown[0]['anchor']} header")


# -- tool calls under their reply ---------------------------------------------------------------------

HOSTILE_TOOL_RESULT = '5/6 <script>alert("xss-tool")</script> <img src=x onerror=alert("xss-tool-img")>'
TOOL_TUTOR = f"""
def reply(messages, context):
    calls = [{{"name": "calculator", "arguments": {{"expression": "1/2+1/3"}}, "result": {HOSTILE_TOOL_RESULT!r}}}]
    return {{"text": "Reply %d: use a common denominator." % context.turn, "tool_calls": calls if context.turn == 1 else []}}
"""


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    """A run of a callable tutor whose first reply of each session used a tool with a hostile result."""
    tmp = tmp_path_factory.mktemp("tool-run")
    (tmp / "tool_tutor_browser.py").write_text(TOOL_TUTOR, encoding="utf-8")
    with RecordingFake(latency=0) as fake:
        matrix = base_matrix(fake.base_url, judges={"model": "fake", "use": ["coherence"], "max_tokens": 64})
        matrix["tutor"] = {"kind": "callable", "callable": "tool_tutor_browser:reply", "baseline": "a",
                           "variants": {"a": {"settings": {}}, "b": {"settings": {}}}}
        (tmp / "matrix.yaml").write_text(yaml.safe_dump(matrix, sort_keys=False), encoding="utf-8")
        # In a process of its own: Playwright's sync API may already run an event loop in this one.
        result = subprocess.run([sys.executable, "-m", "simbench", "run", str(tmp / "matrix.yaml"), "--out",
                                 str(tmp / "run"), "-q", "--no-cache"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return _both_reports(tmp / "run")


TUTOR_REPLIES_AND_TOOLS = """() => Array.from(document.querySelectorAll('article.session .msg.tutor')).map(m => {
  const next = m.nextElementSibling;
  const tools = next && next.classList.contains('tool-calls') ? next : null;
  return {reply: m.lastChild.textContent,
          tools: tools ? Array.from(tools.querySelectorAll('.tool-call')).map(t => t.textContent) : []};
})"""


@pytest.mark.parametrize("mode", MODES)
def test_a_tool_call_shows_under_its_reply_as_text(browser, tool_run, open_page, mode):
    p = open_page(tool_run[mode])
    assert len(visible_sessions(p)) == 2  # opens every group: every transcript is in the DOM now
    replies = p.page.evaluate(TUTOR_REPLIES_AND_TOOLS)
    assert sorted(r["reply"] for r in replies) == ["Reply 1: use a common denominator."] * 2 + \
        ["Reply 2: use a common denominator."] * 2
    for r in replies:
        if r["reply"].startswith("Reply 1"):
            assert r["tools"] == ['tool calculator({"expression": "1/2+1/3"}) \u2192 ' + HOSTILE_TOOL_RESULT]
        else:
            assert r["tools"] == []
    counts = p.page.evaluate("""() => ({img: document.querySelectorAll('img').length,
      scripts: Array.from(document.scripts).map(s => s.type || 'text/javascript')})""")
    assert counts["img"] == 0
    assert counts["scripts"] == (["text/javascript"] if mode == "inline" else ["application/json", "text/javascript"])
    p.assert_clean()  # no dialog: the tool result's script never ran
