"""report.html: model text is escaped, the page is self-contained under a CSP, and a real browser
renders it without running anything a model wrote."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import base_matrix, run_cli

XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"
# Would leave a trace in the DOM if it ever ran (the report's own script never creates these).
DOM_MARKER = ('<script>document.body.appendChild(document.createElement("pwned-by-script"))</script>'
              '<img src=x onerror="document.body.appendChild(document.createElement(\'pwned-by-img\'))">')
JUDGE_XSS = "<script>alert(3)</script> looks fine"
TOPIC = "fractions & <i>friends</i>"


class _Elements(HTMLParser):
    """Every element (tag, attributes) and the text inside every <script>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def parse(html: str) -> _Elements:
    parser = _Elements()
    parser.feed(html)
    parser.close()
    return parser


@pytest.fixture
def hostile_run(make_fake, write_matrix, tmp_path, open_run):
    """A finished run whose tutor and judge answer with HTML and scripts."""

    def tutor(request: dict) -> str:
        turn = sum(1 for m in request["messages"] if m["role"] == "assistant") + 1
        return XSS if turn == 1 else DOM_MARKER

    def judge(prompt: str, labels: list[str]) -> str:
        return json.dumps({"explanation": JUDGE_XSS, "label": labels[-1]})

    fake = make_fake(tutor=tutor, judge_reply=judge)
    matrix = base_matrix(fake.base_url, max_turns=2, personas=["impatient", "terse"])
    matrix["topics"][0]["name"] = TOPIC
    out = tmp_path / "run"
    result = run_cli(write_matrix(matrix), out, "--cache", tmp_path / "c.sqlite")
    assert result.exit_code == 0, result.output
    run = open_run(out)
    return out, [s["session_id"] for s in run.sessions()]


def test_report_escapes_model_text(hostile_run):
    out, session_ids = hostile_run
    html = (out / "report.html").read_text(encoding="utf-8")
    assert len(session_ids) == 4
    for sid in session_ids:
        assert sid in html

    assert XSS not in html
    assert "<script>alert" not in html
    assert "<img src=x" not in html
    assert XSS_ESCAPED in html
    assert "pwned-by-script" in html  # shown, as text
    assert '<script>document.body' not in html
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in html  # the judge's explanation, escaped
    assert "<i>friends</i>" not in html and "fractions &amp; &lt;i&gt;friends&lt;/i&gt;" in html

    page = parse(html)
    assert not [a for t, a in page.elements if t == "img" and a.get("src") == "x"]
    assert not [t for t, _ in page.elements if t.startswith("pwned")]
    assert not any("alert(" in s or "pwned" in s for s in page.scripts)


def test_report_has_a_csp_and_loads_nothing_remote(hostile_run):
    out, _ = hostile_run
    html = (out / "report.html").read_text(encoding="utf-8")
    page = parse(html)
    csp = [a.get("content", "") for t, a in page.elements
           if t == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy"]
    assert len(csp) == 1, "exactly one Content-Security-Policy meta"
    policy = csp[0]
    assert "default-src 'none'" in policy
    assert "http:" not in policy and "https:" not in policy and "*" not in policy
    script_src = re.search(r"script-src([^;]*)", policy)
    assert script_src is None or "'unsafe-inline'" not in script_src.group(1)

    for tag, attrs in page.elements:
        for name in ("src", "href", "action", "srcset", "data", "poster"):
            value = (attrs.get(name) or "").strip().lower()
            assert not value.startswith(("http://", "https://", "//")), f"<{tag} {name}={value!r}>"
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    assert not [t for t, a in page.elements if t == "link" and "stylesheet" in (a.get("rel") or "")]


# -- a real browser -------------------------------------------------------------------------------


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("SIMBENCH_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"{CHROMIUM} is missing and SIMBENCH_REQUIRE_CHROMIUM=1")
    pytest.skip(f"{CHROMIUM} is not installed (set SIMBENCH_REQUIRE_CHROMIUM=1 to make this a failure)")


def _browse(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    proc = subprocess.run([str(_chromium()), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_headless_chromium_renders_the_report_without_running_model_text(hostile_run, tmp_path):
    _chromium()
    out, session_ids = hostile_run
    url = (out / "report.html").resolve().as_uri()

    dom = _browse(tmp_path, url, "--dump-dom").stdout
    assert "simbench report" in dom
    for sid in session_ids:
        assert sid in dom, f"session {sid} is not in the rendered page"
    page = parse(dom)
    # The injected markup is text in the page, not elements, and nothing it scripted ran.
    assert "pwned-by-script" in dom and "alert(1)" in dom
    assert not [t for t, _ in page.elements if t.startswith("pwned")]
    assert not [a for t, a in page.elements if t == "img" and a.get("src") == "x"]
    assert not any("alert(" in s or "pwned" in s for s in page.scripts)
    assert "<i>friends</i>" not in dom

    shot = tmp_path / "report.png"
    _browse(tmp_path, url, "--window-size=1280,2000", f"--screenshot={shot}")
    blank_page = tmp_path / "blank.html"
    blank_page.write_text("<!doctype html><html><body></body></html>", encoding="utf-8")
    blank = tmp_path / "blank.png"
    _browse(tmp_path, blank_page.as_uri(), "--window-size=1280,2000", f"--screenshot={blank}")
    assert _png_size(shot) == (1280, 2000)
    # A rendered report (text, tables, colours) compresses far worse than an empty page.
    assert shot.stat().st_size > 3 * blank.stat().st_size, (shot.stat().st_size, blank.stat().st_size)
