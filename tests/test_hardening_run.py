"""Issue 13, attacked as a hostile user would: Ctrl-C, two runs at once, outages, failed starts.

Each test is named after the item of the issue it covers (test_item<N>_...). Runs go through the
real CLI (in-process, or as a subprocess where a signal or a second process is the point) against
the fake OpenAI server; the run's file is read with plain sqlite3.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from conftest import SIMBENCH_BIN, RecordingFake, base_matrix, invoke, run_cli

BIDI = "\u202e"  # RIGHT-TO-LEFT OVERRIDE
BIDI_CHARS = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def _count(db_path: Path, sql: str, params: tuple = ()) -> int:
    if not db_path.exists():
        return 0
    try:
        with sqlite3.connect(db_path, timeout=5) as db:
            return db.execute(sql, params).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the moment to test: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("the moment to test never came")


def _start(args: list, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(Path(__file__).parent.parent))
    return subprocess.Popen([str(SIMBENCH_BIN), *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _ctrl_c(args: list, cwd: Path, moment, at_signal=lambda: None) -> tuple[int, str, object]:
    """Run simbench with ``args``, send SIGINT once ``moment()`` holds; (exit code, stderr, what
    ``at_signal()`` returned just before the signal)."""
    proc = _start(args, cwd)
    try:
        _wait_for(moment, proc)
        seen = at_signal()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr, seen


def _write(tmp_path: Path, matrix: dict, name: str = "matrix.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(matrix, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _bigger(base_url: str, repeats: int, **overrides) -> dict:
    """Two variants x ``repeats``, one exchange per session, judged on coherence and correctness."""
    return base_matrix(base_url, repeats=repeats, max_turns=1, concurrency=4, **overrides)


# -- item 2: Ctrl-C while judging ------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_item2_ctrl_c_while_judging_stops_at_once_and_says_where_to_resume(make_fake, tmp_path):
    fake = make_fake(latency=0.3)
    matrix = _write(tmp_path, _bigger(fake.base_url, repeats=6))  # 12 sessions x 2 judges x 3 samples = 72
    planned = 12 * 2 * 3
    # no --out: the message must name the directory the run chose
    code, stderr, at_signal = _ctrl_c(["run", matrix, "--no-cache", "-q", "--judge-samples", 3], tmp_path,
                                      lambda: fake.roles["judge"] >= 4, lambda: fake.roles["judge"])
    after = fake.roles["judge"] - at_signal
    assert code == 130, stderr
    # Stopped dispatching at once: at most what was already on its way (4 workers); the old code
    # stopped one of its 4 executors per SIGINT and let the others judge on.
    assert after <= 4, f"{after} judge requests after Ctrl-C"
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"saved in runs/{run_dir.name}" in stderr and "RUN_DIR" not in stderr
    resume_line = next(line for line in stderr.splitlines() if line.startswith("Resume with: "))
    command = shlex.split(resume_line.removeprefix("Resume with: "))
    assert command[:2] == ["simbench", "run"] and "--resume" in command and "--no-cache" in command
    assert command[command.index("--out") + 1] == f"runs/{run_dir.name}"

    # the usage of the judgements cut off is recorded too (item 13): every request the server saw
    db = run_dir / "run.sqlite"
    assert _count(db, "SELECT COUNT(*) FROM calls WHERE role = 'judge'") >= fake.roles["judge"]

    # the printed command resumes it, asking only the judgements still missing (no cache to hide it)
    stored = _count(db, "SELECT COUNT(*) FROM evaluations")
    assert stored < planned
    fake.latency = 0
    before = fake.roles["judge"]
    resumed = _start(command[1:], tmp_path)
    _, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr
    assert fake.roles["judge"] - before == planned - stored
    assert _count(db, "SELECT COUNT(*) FROM evaluations WHERE status = 'ok'") == planned


@pytest.mark.timeout(300)
def test_item2_ctrl_c_while_judging_beside_the_simulation_stops_both(make_fake, tmp_path):
    fake = make_fake(latency=0.3)
    matrix = _write(tmp_path, base_matrix(fake.base_url, repeats=6, max_turns=3, concurrency=2))  # 12 sessions
    out = tmp_path / "run"
    # the first sessions are being judged while later ones are simulated
    code, stderr, seen = _ctrl_c(["run", matrix, "--out", out, "--no-cache", "-q"], tmp_path,
                                 lambda: fake.roles["judge"] >= 1, lambda: dict(fake.roles))
    assert code == 130, stderr
    # neither side went on: at most what was already on its way when the signal came
    assert fake.roles["judge"] - seen["judge"] <= 2
    assert fake.roles["tutor"] + fake.roles["student"] - seen["tutor"] - seen["student"] <= 2
    db = out / "run.sqlite"
    assert _count(db, "SELECT COUNT(*) FROM sessions WHERE status = 'running'") > 0  # sessions were cut off
    assert _count(db, "SELECT COUNT(*) FROM calls") >= fake.chat_calls  # and every call they made is counted
    fake.latency = 0
    result = run_cli(matrix, out, "--no-cache", "--resume")
    assert result.exit_code == 0, result.output
    assert _count(db, "SELECT COUNT(*) FROM evaluations WHERE status = 'ok'") == 12 * 2


def test_item2_ctrl_c_in_judge_exits_130_not_aborted(make_fake, tmp_path):
    fake = make_fake(latency=0.3)
    matrix = _write(tmp_path, _bigger(fake.base_url, repeats=2))
    assert run_cli(matrix, tmp_path / "run", "--no-cache").exit_code == 0
    before = fake.roles["judge"]
    code, stderr, _ = _ctrl_c(["judge", tmp_path / "run", "--out", tmp_path / "judged", "--no-cache", "-q"], tmp_path,
                              lambda: fake.roles["judge"] > before)
    assert code == 130, stderr
    assert "Aborted!" not in stderr and "interrupted" in stderr


# -- item 3: one run per directory at a time -------------------------------------------------------


@pytest.mark.timeout(300)
def test_item3_a_run_directory_takes_one_run_at_a_time(make_fake, tmp_path):
    fake = make_fake(latency=0.3)
    matrix = _write(tmp_path, _bigger(fake.base_url, repeats=4))
    out = tmp_path / "run"
    db = out / "run.sqlite"
    first = _start(["run", matrix, "--out", out, "--no-cache", "-q"], tmp_path)
    try:
        _wait_for(lambda: _count(db, "SELECT COUNT(*) FROM sessions WHERE status = 'completed'") >= 1, first)
        resumed = invoke("run", matrix, "--out", out, "--resume", "--no-cache", "-q")
        fresh = invoke("run", matrix, "--out", out, "--no-cache", "-q")
        for second in (resumed, fresh):
            assert second.exit_code == 2, second.output
            assert f"{out} is in use by another simbench run (pid {first.pid})" in second.output
        # the refused runs started nothing: one attempt per sample so far
        assert _count(db, "SELECT COUNT(*) FROM sessions WHERE attempt > 1") == 0
        assert first.poll() is None
        # reading the run meanwhile is fine: judge RUN_DIR writes to its own directory
        judged = invoke("judge", out, "--out", tmp_path / "judged", "--no-cache", "-q")
        assert judged.exit_code == 0, judged.output
        first.send_signal(signal.SIGKILL)  # the lock goes with the process, however it ends
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    result = invoke("run", matrix, "--out", out, "--resume", "--no-cache", "-q")
    assert result.exit_code == 0, result.output
    assert _count(db, "SELECT COUNT(DISTINCT sample_id) FROM sessions WHERE status = 'completed'") == 8


# -- item 4: --retry-errors ------------------------------------------------------------------------


def test_item4_retry_errors_gives_errored_sessions_a_new_attempt(make_fake, tmp_path, open_run):
    outage = {"on": True}
    fake = make_fake(fail_when=lambda request: outage["on"])
    matrix = _write(tmp_path, _bigger(fake.base_url, repeats=2))
    out = tmp_path / "run"
    assert run_cli(matrix, out, "--no-cache").exit_code == 3
    outage["on"] = False
    calls = fake.chat_calls
    again = run_cli(matrix, out, "--no-cache", "--resume")
    assert again.exit_code == 3 and fake.chat_calls == calls  # a plain resume keeps the errors
    alone = run_cli(matrix, tmp_path / "new", "--no-cache", "--retry-errors")  # a new run has no errors to retry
    assert alone.exit_code == 2 and "give it with --resume" in alone.output
    assert fake.chat_calls == calls and not (tmp_path / "new").exists()

    result = run_cli(matrix, out, "--no-cache", "--resume", "--retry-errors")
    assert result.exit_code == 0, result.output
    assert "sessions: 4 planned, 4 completed, 0 errored" in result.output
    run = open_run(out)
    sessions = run.sessions()
    assert sorted((s["attempt"], s["status"]) for s in sessions) == [(1, "errored")] * 4 + [(2, "completed")] * 4
    assert all(s["session_id"].endswith("/2") for s in sessions if s["status"] == "completed")
    assert run.summary()["sessions"]["superseded_attempts"] == 4
    assert len(run.judgements()) == 8 and {j["status"] for j in run.judgements()} == {"ok"}


def test_item4_retry_errors_asks_errored_judgements_again(make_fake, tmp_path, open_run):
    outage = {"on": True}
    fake = make_fake(fail_when=lambda request: outage["on"] and fake.role_of(request) == "judge")
    matrix = _write(tmp_path, _bigger(fake.base_url, repeats=2))
    out = tmp_path / "run"
    assert run_cli(matrix, out, "--no-cache").exit_code == 3  # every judgement errored (item 7)
    outage["on"] = False
    tutor_calls = fake.roles["tutor"]
    judge_calls = fake.roles["judge"]
    result = run_cli(matrix, out, "--no-cache", "--resume", "--retry-errors")
    assert result.exit_code == 0, result.output
    assert fake.roles["tutor"] == tutor_calls  # the sessions were fine: not simulated again
    assert fake.roles["judge"] - judge_calls == 8
    judgements = open_run(out).judgements()
    assert len(judgements) == 8 and {j["status"] for j in judgements} == {"ok"}


# -- item 7: exit 0 with nothing judged; the reachability check ------------------------------------


def test_item7_every_judgement_errored_exits_3_with_the_reason(make_fake, tmp_path):
    fake = make_fake(judge_reply=lambda prompt, labels: "not json")
    result = run_cli(_write(tmp_path, base_matrix(fake.base_url)), tmp_path / "run", "--no-cache")
    assert result.exit_code == 3, result.output
    assert "every judgement errored (4)" in result.output and "JSONDecodeError" in result.output
    assert (tmp_path / "run" / "report.html").is_file()


class ModelsRoute(RecordingFake):
    """The fake server whose ``GET /models`` answers ``models_status`` (chat works as usual)."""

    models_status = 200

    async def _route(self, method, path, body):
        if method == "GET" and path.endswith("/models") and self.models_status != 200:
            return self.models_status, b'{"error": {"message": "scripted"}}', {}
        return await super()._route(method, path, body)


@pytest.mark.parametrize("status, code, message", [
    (401, 2, "refused the request (HTTP 401): check the API key in $SIMBENCH_TEST_KEY"),
    (403, 2, "refused the request (HTTP 403): check the API key in $SIMBENCH_TEST_KEY"),
    (503, 3, "answered HTTP 503"),
    (404, 0, None),  # no /models route: the check cannot tell, the run goes on
])
def test_item7_reachability_check_reads_the_status(tmp_path, monkeypatch, status, code, message):
    monkeypatch.setenv("SIMBENCH_TEST_KEY", "sk-test")
    with ModelsRoute(latency=0) as fake:
        fake.models_status = status
        matrix = base_matrix(fake.base_url)
        matrix["models"]["fake"]["api_key_env"] = "SIMBENCH_TEST_KEY"
        result = run_cli(_write(tmp_path, matrix), tmp_path / "run", "--no-cache")
        assert result.exit_code == code, result.output
        if message:
            assert message in result.output and "sk-test" not in result.output
            assert fake.chat_calls == 0
        else:
            assert fake.roles["judge"] == 4


# -- item 10: a failed start leaves nothing behind -------------------------------------------------


def test_item10_a_failed_start_removes_the_run_directory_it_created(make_fake, tmp_path, monkeypatch):
    monkeypatch.delenv("SIMBENCH_TEST_MISSING_KEY", raising=False)
    fake = make_fake()
    matrix = base_matrix(fake.base_url)
    matrix["models"]["fake"]["api_key_env"] = "SIMBENCH_TEST_MISSING_KEY"
    path = _write(tmp_path, matrix)
    out = tmp_path / "runs" / "nested" / "run"
    for _ in range(2):  # the same command again gets the same answer, not "already holds a run"
        result = run_cli(path, out)
        assert result.exit_code == 2, result.output
        assert "SIMBENCH_TEST_MISSING_KEY is not set" in result.output
        assert not (tmp_path / "runs").exists()

    # an unreachable endpoint (exit 3), into a directory that already held a file: only that file stays
    matrix = base_matrix("http://127.0.0.1:9/v1")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_cli(_write(tmp_path, matrix, "unreachable.yaml"), out)
    assert result.exit_code == 3, result.output
    assert "unreachable" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_item10_a_failed_start_keeps_the_log_its_error_names(make_fake, tmp_path):
    fake = make_fake()
    matrix = base_matrix(fake.base_url)
    crash = "import sys; print('no course notes found'); sys.exit(4)"
    matrix["tutor"] = {"kind": "http", "variants": {"a": {"settings": {}}},
                       "http": {"base_url": "http://127.0.0.1:{port}/v1", "start": f'python -c "{crash}"'}}
    path = _write(tmp_path, matrix, "crashing-app.yaml")
    out = tmp_path / "runs" / "app"
    for _ in range(2):  # the same command again: the same answer, not "already holds a run"
        result = run_cli(path, out)
        assert result.exit_code == 3, result.output
        assert f"exited with code 4 while starting; see {out / 'tutor-app.log'}" in result.output
        assert sorted(p.name for p in out.iterdir()) == ["tutor-app.log"]  # the run file and lock are gone
        assert "no course notes found" in (out / "tutor-app.log").read_text()
    assert fake.chat_calls == 0


# -- item 13: the usage of interrupted work; judgement samples on resume ---------------------------


@pytest.mark.timeout(300)
def test_item13_calls_of_sessions_cut_off_by_ctrl_c_are_recorded(make_fake, tmp_path):
    fake = make_fake(latency=0.3)
    matrix = _write(tmp_path, base_matrix(fake.base_url, repeats=6, max_turns=4, concurrency=4))
    out = tmp_path / "run"
    code, stderr, _ = _ctrl_c(["run", matrix, "--out", out, "--no-cache", "-q"], tmp_path, lambda: fake.chat_calls >= 10)
    assert code == 130, stderr
    db = out / "run.sqlite"
    assert _count(db, "SELECT COUNT(*) FROM sessions WHERE status = 'running'") > 0  # cut off mid-session
    # every request the server saw is in the run's usage (a cancelled one may not have reached it)
    recorded = _count(db, "SELECT COUNT(*) FROM calls")
    assert fake.chat_calls <= recorded <= fake.chat_calls + 4
    interrupted = _count(db, "SELECT COUNT(*) FROM calls JOIN sessions USING (session_id) WHERE sessions.status = 'running'")
    assert interrupted > 0


def test_item13_resume_without_cache_asks_only_the_missing_judgement_samples(make_fake, tmp_path):
    fake = make_fake()
    matrix = _write(tmp_path, base_matrix(fake.base_url))
    out = tmp_path / "run"
    assert run_cli(matrix, out, "--no-cache", "--judge-samples", 3).exit_code == 0
    db = out / "run.sqlite"
    assert _count(db, "SELECT COUNT(*) FROM evaluations") == 2 * 2 * 3
    # as if killed before these were committed: one sample of one judge, two of another
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM evaluations WHERE rowid IN (SELECT rowid FROM evaluations WHERE judge = 'coherence'"
                     " AND judge_sample = 1 LIMIT 1)")
        conn.execute("DELETE FROM evaluations WHERE rowid IN (SELECT rowid FROM evaluations WHERE judge = 'correctness'"
                     " AND judge_sample IN (0, 2) LIMIT 2)")
    before = fake.roles["judge"]
    result = run_cli(matrix, out, "--no-cache", "--resume")
    assert result.exit_code == 0, result.output
    assert fake.roles["judge"] - before == 3
    assert _count(db, "SELECT COUNT(*) FROM evaluations") == 2 * 2 * 3


# -- item 14: which side failed; why every session errored; bidi overrides in the report ----------


@pytest.mark.parametrize("side", ["tutor", "student"])
def test_item14_a_session_error_says_which_call_failed(make_fake, tmp_path, open_run, side):
    fake = make_fake(fail_when=lambda request: fake.role_of(request) == side)
    out = tmp_path / "run"
    result = run_cli(_write(tmp_path, base_matrix(fake.base_url)), out, "--no-cache")
    assert result.exit_code == 3
    errors = [s["error"] for s in open_run(out).sessions()]
    assert errors and all(e.startswith(f"{side} call failed: ") for e in errors), errors
    # "every session errored" says why
    assert "every session errored" in result.output
    assert f"(2 of 2): {side} call failed: InternalServerError" in result.output


class _Text(HTMLParser):
    """Every text chunk of a page with the elements it sits in."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, str]] = []
        self.chunks: list[tuple[str, list[tuple[str, str]]]] = []

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "br", "input", "img", "line", "circle", "rect", "link"):
            self.stack.append((tag, dict(attrs).get("class") or ""))

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        self.chunks.append((data, list(self.stack)))


