"""Integration tests on the real embedded model (llama.cpp's server from xllamacpp, with SmolLM2-135M).

They need ``pip install '.[local]'`` and ``simbench install-model``. Without it they skip, unless SIMBENCH_REQUIRE_EMBEDDED=1
(set by .ci/run), where a missing model is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from conftest import copy_own_tutor

from simbench.evaluators.builtin import BUILTIN
from simbench.evaluators.judges import JudgeInput, judge_sessions
from simbench.matrix import load_matrix
from simbench.models import embedded
from simbench.models.endpoints import resolve_endpoint
from simbench.models.limits import ModelLimiter
from simbench.records import Message, Transcript

ROOT = Path(__file__).resolve().parent.parent
SIMBENCH = [sys.executable, "-m", "simbench"]

if not embedded.is_installed():
    if os.environ.get("SIMBENCH_REQUIRE_EMBEDDED") == "1":
        raise RuntimeError("SIMBENCH_REQUIRE_EMBEDDED=1 but the embedded model is not installed (pip install '.[local]' && simbench install-model)")
    pytest.skip("the embedded model is not installed (pip install '.[local]' && simbench install-model)", allow_module_level=True)

pytestmark = pytest.mark.embedded

TINY = """
name: tiny-embedded
tutor:
  max_tokens: 48
  variants:
    only: "You are a tutor for {{ topic.name }}. Ask one short question."
