"""A whole run on the fake server where one variant is clearly better: summary.json, report.html, JUnit."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai import FakeOpenAI  # noqa: E402

import simbench.cli  # noqa: E402
from simbench.reports.stats import wilson_interval  # noqa: E402

GOOD_MARK = "GOOD-TUTOR"
XSS = '<script>alert(1)</script></script><img src=x onerror=alert(2)></textarea>{{ x }}'


def good_or_bad_tutor(request: dict) -> str:
    """The tutor answers well only under the ``clear`` variant's system prompt; it echoes untrusted text."""
    system = request["messages"][0]["content"]
    mark = GOOD_MARK if "Explain clearly" in system else "BAD-TUTOR"
    return f"{mark}: let us look at it. {XSS}"


def judge_by_transcript(prompt: str, labels: list[str]) -> str:
    """Pass (the first label is the passing one for every built-in judge) only when the tutor was good."""
    return labels[0] if GOOD_MARK in prompt else labels[1]


def matrix(base_url: str, **overrides) -> dict:
    m = {
        "name": "stats-matrix",
        "models": {"fake": {"base_url": base_url, "model": "fake-model", "max_retries": 0, "timeout": 20}},
        "tutor": {
            "model": "fake", "baseline": "vague", "max_tokens": 64,
            "variants": {"vague": "You are a tutor for {{ topic.name }}. Be vague.",
                         "clear": "You are a tutor for {{ topic.name }}. Explain clearly."},
        },
        "student": {"model": "fake", "max_tokens": 64},
        "judges": {"model": "fake", "use": ["coherence", "goal_completion", "correctness"], "max_tokens": 64},
        # No reference answer: correctness is skipped everywhere and cannot be compared.
        "topics": [{"name": "adding fractions", "opening": f"Why isn't 1/2 + 1/3 = 2/5? {XSS}",
                    "goal": "The student can add fractions."}],
        "personas": ["impatient", "confused_novice", "overconfident"],
        "repeats": 4,
        "max_turns": 1,
        "concurrency": 8,
        "gates": {"coherence": 0.5},
    }
    m.update(overrides)
    return m


