"""Crash safety: SIGKILL a run at some moment, resume it, and every planned sample is done exactly once."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from simbench.evaluators.sessions import rebuild_sessions
from simbench.store import RunStore
from simbench.tracing.local import spans_dataframe

PLANNED = 2 * 2 * 3 * 5  # variants x topics x personas x repeats


def _matrix(tmp_path: Path, fake: FakeOpenAI) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(f"""
name: resume-check
models:
  fake: {{base_url: "{fake.base_url}", model: m}}
tutor: {{model: fake, variants: {{a: "tutor A for {{{{ topic.name }}}}", b: "tutor B for {{{{ topic.name }}}}"}}}}
student: {{model: fake}}
judges: {{model: fake}}
topics: [adding_fractions, photosynthesis]
personas: [impatient, terse, anxious]
repeats: 5
max_turns: 3
concurrency: 6
""")
    return path


def _count(db_path: Path, sql: str) -> int:
    if not db_path.exists():
        return 0
    try:
        with sqlite3.connect(db_path, timeout=5) as db:
            return db.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _kill_when(proc: subprocess.Popen, predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            return
        time.sleep(0.05)
    raise AssertionError("the run finished or stalled before the kill point")


def _start(matrix: Path, out: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simbench", "run", str(matrix), "--out", str(out), "--cache", str(cache), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _resume(matrix: Path, out: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simbench", "run", str(matrix), "--out", str(out), "--cache", str(cache),
                           "--resume", "-q"], capture_output=True, text=True, timeout=300)


def _check_exactly_once(out: Path) -> None:
    store = RunStore.open_run_dir(out)
    try:
        latest = store.latest_sessions()
        assert len(latest) == PLANNED
        assert len({s["sample_id"] for s in latest}) == PLANNED
        assert all(s["status"] == "completed" for s in latest)
        run_id = store.run()["run_id"]
        transcripts = {t.session_id: t for t in rebuild_sessions(spans_dataframe(store, f"{run_id}/"))}
        for s in latest:
            t = transcripts[s["session_id"]]
            # the opening, then (tutor, student) per turn: nothing from a killed attempt leaks in
            assert [m.role for m in t.messages] == ["student"] + ["tutor", "student"] * s["turns"], s["session_id"]
        judged = {}
        for j in store.judgements():
            judged.setdefault(j.session_id, []).append(j.judge)
        assert set(judged) == {s["session_id"] for s in latest}
        assert all(sorted(v) == sorted(["coherence", "goal_completion", "frustration", "correctness"]) for v in judged.values())
        summary = json.loads((out / "summary.json").read_text())
        assert summary["sessions"]["planned"] == summary["sessions"]["completed"] == PLANNED
    finally:
        store.close()


@pytest.mark.timeout(300)
def test_sigkill_during_simulation_then_resume(tmp_path: Path) -> None:
    with FakeOpenAI(latency=0.05) as fake:
        matrix, out, cache = _matrix(tmp_path, fake), tmp_path / "run", tmp_path / "cache.sqlite"
        proc = _start(matrix, out, cache)
        _kill_when(proc, lambda: _count(out / "run.sqlite", "SELECT COUNT(*) FROM sessions WHERE status = 'completed'") >= 15)
        running = _count(out / "run.sqlite", "SELECT COUNT(*) FROM sessions WHERE status = 'running'")
        assert running > 0, "the kill should catch sessions in flight"
        result = _resume(matrix, out, cache)
        assert result.returncode == 0, result.stderr
    _check_exactly_once(out)
    superseded = _count(out / "run.sqlite", "SELECT COUNT(*) FROM sessions WHERE attempt > 1")
    assert superseded == running, "each killed session is redone once, under a new attempt"


@pytest.mark.timeout(300)
def test_sigkill_during_judging_then_resume(tmp_path: Path) -> None:
    with FakeOpenAI(latency=0.05) as fake:
        matrix, out, cache = _matrix(tmp_path, fake), tmp_path / "run", tmp_path / "cache.sqlite"
        proc = _start(matrix, out, cache)
        _kill_when(proc, lambda: _count(out / "run.sqlite", "SELECT COUNT(*) FROM evaluations") >= 20)
        judged_before = _count(out / "run.sqlite", "SELECT COUNT(*) FROM evaluations")
        assert judged_before < PLANNED * 4
        judge_calls_before = fake.roles["judge"]
        result = _resume(matrix, out, cache)
        assert result.returncode == 0, result.stderr
        # finished judgements are not asked for again (the cache would hide it, so count requests);
        # judgements in flight at the kill are asked again
        assert fake.roles["judge"] - judge_calls_before <= PLANNED * 4 - judged_before + 6
    _check_exactly_once(out)


def test_resume_refuses_a_changed_matrix(tmp_path: Path) -> None:
    with FakeOpenAI() as fake:
        matrix, out, cache = _matrix(tmp_path, fake), tmp_path / "run", tmp_path / "cache.sqlite"
        first = subprocess.run([sys.executable, "-m", "simbench", "run", str(matrix), "--out", str(out), "--cache", str(cache), "-q"],
                               capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        matrix.write_text(matrix.read_text().replace("tutor A for", "tutor A, changed, for"))
        calls = fake.chat_calls
        result = _resume(matrix, out, cache)
    assert result.returncode == 2
    assert "matrix changed" in result.stderr
    assert fake.chat_calls == calls
