"""Whole runs on the fake server: spans, sessions, transcripts, judges, summary, report, resume."""

from __future__ import annotations

import _thread
import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import base_matrix, invoke, run_cli
from fake_openai import judge_name
from simbench.evaluators.builtin import BUILTIN

STUDENT_MARKER = "role-playing a student"
JUDGE_MARKER = "expert reviewer of tutoring conversations"
FAILING = {name: next(l for l in d.choices if l not in d.pass_labels()) for name, d in BUILTIN.items()}


def _run(write_matrix, tmp_path, matrix: dict, name: str = "run", *extra):
    path = write_matrix(matrix, f"{name}.yaml")
    out = tmp_path / name
    result = run_cli(path, out, "--cache", tmp_path / "cache.sqlite", *extra)
    return result, out, path


def _opening_of(request: dict) -> str:
    """The first message after the system prompt: the student's opening, in both roles' views."""
    return request["messages"][1]["content"]


def _last_index(llm_span: dict) -> int:
    """The index of the last input message of an LLM span (the student's, for a tutor call)."""
    return max(int(k.split(".")[2]) for k in llm_span["attributes"] if k.startswith("llm.input_messages."))


# -- a full run -----------------------------------------------------------------------------------


def test_full_run_spans_sessions_and_summary(fake, write_matrix, tmp_path, open_run):
    matrix = base_matrix(fake.base_url, personas=["impatient", "confused_novice"], max_turns=2)
    result, out, _ = _run(write_matrix, tmp_path, matrix)
    assert result.exit_code == 0, result.output

    run = open_run(out)
    sessions = run.sessions()
    assert len(sessions) == 4  # 2 variants x 1 topic x 2 personas
    assert all(s["status"] == "completed" and s["stop_reason"] == "max_turns" and s["turns"] == 2 for s in sessions)

    # Spans: one tutor.turn AGENT root per tutor turn, holding exactly one LLM span per tutor call the
    # server saw, plus one closing CHAIN span per session.
    spans = run.spans()
    llm = [s for s in spans if s["span_kind"] == "LLM"]
    turns = {s["span_id"]: s for s in spans if s["name"] == "tutor.turn"}
    closing = [s for s in spans if s["name"] == "session.end"]
    assert fake.roles["tutor"] == 4 * 2
    assert len(llm) == fake.roles["tutor"] == len(turns)
    assert all(t["span_kind"] == "AGENT" and t["parent_id"] is None for t in turns.values())
    assert all(s["parent_id"] in turns and turns[s["parent_id"]]["trace_id"] == s["trace_id"] for s in llm)
    for span in llm:  # the turn's input/output are the student's message and the reply the LLM span gave
        turn = turns[span["parent_id"]]["attributes"]
        assert turn["output.value"] == span["attributes"]["llm.output_messages.0.message.content"]
        assert turn["input.value"] == span["attributes"][f"llm.input_messages.{_last_index(span)}.message.content"]
    assert len(closing) == len(sessions)
    assert all(s["span_kind"] == "CHAIN" for s in closing)
    assert len(spans) == len(turns) + len(llm) + len(closing)

    # The student and the judges were called but left no span.
    assert fake.roles["student"] == 4 * 2
    assert fake.roles["judge"] == 4 * 2  # coherence + correctness per session
    for span in spans:
        text = json.dumps(span["attributes"])
        assert STUDENT_MARKER not in text and JUDGE_MARKER not in text, span["name"]

    # Every span carries <run_id>/<sample_id>/<attempt> of a session of this run.
    expected_ids = {f"{run.run_id}/{s['sample_id']}/{s['attempt']}" for s in sessions}
    assert {s["session_id"] for s in sessions} == expected_ids
    for span in spans:
        sid = span["attributes"].get("session.id")
        assert sid == span["session_id"]
        assert re.fullmatch(r"[^/]+/[0-9a-f]+/\d+", sid), sid
        assert sid in expected_ids
    for s in sessions:
        own = [x for x in spans if x["session_id"] == s["session_id"]]
        assert sum(x["span_kind"] == "LLM" for x in own) == 2
        assert sum(x["name"] == "session.end" for x in own) == 1
        assert s["span_id"] in {x["span_id"] for x in own}

    summary = run.summary()
    assert summary["sessions"]["planned"] == 4
    assert summary["sessions"]["completed"] == 4
    assert summary["sessions"]["errored"] == 0
    assert summary["errors"] == []
    assert set(summary["dimensions"]) == {"coherence", "correctness"}
    for dim in summary["dimensions"].values():
        for key in ("pass", "fail", "error", "skipped"):
            assert key in dim["overall"]
        assert dim["overall"]["pass"] == 4 and dim["overall"]["fail"] == 0
        for breakdown in ("by_variant", "by_persona"):
            for counts in dim[breakdown].values():
                assert {"pass", "fail", "error", "skipped"} <= set(counts)
        assert set(dim["by_variant"]) == {"socratic", "direct"}
        assert all(c["pass"] == 2 for c in dim["by_variant"].values())
        assert set(dim["by_persona"]) == {"impatient", "confused_novice"}
        assert all(c["pass"] == 2 for c in dim["by_persona"].values())
    assert (out / "report.html").is_file()
    assert str(out / "report.html") in result.stdout