student: {max_tokens: 32}
judges: {max_tokens: 120}
topics: [adding_fractions]
personas: [impatient]
repeats: 1
max_turns: 2
concurrency: 1
"""


def _server_pids() -> set[int]:
    """Processes running the embedded server's entry point (``python -m simbench.models.embedded_server``)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if embedded.SERVER_MODULE.encode() in argv:
                pids.add(int(entry.name))
    return pids


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_tiny_matrix_runs_on_the_embedded_model(tmp_path: Path) -> None:
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(TINY)
    out = tmp_path / "run"
    before = _server_pids()
    result = subprocess.run(SIMBENCH + ["run", str(matrix), "--out", str(out), "--cache", str(tmp_path / "c.sqlite"), "-q"],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "not to be trusted" in result.stderr or "do not trust" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sessions"] == {**summary["sessions"], "planned": 1, "completed": 1, "errored": 0}
    for name in ("coherence", "goal_completion", "frustration", "correctness"):
        overall = summary["dimensions"][name]["overall"]
        # grammar-constrained output: the small model answers with a valid label every time
        assert overall["judged"] == 1, (name, overall)
    html = (out / "report.html").read_text()
    assert "SmolLM2" in html and "adding fractions" in html
    assert "llama" in (out / embedded.EMBEDDED_LOG).read_text().lower()  # the server's own log, in the run directory
    assert _wait_for(lambda: not (_server_pids() - before), 10), "the embedded server left running after the run"


def test_no_server_survives_an_exception_in_simbench(tmp_path: Path) -> None:
    before = _server_pids()
    with pytest.raises(RuntimeError, match="the run broke"):
        with embedded.EmbeddedServer("local", 1024, log_path=tmp_path / embedded.EMBEDDED_LOG) as server:
            assert httpx2.get(server.base_url + "/models", timeout=10).status_code == 200
            assert _server_pids() - before
            raise RuntimeError("the run broke")
    assert _wait_for(lambda: not (_server_pids() - before), 15), "the embedded server left running after an exception"


def test_the_own_tutor_example_runs_on_the_embedded_model(tmp_path: Path, open_run) -> None:
    """examples/own_tutor as the README runs it (its http kind: server.py around tutor.py, started by
    simbench), one persona instead of two to keep it short."""
    path = copy_own_tutor(tmp_path, "http.yaml", lambda matrix: matrix.update(personas=matrix["personas"][:1]))
    out = tmp_path / "run"
    result = subprocess.run(SIMBENCH + ["run", str(path), "--out", str(out), "--no-cache", "-q"],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = open_run(out)
    summary = run.summary()
    assert summary["sessions"]["completed"] == 4 and summary["sessions"]["errored"] == 0
    assert set(summary["dimensions"]) == {"coherence", "goal_completion", "correctness"}  # the example's judges
    assert all(d["overall"]["judged"] == 4 for d in summary["dimensions"].values())
    spans = run.spans()
    assert "search_notes" in {s["name"] for s in spans if s["span_kind"] == "TOOL"}
    assert sum(s["name"] == "tutor.turn" for s in spans) == sum(s["turns"] for s in run.sessions())
    assert "search_notes" in (out / "report.html").read_text()


def test_no_server_survives_sigkill_of_simbench(tmp_path: Path) -> None:
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(TINY.replace("repeats: 1", "repeats: 50"))
    before = _server_pids()
    proc = subprocess.Popen(SIMBENCH + ["run", str(matrix), "--out", str(tmp_path / "run"), "--no-cache", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        assert _wait_for(lambda: _server_pids() - before, 120), "the embedded server never started"
        ours = _server_pids() - before
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _wait_for(lambda: not (ours & _server_pids()), 15), f"orphan embedded server left: {ours & _server_pids()}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_stops_the_server_and_says_how_to_resume(tmp_path: Path) -> None:
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(TINY.replace("repeats: 1", "repeats: 50"))
    before = _server_pids()
    out = tmp_path / "run"
    proc = subprocess.Popen(SIMBENCH + ["run", str(matrix), "--out", str(out), "--no-cache", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert _wait_for(lambda: _server_pids() - before, 120), "the embedded server never started"
        ours = _server_pids() - before
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "--resume" in stderr
        assert _wait_for(lambda: not (ours & _server_pids()), 15)
    finally:
        if proc.poll() is None:
            proc.kill()


def _tokens(base_url: str, text: str) -> int:
    response = httpx2.post(base_url.removesuffix("/v1") + "/tokenize", json={"content": text}, timeout=30)
    return len(response.json()["tokens"])


def _text_of_tokens(base_url: str, n: int, word: str) -> str:
    """A message of exactly ``n`` tokens (as the model counts them), with braces to stress templating."""
    text = (word + " ") * n
    while _tokens(base_url, text) > n:
        text = text[: int(len(text) * 0.95)]
    while _tokens(base_url, text + word) <= n:
        text += word
    return text


def test_longest_session_of_the_example_fits_every_judge() -> None:
    """max_turns x (tutor + student max_tokens) plus prompts: no judge may hit the slot's context."""
    matrix = load_matrix(ROOT / "examples" / "tutor.yaml")
    slot = embedded.slot_context(matrix.local_context_needed())
    with embedded.EmbeddedServer("local", slot) as server:
        tutor_text = _text_of_tokens(server.base_url, matrix.tutor.max_tokens, "fraction {x}")
        student_text = _text_of_tokens(server.base_url, matrix.student.max_tokens, "why {{y}}")
        topic = max(matrix.topics, key=lambda t: len((t.reference or "") + (t.goal or "") + t.opening))
        messages = [Message("student", topic.opening)]
        for _ in range(matrix.max_turns):
            messages += [Message("tutor", tutor_text), Message("student", student_text)]
        transcript = Transcript("longest/s/1", "span", messages)
        endpoint = resolve_endpoint("local", matrix.models["local"], server.base_url)
        results = []

        asyncio.run(judge_sessions(
            [JudgeInput(transcript, "longest", topic.name, topic.opening, topic.reference, topic.goal)],
            [BUILTIN[name] for name in matrix.judges.use], endpoint, None, ModelLimiter("local", 4),
            lambda j, calls: results.append((j, calls)), concurrency=4,
            max_tokens=matrix.judges.max_tokens, temperature=0.0,
        ))
    assert sorted(j.judge for j, _ in results) == sorted(matrix.judges.use)
    for judgement, calls in results:
        assert judgement.status == "ok", (judgement.judge, judgement.error)
        assert all(c.status == 200 for c in calls), [(c.status, c.error) for c in calls]
        assert max(c.prompt_tokens for c in calls) < slot


def test_selftest_on_the_embedded_model_says_failure_is_expected(tmp_path: Path) -> None:
    # Judges on the embedded model with the matrix's small max_tokens (the built-in cases are short).
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(TINY)
    result = subprocess.run(SIMBENCH + ["selftest", "--matrix", str(matrix), "--out", str(tmp_path / "st"),
                                        "--cache", str(tmp_path / "c.sqlite"), "-q"],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr
    assert "expected to fail this self-test" in result.stdout
    assert "checks passed" in result.stdout
    if result.returncode == 1:
        assert "(expected on the embedded model)" in result.stderr


def test_install_model_places_only_the_model_file_and_names_a_missing_server(tmp_path: Path) -> None:
    placed = subprocess.run(SIMBENCH + ["install-model"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert placed.returncode == 0, placed.stderr
    assert str(embedded.model_file()) in placed.stdout and embedded.model_file().is_file()
    hidden = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['xllamacpp'] = None; from simbench.cli import main; main()",
         "install-model"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert hidden.returncode == 2
    assert "pip install 'simbench[local]'" in hidden.stderr and "Ollama" in hidden.stderr