def invoke(*args):
    result = CliRunner().invoke(simbench.cli.cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One run shared by the tests of this module (24 sessions, 48 judgements): (run dir, run result)."""
    tmp = tmp_path_factory.mktemp("stats-run")
    with FakeOpenAI(tutor=good_or_bad_tutor, judge_label=judge_by_transcript) as fake:
        path = tmp / "matrix.yaml"
        path.write_text(yaml.safe_dump(matrix(fake.base_url), sort_keys=False), encoding="utf-8")
        out = tmp / "run"
        result = invoke("run", path, "--out", out, "-q", "--no-cache", "--junit", tmp / "junit.xml")
    return out, result


def test_run_exits_1_on_the_gate_and_names_variant_and_dimension(finished_run):
    out, result = finished_run
    assert result.exit_code == 1, result.output
    assert "gate failed: coherence / vague" in result.output
    assert "clear" not in " ".join(line for line in result.output.splitlines() if line.startswith("gate failed"))


def test_run_prints_a_verdict_per_variant_and_dimension(finished_run):
    _, result = finished_run
    verdicts = [line.strip() for line in result.output.splitlines() if line.strip().startswith("clear vs vague / ")]
    assert len(verdicts) == 3, result.output
    assert any(v.startswith("clear vs vague / coherence:") and "better" in v for v in verdicts), verdicts


def test_report_rebuild_exits_1_when_a_gate_of_the_matrix_fails(finished_run):
    out, _ = finished_run
    result = invoke("report", out)
    assert result.exit_code == 1, result.output
    assert "gate failed: coherence / vague" in result.output


def test_summary_says_the_clear_variant_is_better(finished_run):
    out, _ = finished_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary_version"] == 2
    assert summary["variants"] == ["vague", "clear"] and summary["baseline"] == "vague"
    assert summary["sessions"]["planned"] == summary["sessions"]["completed"] == 24

    for dim in ("coherence", "goal_completion"):
        c = summary["comparisons"]["clear"][dim]
        assert (c["n"], c["b"], c["c"], c["dropped"]) == (12, 0, 12, 0)
        assert c["diff"] == 1.0 and c["ci"][0] > 0.5
        assert c["p"] == pytest.approx(2 * 0.5**12)
        assert c["p_holm"] == pytest.approx(2 * 2 * 0.5**12, rel=1e-3)  # two tests in the family
        assert c["verdict"] == "better"
    skipped = summary["comparisons"]["clear"]["correctness"]
    assert skipped["n"] == 0 and skipped["dropped"] == 12 and skipped["verdict"] == "not compared"

    # Rates with intervals in every breakdown.
    coherence = summary["dimensions"]["coherence"]
    assert coherence["by_variant"]["clear"]["pass_rate"] == 1.0
    assert coherence["by_variant"]["vague"]["fail_ci"][1] == 1.0
    assert coherence["overall"]["pass_ci"] == [pytest.approx(x, abs=1e-4) for x in wilson_interval(12, 24)]
    assert set(coherence["by_persona"]["impatient"]) >= {"pass", "fail", "error", "skipped", "judged", "fail_rate",
                                                         "pass_rate", "pass_ci", "fail_ci"}
    assert summary["dimensions"]["correctness"]["overall"]["skipped"] == 24

    # pass^j: the clear tutor passes every repeat, the vague one none.
    assert [e["pass_j"] for e in summary["consistency"]["clear"]["coherence"]] == [1.0, 1.0, 1.0, 1.0]
    assert [e["pass_j"] for e in summary["consistency"]["vague"]["coherence"]] == [0.0, 0.0, 0.0, 0.0]
    assert summary["consistency"]["clear"]["coherence"][3]["cells"] == 3

    checks = {(c["dimension"], c["variant"]): c["passed"] for c in summary["gates"]["checks"]}
    assert checks == {("coherence", "vague"): False, ("coherence", "clear"): True}


def _junit_cases(path: Path) -> dict[tuple[str, str], ET.Element]:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    cases = root.findall("./testsuite/testcase")
    return {(c.get("classname").rsplit(".", 1)[1], c.get("name")): c for c in cases}


def test_junit_has_one_case_per_variant_and_dimension_failing_on_the_gate(finished_run):
    out, result = finished_run
    path = out.parent / "junit.xml"
    assert str(path) in result.output
    cases = _junit_cases(path)
    assert len(cases) == 2 * 3
    failing = {key for key, case in cases.items() if case.find("failure") is not None}
    assert failing == {("vague", "coherence")}
    failure = cases[("vague", "coherence")].find("failure")
    assert "coherence / vague" in failure.get("message") and "0.00 < gate 0.50" in failure.get("message")
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite.get("tests") == "6" and suite.get("failures") == "1"


def test_report_command_writes_junit_too(finished_run, tmp_path):
    out, _ = finished_run
    result = invoke("report", out, "--junit", tmp_path / "again.xml")
    assert result.exit_code == 1, result.output  # the gate still fails
    failing = {k for k, c in _junit_cases(tmp_path / "again.xml").items() if c.find("failure") is not None}
    assert failing == {("vague", "coherence")}


def test_report_shows_verdicts_heatmaps_and_plots(finished_run):
    out, _ = finished_run
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'class="verdict better">better<' in html
    assert "no pair was judged on both sides" in html  # correctness: not compared
    assert html.count("<svg") >= 3  # pass rates, turns, one forest plot per comparison
    assert "Failure rate by persona × dimension" in html and "Failure rate by topic × dimension" in html
    assert "pass^4" in html
    # Every in-page link has its target; heatmap cells link to their sessions.
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    links = set(re.findall(r'href="#([^"]+)"', html))
    filters = {link for link in links if link.startswith("filter?")}  # filtered views, set by the script
    assert links - filters and links - filters <= ids
    assert "filter?variant=clear&amp;dim=coherence&amp;label=%40fail" in filters
    assert any(link.startswith("d-persona-") for link in links)
    # Sessions are grouped by pair key with the baseline first and the variant beside it.
    first_group = html[html.index('<details class="pair"'):]
    first_group = first_group[:first_group.index("</details>")]
    assert first_group.index('data-variant="vague"') < first_group.index('data-variant="clear"')


def test_report_stays_inert_with_untrusted_text(finished_run):
    out, _ = finished_run
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "BAD-TUTOR" in html
    assert not re.search(r"<img\b", html)
    assert not re.search(r"<[a-zA-Z][^>]*\son[a-z]+\s*=", html)  # no element carries an inline event handler
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;&lt;/textarea&gt;" in html
    assert "</textarea>" not in html
    assert html.count("<script") == 1  # our own, at the end

    # The CSP allows exactly that script by its hash, forbids everything else, and nothing loads from outside.
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";")[0]
    assert not re.search(r'(src|href|action)="(https?:)?//', html)


# -- a real browser -------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")


def _dump_dom(tmp_path: Path, url: str) -> tuple[str, str]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def test_filters_run_in_chromium_under_the_csp(finished_run, tmp_path):
    out, _ = finished_run
    url = (out / "report.html").resolve().as_uri() + "#filter?variant=clear&dim=coherence&label=%40pass"
    dom, log = _dump_dom(tmp_path, url)
    assert "Refused to" not in log and "Content Security Policy" not in log  # our script is allowed, nothing blocked
    assert '<form id="filters">' in dom  # the script ran: it shows the filters
    articles = re.findall(r'<article class="session"[^>]*>', dom)
    assert len(articles) == 24
    shown = [a for a in articles if "hidden" not in a]
    assert len(shown) == 12 and all('data-variant="clear"' in a for a in shown)
    assert "12 session(s) shown" in dom