# -- transcripts ----------------------------------------------------------------------------------


def test_transcript_holds_every_exchanged_message_in_order(fake, write_matrix, tmp_path, open_run):
    topics = [
        {"name": "fractions", "opening": "Why isn't 1/2 + 1/3 equal to 2/5?", "reference": "5/6"},
        {"name": "equations", "opening": "How do I solve 3x + 5 = 20?", "reference": "x = 5"},
    ]
    matrix = base_matrix(fake.base_url, topics=topics, max_turns=3)
    matrix["tutor"]["variants"] = {"socratic": matrix["tutor"]["variants"]["socratic"]}
    result, out, _ = _run(write_matrix, tmp_path, matrix)
    assert result.exit_code == 0, result.output

    run = open_run(out)
    transcripts = run.transcripts()
    topic_of = {s["session_id"]: s["topic"] for s in run.sessions()}
    assert set(transcripts) == set(topic_of)
    for session_id, transcript in transcripts.items():
        opening = next(t["opening"] for t in topics if t["name"] == topic_of[session_id])
        tutor_answers = [a for role, req, a in fake.exchanges if role == "tutor" and _opening_of(req) == opening]
        student_answers = [a for role, req, a in fake.exchanges if role == "student" and _opening_of(req) == opening]
        assert len(tutor_answers) == len(student_answers) == 3
        expected = [("student", opening)]
        for tutor, student in zip(tutor_answers, student_answers):
            expected += [("tutor", tutor), ("student", student)]
        # Opening, every tutor reply, every student reply -- including the one after the last tutor turn.
        assert transcript == expected

        # What each side was sent is the conversation so far, in order.
        tutor_requests = [r for r in fake.requests_of("tutor") if _opening_of(r) == opening]
        last = [(m["role"], m["content"]) for m in tutor_requests[-1]["messages"][1:]]
        assert last == [("user" if r == "student" else "assistant", c) for r, c in expected[:-2]]
        student_requests = [r for r in fake.requests_of("student") if _opening_of(r) == opening]
        last = [(m["role"], m["content"]) for m in student_requests[-1]["messages"][1:]]
        assert last == [("assistant" if r == "student" else "user", c) for r, c in expected[:-1]]