def _isolated(stack: list[tuple[str, str]]) -> bool:
    return any(tag == "bdi" or (tag == "tspan" and "iso" in cls) or tag in ("title", "option", "script", "style")
               for tag, cls in stack)


def test_item14_bidi_overrides_in_names_and_model_text_are_isolated(make_fake, tmp_path):
    fake = make_fake(tutor=lambda request: f"tutor {BIDI}txet desrever",
                     judge_reply=lambda prompt, labels: json.dumps({"explanation": f"{BIDI}because", "label": labels[0]}))
    variant, topic, persona = f"socr{BIDI}atic", "fractions \u2066x", f"new{BIDI}bie"
    matrix = base_matrix(fake.base_url, personas=[{"name": persona, "description": f"{BIDI} a student"}])
    matrix["tutor"]["variants"] = {variant: "You teach {{ topic.name }}.", "dir\u202bect": "Explain {{ topic.name }}."}
    matrix["tutor"]["baseline"] = variant
    matrix["topics"][0]["name"] = topic
    out = tmp_path / "run"
    result = run_cli(_write(tmp_path, matrix), out, "--no-cache")
    assert result.exit_code == 0, result.output
    parser = _Text()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    shown = [(text, stack) for text, stack in parser.chunks if BIDI_CHARS & set(text)]
    assert len(shown) > 10  # names and model text are on the page
    raw = [text for text, stack in shown if not _isolated(stack)]
    assert not raw, f"shown without <bdi>: {raw[:5]}"