def test_student_stop_signal_ends_session(make_fake, write_matrix, tmp_path, open_run):
    def student(request: dict) -> str:
        turn = sum(1 for m in request["messages"] if m["role"] == "user")
        return "Oh, 3/6 + 2/6 = 5/6, I get it now. [END]" if turn == 2 else f"Student reply {turn}: is it 2/5?"

    fake = make_fake(student=student)
    matrix = base_matrix(fake.base_url, max_turns=3)
    matrix["tutor"]["variants"] = {"socratic": matrix["tutor"]["variants"]["socratic"]}
    result, out, _ = _run(write_matrix, tmp_path, matrix)
    assert result.exit_code == 0, result.output

    run = open_run(out)
    (session,) = run.sessions()
    assert session["status"] == "completed"
    assert session["stop_reason"] == "student_stop"
    assert session["turns"] == 2
    assert fake.roles["tutor"] == 2 and fake.roles["student"] == 2
    (transcript,) = run.transcripts().values()
    assert len(transcript) == 5
    assert transcript[-1] == ("student", "Oh, 3/6 + 2/6 = 5/6, I get it now.")
    assert not any("[END]" in content for _, content in transcript)


# -- judges ---------------------------------------------------------------------------------------


def test_unparseable_judge_answer_is_an_error_not_a_verdict(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake(judge_reply=lambda prompt, labels: "not json")
    matrix = base_matrix(fake.base_url)
    matrix["judges"]["use"] = ["coherence"]
    result, out, _ = _run(write_matrix, tmp_path, matrix)
    # nothing was judged: the run could not do its job (exit 3, with the first reason); the report is written
    assert result.exit_code == 3, result.output
    assert "every judgement errored" in result.output and "JSONDecodeError" in result.output

    run = open_run(out)
    judgements = run.judgements()
    assert len(judgements) == 2
    for j in judgements:
        assert j["status"] == "error"
        assert j["error"]  # a reason
        assert j["label"] is None and j["passed"] is None
    assert fake.roles["judge"] >= 2

    overall = run.summary()["dimensions"]["coherence"]["overall"]
    assert overall["error"] == 2
    assert overall["pass"] == 0 and overall["fail"] == 0 and overall["judged"] == 0
    assert overall["fail_rate"] is None
    for counts in run.summary()["dimensions"]["coherence"]["by_variant"].values():
        assert counts["error"] == 1 and counts["pass"] == counts["fail"] == 0


def test_judges_fail_skip_and_keep_braces(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake(judge_label=lambda prompt, labels: FAILING[judge_name(prompt)])
    braces = "What is {x} plus {{y}} when x = 1/2 and y = 1/3?"
    topics = [
        {"name": "braces", "opening": braces, "reference": "5/6"},
        {"name": "no reference", "opening": "How do I solve 3x + 5 = 20?"},
    ]
    matrix = base_matrix(fake.base_url, topics=topics)
    matrix["tutor"]["variants"] = {"socratic": matrix["tutor"]["variants"]["socratic"]}
    result, out, _ = _run(write_matrix, tmp_path, matrix)
    assert result.exit_code == 0, result.output

    run = open_run(out)
    topic_of = {s["session_id"]: s["topic"] for s in run.sessions()}
    verdicts = {(topic_of[j["session_id"]], j["judge"]): j for j in run.judgements()}
    assert set(verdicts) == {("braces", "coherence"), ("braces", "correctness"),
                             ("no reference", "coherence"), ("no reference", "correctness")}

    skipped = verdicts[("no reference", "correctness")]
    assert skipped["status"] == "skipped" and "reference" in skipped["error"]
    assert skipped["label"] is None and skipped["passed"] is None
    for key in (("braces", "coherence"), ("braces", "correctness"), ("no reference", "coherence")):
        j = verdicts[key]
        assert j["status"] == "ok" and j["passed"] == 0
        assert j["label"] == FAILING[key[1]]

    dims = run.summary()["dimensions"]
    assert dims["correctness"]["overall"] == {**dims["correctness"]["overall"],
                                              "pass": 0, "fail": 1, "skipped": 1, "error": 0, "judged": 1}
    assert dims["correctness"]["overall"]["fail_rate"] == 1.0
    assert dims["coherence"]["overall"]["fail"] == 2 and dims["coherence"]["overall"]["pass"] == 0
    assert dims["correctness"]["by_topic"]["no reference"]["skipped"] == 1
    # The run's closing lines say the same counts, each in words.
    assert re.search(r"correctness +fail rate 100%  \(1 failed of 1 judged; 0 error, 1 skipped\)", result.output)
    assert re.search(r"coherence +fail rate 100%  \(2 failed of 2 judged; 0 error, 0 skipped\)", result.output)

    # The judges read the transcript with its braces intact, and the skipped judge was never asked.
    prompts = ["\n".join(str(m["content"]) for m in r["messages"]) for r in fake.requests_of("judge")]
    with_braces = [p for p in prompts if braces in p]
    assert {judge_name(p) for p in with_braces} == {"coherence", "correctness"}
    assert all(f"Student: {braces}" in p for p in with_braces)
    correctness_prompts = [p for p in prompts if judge_name(p) == "correctness"]
    assert len(correctness_prompts) == 1 and braces in correctness_prompts[0]


# -- report and resume ----------------------------------------------------------------------------


def test_report_command_rebuilds_without_model_calls(fake, write_matrix, tmp_path, open_run):
    result, out, _ = _run(write_matrix, tmp_path, base_matrix(fake.base_url))
    assert result.exit_code == 0, result.output
    before = json.loads((out / "summary.json").read_text())
    calls = fake.chat_calls
    (out / "summary.json").unlink()
    (out / "report.html").unlink()

    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    assert fake.chat_calls == calls
    assert (out / "report.html").is_file()
    assert json.loads((out / "summary.json").read_text()) == before
    assert "2 planned, 2 completed" in result.stdout


def test_report_open_hands_the_file_to_a_browser_or_says_there_is_none(fake, write_matrix, tmp_path):
    result, out, _ = _run(write_matrix, tmp_path, base_matrix(fake.base_url))
    assert result.exit_code == 0, result.output
    recorder = tmp_path / "browser.py"
    recorder.write_text("import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])\n", encoding="utf-8")
    opened = tmp_path / "opened.txt"
    # webbrowser reads its environment once per process, so each case is a process of its own; no
    # display and a PATH without browsers, so only $BROWSER can answer.
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
    env["PATH"] = str(Path(sys.executable).parent)
    command = [sys.executable, "-m", "simbench", "report", str(out), "--open"]

    with_browser = subprocess.run(command, env={**env, "BROWSER": f"{sys.executable} {recorder} {opened} %s"},
                                  capture_output=True, text=True, timeout=120)
    assert with_browser.returncode == 0, with_browser.stderr
    assert opened.read_text() == (out / "report.html").resolve().as_uri()
    assert "no browser" not in with_browser.stderr

    without = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert without.returncode == 0, without.stderr
    assert f"no browser to open it here; open {out / 'report.html'} yourself" in without.stderr


def test_report_on_a_directory_without_a_run_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("report", tmp_path / "empty")
    assert result.exit_code == 2
    assert "run.sqlite" in result.stderr


def test_resume_of_a_finished_run_makes_no_new_sessions(fake, write_matrix, tmp_path, open_run):
    result, out, path = _run(write_matrix, tmp_path, base_matrix(fake.base_url))
    assert result.exit_code == 0, result.output
    sessions = open_run(out).sessions()
    calls = fake.chat_calls

    result = run_cli(path, out, "--resume", "--cache", tmp_path / "cache.sqlite")
    assert result.exit_code == 0, result.output
    assert fake.chat_calls == calls
    assert open_run(out).sessions() == sessions
    assert json.loads((out / "summary.json").read_text())["sessions"]["completed"] == 2


def test_resume_with_a_changed_matrix_exits_2(fake, write_matrix, tmp_path, open_run):
    result, out, path = _run(write_matrix, tmp_path, base_matrix(fake.base_url))
    assert result.exit_code == 0, result.output
    sessions = open_run(out).sessions()
    calls = fake.chat_calls

    changed = write_matrix(base_matrix(fake.base_url, max_turns=3), "changed.yaml")
    result = run_cli(changed, out, "--resume", "--cache", tmp_path / "cache.sqlite")
    assert result.exit_code == 2
    assert "changed" in result.stderr
    assert fake.chat_calls == calls
    assert open_run(out).sessions() == sessions


def test_new_run_into_an_existing_run_dir_exits_2(fake, write_matrix, tmp_path):
    result, out, path = _run(write_matrix, tmp_path, base_matrix(fake.base_url))
    assert result.exit_code == 0, result.output
    calls = fake.chat_calls
    result = run_cli(path, out, "--cache", tmp_path / "cache.sqlite")
    assert result.exit_code == 2
    assert fake.chat_calls == calls


def test_resume_reruns_an_unfinished_session_as_a_new_attempt(fake, write_matrix, tmp_path, open_run):
    matrix = base_matrix(fake.base_url, max_turns=2)
    result, out, path = _run(write_matrix, tmp_path, matrix)
    assert result.exit_code == 0, result.output
    first = open_run(out).sessions()
    killed = first[0]
    # What a kill mid-session leaves behind: the row still 'running', no verdicts.
    db = sqlite3.connect(out / "run.sqlite")
    db.execute("UPDATE sessions SET status = 'running', stop_reason = NULL WHERE session_id = ?", (killed["session_id"],))
    db.execute("DELETE FROM evaluations WHERE session_id = ?", (killed["session_id"],))
    db.commit()
    db.close()
    tutor_calls = fake.roles["tutor"]

    result = run_cli(path, out, "--resume", "--no-cache")
    assert result.exit_code == 0, result.output
    assert fake.roles["tutor"] - tutor_calls == 2  # only the unfinished sample ran again

    run = open_run(out)
    retried = [s for s in run.sessions() if s["sample_id"] == killed["sample_id"]]
    assert [s["attempt"] for s in retried] == [1, 2]
    new_id = f"{run.run_id}/{killed['sample_id']}/2"
    assert retried[1]["session_id"] == new_id and retried[1]["status"] == "completed"
    # The retry's spans are its own: a full transcript, not mixed with the killed attempt's.
    transcripts = run.transcripts()
    assert len(transcripts[new_id]) == 1 + 2 * 2
    assert {j["session_id"] for j in run.judgements()} >= {new_id}
    summary = run.summary()["sessions"]
    assert summary["planned"] == 2 and summary["completed"] == 2 and summary["superseded_attempts"] == 1


# -- judging beside the simulation ----------------------------------------------------------------


def test_sessions_are_judged_while_the_rest_are_simulated(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake(latency=0.05)
    # one session at a time, six of them: the first is judged long before the last one ends
    result, out, _ = _run(write_matrix, tmp_path, base_matrix(fake.base_url, repeats=3, concurrency=1), "run",
                          "--no-cache")
    assert result.exit_code == 0, result.output
    run = open_run(out)
    sessions = run.sessions()
    judgements = run.judgements()
    assert len(sessions) == 6 and all(s["status"] == "completed" for s in sessions)
    first_session = min(sessions, key=lambda s: s["ended_at"])
    first_verdict = min(j["created_at"] for j in judgements if j["session_id"] == first_session["session_id"])
    assert first_verdict < max(s["ended_at"] for s in sessions)
    # every session judged once by each judge: no judgement asked twice, none left out
    assert len(judgements) == 6 * 2 and {j["status"] for j in judgements} == {"ok"}
    assert fake.roles["judge"] == 6 * 2


def test_judges_share_the_embedded_server_only_after_the_simulation(fake, write_matrix):
    from simbench.matrix import load_matrix
    from simbench.pipeline import judges_alongside

    def alongside(**roles: str) -> bool:
        matrix = base_matrix(fake.base_url)
        matrix["models"]["local"] = {"provider": "local"}
        for role, model in roles.items():
            matrix[role]["model"] = model
        return judges_alongside(load_matrix(write_matrix(matrix)))

    assert alongside()  # every role on a remote model
    assert alongside(judges="local") and alongside(tutor="local", student="local")  # one side local
    assert not alongside(tutor="local", judges="local") and not alongside(student="local", judges="local")


def test_a_resumed_run_judges_the_sessions_it_completed_before(fake, write_matrix, tmp_path, open_run):
    from simbench.matrix import load_matrix
    from simbench.pipeline import run_matrix

    path = write_matrix(base_matrix(fake.base_url))
    out = tmp_path / "run"
    run_matrix(load_matrix(path), out, progress=False, judge=False)
    assert open_run(out).judgements() == []
    tutor_calls = fake.roles["tutor"]

    result = run_cli(path, out, "--resume", "--no-cache")
    assert result.exit_code == 0, result.output
    assert fake.roles["tutor"] == tutor_calls  # nothing simulated again
    judgements = open_run(out).judgements()
    assert len(judgements) == 2 * 2 and {j["status"] for j in judgements} == {"ok"}


# -- the Python API where an event loop already runs (a notebook) ---------------------------------


def test_run_matrix_runs_inside_a_running_event_loop(fake, write_matrix, tmp_path, open_run):
    """A notebook cell calls run_matrix with the notebook's loop running in its thread, where
    asyncio.run alone refuses ("cannot be called from a running event loop")."""
    from simbench import load_matrix, run_matrix

    matrix = load_matrix(write_matrix(base_matrix(fake.base_url)))

    async def notebook_cell():
        # str paths, as in the README's example
        return run_matrix(matrix, str(tmp_path / "run"), cache_path=str(tmp_path / "cache.sqlite"), progress=False)

    outcome = asyncio.run(notebook_cell())
    assert outcome.report_path == tmp_path / "run" / "report.html" and outcome.report_path.is_file()
    sessions = outcome.summary["sessions"]
    assert sessions["planned"] == 2 and sessions["completed"] == 2 and sessions["errored"] == 0
    run = open_run(tmp_path / "run")
    assert {j["status"] for j in run.judgements()} == {"ok"} and len(run.judgements()) == 2 * 2
    assert fake.roles["tutor"] > 0 and fake.roles["judge"] == 2 * 2


def test_an_interrupted_wait_cancels_the_coroutine_on_its_thread():
    """The notebook's stop button (KeyboardInterrupt in the waiting thread) must stop the run's
    coroutine, not leave it calling models on its own thread."""
    from simbench.aio import run_async

    seen: dict[str, object] = {}

    async def run_for_ever():
        seen["thread"] = threading.current_thread()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise

    async def notebook_cell():
        threading.Timer(0.3, _thread.interrupt_main).start()
        return run_async(run_for_ever())

    # A loop run as a notebook kernel runs it: a SIGINT raises KeyboardInterrupt in the waiting thread.
    # (asyncio.run's own SIGINT handler would only cancel the blocked cell.)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(notebook_cell())
    finally:
        loop.close()
    assert seen["cancelled"] is True
    assert seen["thread"] is not threading.main_thread()


def test_a_notebook_run_interrupted_stops_calling_and_resumes(make_fake, write_matrix, tmp_path, open_run):
    """Interrupting a notebook's run_matrix: RunInterrupted names the run, no model call follows, and
    resuming it finishes every session."""
    from simbench import load_matrix, run_matrix
    from simbench.pipeline import RunInterrupted

    fake = make_fake(latency=0.4)
    matrix = load_matrix(write_matrix(base_matrix(fake.base_url, max_turns=3)))
    run_dir, cache = tmp_path / "run", tmp_path / "cache.sqlite"

    async def notebook_cell():
        threading.Timer(1.0, _thread.interrupt_main).start()
        return run_matrix(matrix, run_dir, cache_path=cache, progress=False)

    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RunInterrupted) as interrupted:
            loop.run_until_complete(notebook_cell())
    finally:
        loop.close()
    assert interrupted.value.run_dir == run_dir
    calls = fake.chat_calls
    assert calls > 0  # it had started calling
    time.sleep(1.5)
    assert fake.chat_calls == calls, "the run went on calling models after the interrupt"
    assert sum(1 for x in open_run(run_dir).sessions() if x["status"] == "completed") < 2

    outcome = run_matrix(matrix, run_dir, resume=True, cache_path=cache, progress=False)
    assert outcome.summary["sessions"]["completed"] == 2 and outcome.summary["sessions"]["errored"] == 0
