"""The session rebuild takes one turn per trace root (issue 11): a turn that holds several LLM calls
rebuilds to one student/tutor pair, its tool calls stay on the turn and reach judges as
``{tool_calls}``, an ERROR root is left out, and older span shapes (one ChatCompletion root per turn,
imported transcripts) rebuild as they did.

Runs go through the real CLI on the fake OpenAI server; the rebuild reads the run's own SQLite file.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import textwrap
import uuid
from pathlib import Path

import pandas as pd
import pytest

from conftest import base_matrix, invoke, run_cli
from simbench.evaluators.sessions import rebuild_sessions
from simbench.matrix import MatrixError, load_matrix
from simbench.records import NO_TOOL_CALLS, ToolUse
from simbench.store import RunStore
from simbench.tracing.local import spans_dataframe

STAGES = ("retrieve", "rewrite", "answer")

# A callable tutor whose every turn makes three model calls (retrieval, rewriting, answering), each
# an LLM span under the turn's root, and returns the tools it used. It logs what it saw and said.
THREE_CALLS = """
    import json, os, openai

    def reply(messages, context):
        client = openai.OpenAI(base_url=context.model.base_url, api_key=context.model.api_key, max_retries=0)

        def ask(stage, content):
            answer = client.chat.completions.create(model=context.model.model, max_tokens=32, messages=[
                {"role": "system", "content": "stage " + stage}, {"role": "user", "content": content}])
            return answer.choices[0].message.content

        question = messages[-1]["content"]
        notes = ask("retrieve", question)
        rewritten = ask("rewrite", question)
        text = ask("answer", "[%s] turn %d: %s" % (context.variant, context.turn, rewritten))
        if context.variant == "plain" and context.turn == int(os.environ.get("FAIL_AT_TURN", "0")):
            raise RuntimeError("the tutor broke after its model calls")
        with open(os.environ["TURN_LOG"], "a") as f:
            f.write(json.dumps({"session_id": context.session_id, "turn": context.turn,
                                "messages": messages, "text": text}) + "\\n")
        tools = []
        if context.settings["tools"]:
            tools = [{"name": "lookup_notes", "arguments": {"query": "turn %d" % context.turn}, "result": notes},
                     {"name": "calculator", "arguments": {"expression": "1/2+1/3"},
                      "result": "5/6 {not a variable} <script>alert(1)</script>"}]
        return {"text": text, "tool_calls": tools}
"""

TOOLS_JUDGE = {
    "prompt": "TOOLS-CHECK Did the tutor use its tools well?\n{transcript}\nTools used:\n{tool_calls}\n"
              'Answer "good" or "poor".',
    "choices": {"good": 1, "poor": 0},
}
TURN_TOOLS_JUDGE = {
    "scope": "turn",
    "prompt": "TURN-TOOLS Was this reply's tool use right?\nReply: {reply}\nTools:\n{tool_calls}\n"
              'Answer "good" or "poor".',
    "choices": {"good": 1, "poor": 0},
}


def _stage_tutor(request: dict) -> str:
    """The fake model's answer to each stage: names the stage and echoes the start of the question."""
    stage = request["messages"][0]["content"].removeprefix("stage ")
    return f"{stage} says: {request['messages'][-1]['content'][:60]}"


def _three_call_run(make_fake, write_matrix, tmp_path, monkeypatch, *, judges=None, fail_at_turn=0):
    """A run of the THREE_CALLS tutor (variants ``tools`` and ``plain``, 3 turns); returns (run dir, fake)."""
    monkeypatch.setenv("TURN_LOG", str(tmp_path / "turns.jsonl"))
    monkeypatch.setenv("FAIL_AT_TURN", str(fail_at_turn))
    name = f"three_calls_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(THREE_CALLS), encoding="utf-8")
    fake = make_fake(tutor=_stage_tutor)
    matrix = base_matrix(fake.base_url, max_turns=3)
    matrix["tutor"] = {"kind": "callable", "callable": f"{name}:reply", "model": "fake", "baseline": "tools",
                       "max_retries": 0, "variants": {"tools": {"settings": {"tools": True}},
                                                      "plain": {"settings": {"tools": False}}}}
    if judges:
        matrix["judges"] = {"model": "fake", "max_tokens": 64, "use": list(judges), "custom": judges}
    out = tmp_path / "run"
    result = run_cli(write_matrix(matrix), out, "--no-cache")
    assert result.exit_code == 0, result.output
    return out, fake


def _turn_log(tmp_path: Path) -> dict[str, list[dict]]:
    """session id -> what the callable saw and answered, turn by turn."""
    log: dict[str, list[dict]] = {}
    for line in (tmp_path / "turns.jsonl").read_text().splitlines():
        entry = json.loads(line)
        log.setdefault(entry["session_id"], []).append(entry)
    return {sid: sorted(turns, key=lambda t: t["turn"]) for sid, turns in log.items()}


def _span_frame(run_dir: Path):
    store = RunStore.open_run_dir(run_dir)
    try:
        return spans_dataframe(store)
    finally:
        store.close()


def _transcripts(run_dir: Path) -> dict:
    return {t.session_id: t for t in rebuild_sessions(_span_frame(run_dir))}


def _prompt_of(request: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in request["messages"])


def test_a_turn_of_three_llm_calls_rebuilds_to_one_message_pair(make_fake, write_matrix, tmp_path, open_run,
                                                                 monkeypatch):
    out, fake = _three_call_run(make_fake, write_matrix, tmp_path, monkeypatch)
    run = open_run(out)
    sessions = {f"{run.run_id}/{s['sample_id']}/{s['attempt']}": s for s in run.sessions()}
    assert len(sessions) == 2 and all(s["status"] == "completed" and s["turns"] == 3 for s in sessions.values())
    # The premise: every turn is one trace, its root the tutor.turn span, the three LLM calls under it.
    spans = run.spans()
    turn_spans = {s["span_id"]: s for s in spans if s["name"] == "tutor.turn"}
    llm = [s for s in spans if s["span_kind"] == "LLM"]
    assert len(turn_spans) == 6 and len(llm) == 18 == len(fake.requests_of("tutor"))
    assert all(s["parent_id"] in turn_spans for s in llm)

    log = _turn_log(tmp_path)
    closing = {s["session_id"]: s["attributes"].get("input.value") for s in spans if s["name"] == "session.end"}
    rebuilt = _transcripts(out)
    assert set(rebuilt) == set(sessions) == set(log)
    for session_id, transcript in rebuilt.items():
        last = log[session_id][-1]
        # the run's own conversation: what the tutor saw at its last turn, its reply, the student's last word
        expected = [("student" if m["role"] == "user" else "tutor", m["content"]) for m in last["messages"]]
        expected += [("tutor", last["text"]), ("student", closing[session_id])]
        assert [(m.role, m.content) for m in transcript.messages] == expected
        assert [m.role for m in transcript.messages] == ["student", "tutor"] * 3 + ["student"]
        # no retrieval or rewriting output became a turn, no turn came twice
        assert all(m.content.startswith("answer says:") for m in transcript.messages if m.role == "tutor")
        assert len({m.content for m in transcript.messages if m.role == "tutor"}) == 3
        own_turns = sorted((s for s in turn_spans.values() if s["session_id"] == session_id),
                           key=lambda s: s["start_time"])
        assert transcript.turn_span_ids == [s["span_id"] for s in own_turns]
        assert transcript.span_id == own_turns[0]["span_id"]
        assert transcript.metadata["variant"] == sessions[session_id]["variant"]
    assert run.transcripts() == {sid: [(m.role, m.content) for m in t.messages] for sid, t in rebuilt.items()}


def test_tool_calls_reach_the_transcript_and_the_judges_tool_calls_column(make_fake, write_matrix, tmp_path,
                                                                          open_run, monkeypatch):
    judges = {"tool_use": TOOLS_JUDGE, "turn_tool_use": TURN_TOOLS_JUDGE}
    out, fake = _three_call_run(make_fake, write_matrix, tmp_path, monkeypatch, judges=judges)
    run = open_run(out)
    variant_of = {f"{run.run_id}/{s['sample_id']}/{s['attempt']}": s["variant"] for s in run.sessions()}
    log = _turn_log(tmp_path)
    rebuilt = _transcripts(out)
    for session_id, transcript in rebuilt.items():
        replies = [m for m in transcript.messages if m.role == "tutor"]
        if variant_of[session_id] == "plain":
            assert all(m.tool_calls == () for m in transcript.messages)
            continue
        for turn, message in enumerate(replies, start=1):
            notes = next(r for r in fake.exchanges if r[0] == "tutor" and r[2].startswith("retrieve says:")
                         and r[1]["messages"][-1]["content"] == log[session_id][turn - 1]["messages"][-1]["content"])[2]
            assert message.tool_calls == (
                ToolUse("lookup_notes", json.dumps({"query": f"turn {turn}"}), notes),
                ToolUse("calculator", json.dumps({"expression": "1/2+1/3"}),
                        "5/6 {not a variable} <script>alert(1)</script>"))
        assert all(m.tool_calls == () for m in transcript.messages if m.role == "student")

    # What the session judge received: every turn's calls, one line each, braces kept literally.
    prompts = [_prompt_of(r) for r in fake.requests_of("judge") if "TOOLS-CHECK" in _prompt_of(r)]
    assert len(prompts) == 2
    for session_id, transcript in rebuilt.items():
        [prompt] = [p for p in prompts if f"[{variant_of[session_id]}] turn 1" in p]
        tools_text = prompt.split("Tools used:\n", 1)[1].split("\nAnswer", 1)[0]
        if variant_of[session_id] == "plain":
            assert tools_text == NO_TOOL_CALLS
            continue
        lines = tools_text.splitlines()
        assert len(lines) == 6
        for turn in (1, 2, 3):
            calls = transcript.messages[2 * turn - 1].tool_calls
            assert lines[2 * turn - 2] == f'Turn {turn}: lookup_notes({{"query": "turn {turn}"}}) -> {calls[0].result}'
            assert lines[2 * turn - 1] == (f'Turn {turn}: calculator({{"expression": "1/2+1/3"}}) -> '
                                           "5/6 {not a variable} <script>alert(1)</script>")
    # A per-turn judge reads its own turn's calls only.
    turn_prompts = [_prompt_of(r) for r in fake.requests_of("judge") if "TURN-TOOLS" in _prompt_of(r)]
    assert len(turn_prompts) == 6
    for prompt in turn_prompts:
        tools_text = prompt.split("Tools:\n", 1)[1].split("\nAnswer", 1)[0]
        turn = int(prompt.split("] turn ", 1)[1][0])
        if "[plain]" in prompt:
            assert tools_text == NO_TOOL_CALLS
        else:
            assert [line.split(":", 1)[0] for line in tools_text.splitlines()] == [f"Turn {turn}"] * 2
    assert {(j["judge"], j["status"]) for j in run.judgements()} == {("tool_use", "ok"), ("turn_tool_use", "ok")}
    # The report shows each call under its reply, as text.
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('<div class="tool-call">') == 6
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert(1)" not in html


def test_tool_spans_round_trip_through_a_copy_of_the_span_frame(make_fake, write_matrix, tmp_path, monkeypatch):
    """``simbench judge --store`` keeps a copy of the spans it judged (``add_span_frame``): the tool
    columns survive it, so the copy rebuilds the same tool calls."""
    from simbench.tracing.local import SPAN_COLUMNS, add_span_frame

    out, _ = _three_call_run(make_fake, write_matrix, tmp_path, monkeypatch)
    source, copy = RunStore.open_run_dir(out), RunStore(tmp_path / "copy.sqlite")
    try:
        frame = spans_dataframe(source)
        add_span_frame(copy, frame)
        again = spans_dataframe(copy)
    finally:
        source.close()
        copy.close()
    tools = ["context.span_id", "attributes.tool.name", "attributes.tool.parameters", "attributes.simbench.tool_call",
             "attributes.output.value"]
    assert set(tools) <= set(SPAN_COLUMNS)
    mine = frame[frame["span_kind"] == "TOOL"][tools].sort_values("context.span_id", ignore_index=True)
    theirs = again[again["span_kind"] == "TOOL"][tools].sort_values("context.span_id", ignore_index=True)
    assert len(mine) == 6 and mine["attributes.simbench.tool_call"].tolist() == [True] * 6
    pd.testing.assert_frame_equal(mine, theirs)
    rebuilt = rebuild_sessions(again)
    assert rebuilt == rebuild_sessions(frame)
    assert sum(len(m.tool_calls) for t in rebuilt for m in t.messages) == 6


def test_the_tool_calls_variable_is_validated_like_the_others(fake, write_matrix):
    matrix = base_matrix(fake.base_url)
    matrix["judges"]["custom"] = {"tool_use": TOOLS_JUDGE}
    matrix["judges"]["use"] = ["tool_use"]
    assert invoke("validate", write_matrix(matrix)).exit_code == 0
    matrix["judges"]["custom"] = {"tool_use": {**TOOLS_JUDGE, "prompt": TOOLS_JUDGE["prompt"].replace("tool_calls", "tools")}}
    with pytest.raises(MatrixError) as info:
        load_matrix(write_matrix(matrix, "typo.yaml"))
    assert "unknown variable(s) {tools}" in str(info.value) and "{tool_calls}" in str(info.value)


def test_an_error_root_is_left_out_with_the_calls_under_it(make_fake, write_matrix, tmp_path, open_run, monkeypatch):
    out, fake = _three_call_run(make_fake, write_matrix, tmp_path, monkeypatch, fail_at_turn=2)  # variant plain
    run = open_run(out)
    status = {f"{run.run_id}/{s['sample_id']}/{s['attempt']}": (s["variant"], s["status"]) for s in run.sessions()}
    assert sorted(status.values()) == [("plain", "errored"), ("tools", "completed")]
    spans = run.spans()
    [failed] = [s for s in spans if s["name"] == "tutor.turn" and s["status_code"] == "ERROR"]
    # turn 2 of the plain session failed after its three model calls succeeded under it
    assert sum(1 for s in spans if s["parent_id"] == failed["span_id"] and s["status_code"] == "OK") == 3
    log = _turn_log(tmp_path)
    rebuilt = _transcripts(out)
    errored = failed["session_id"]
    assert status[errored] == ("plain", "errored")
    [first] = log[errored]
    assert [(m.role, m.content) for m in rebuilt[errored].messages] == [
        ("student", first["messages"][0]["content"]), ("tutor", first["text"]),
        ("student", failed["attributes"]["input.value"])]  # the message turn 2 never answered, from session.end
    assert len(rebuilt[errored].turn_span_ids) == 1 and failed["span_id"] not in rebuilt[errored].turn_span_ids
    [completed] = [sid for sid in rebuilt if sid != errored]
    assert [m.role for m in rebuilt[completed].messages] == ["student", "tutor"] * 3 + ["student"]


# -- older and foreign span shapes ----------------------------------------------------------------


@pytest.fixture
def prompt_run(fake, write_matrix, tmp_path):
    """A finished run of the prompt tutor: each turn a tutor.turn root over one ChatCompletion."""
    out = tmp_path / "run"
    assert run_cli(write_matrix(base_matrix(fake.base_url, max_turns=3)), out, "--no-cache").exit_code == 0
    return out


def _as_older_run(run_dir: Path, copy: Path) -> Path:
    """The run's file as a run recorded before turn spans wrote it: no tutor.turn spans, each
    ChatCompletion the root of its own trace."""
    copy.mkdir()
    shutil.copy(run_dir / "run.sqlite", copy / "run.sqlite")
    db = sqlite3.connect(copy / "run.sqlite")
    with db:
        db.execute("UPDATE spans SET parent_id = NULL WHERE name = 'ChatCompletion'")
        db.execute("DELETE FROM spans WHERE name = 'tutor.turn'")
    db.close()
    return copy


def test_older_runs_with_one_chat_completion_root_per_turn_rebuild_the_same(prompt_run, tmp_path):
    now = _transcripts(prompt_run)
    older_dir = _as_older_run(prompt_run, tmp_path / "older")
    older = _transcripts(older_dir)
    assert len(now) == 2 and set(older) == set(now)
    frame = _span_frame(older_dir)
    assert set(frame["name"]) == {"ChatCompletion", "session.end"} and frame["parent_id"].isna().all()
    chat = frame[frame["name"] == "ChatCompletion"].sort_values("start_time")
    for session_id, transcript in now.items():
        assert len(transcript.messages) == 7
        assert older[session_id].messages == transcript.messages
        assert older[session_id].metadata == transcript.metadata
        # the turn spans of an older run are its ChatCompletion roots
        own = chat[chat["attributes.session.id"] == session_id]
        assert older[session_id].turn_span_ids == list(own["context.span_id"]) != transcript.turn_span_ids


def test_a_turn_root_under_a_remote_parent_or_without_values_rebuilds_the_same(prompt_run):
    frame = _span_frame(prompt_run)
    expected = {t.session_id: t for t in rebuild_sessions(frame)}
    turns = frame["name"] == "tutor.turn"
    # an app's turn spans under a span of a caller that is not in the store (a remote parent)
    remote = frame.copy()
    remote.loc[turns, "parent_id"] = "feedfacefeedface"
    assert {t.session_id: t for t in rebuild_sessions(remote)} == expected
    # a root without input/output values: its own chat messages give the turn
    bare = frame.copy()
    bare.loc[turns, ["attributes.input.value", "attributes.output.value"]] = None
    assert {t.session_id: t for t in rebuild_sessions(bare)} == expected
    # an LLM span that is not a root (the answer under a turn span) is never a turn of its own
    assert all(len(t.turn_span_ids) == 3 and set(t.turn_span_ids) <= set(frame.loc[turns, "context.span_id"])
               for t in expected.values())


def test_imported_transcripts_rebuild_message_for_message(fake, write_matrix, tmp_path, open_run):
    conversations = {
        "ends-with-student": [("user", "Why isn't 1/2 + 1/3 equal to 2/5?"), ("assistant", "Find a common denominator."),
                              ("user", "So 5/6?"), ("assistant", "Exactly."), ("user", "Thanks!")],
        "ends-with-tutor": [("user", "What is 2/3 of 9?"), ("assistant", "Multiply 9 by 2, divide by 3: 6.")],
    }
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"session_id": sid, "messages": [{"role": r, "content": c} for r, c in ms]}) + "\n"
                            for sid, ms in conversations.items()), encoding="utf-8")
    matrix = base_matrix(fake.base_url, judges={"model": "fake", "use": ["coherence"], "max_tokens": 64})
    result = invoke("judge", "--transcripts", path, "--matrix", write_matrix(matrix), "--out", tmp_path / "judged",
                    "-q", "--no-cache")
    assert result.exit_code == 0, result.output
    run = open_run(tmp_path / "judged")
    source = {r["session_id"]: r["source_id"] for r in run.rows("SELECT session_id, source_id FROM imported_sessions")}
    rebuilt = _transcripts(tmp_path / "judged")
    assert {source[sid] for sid in rebuilt} == set(conversations)
    turn_spans = {s["span_id"] for s in run.spans() if s["name"] == "imported.turn"}
    for session_id, transcript in rebuilt.items():
        roles = {"user": "student", "assistant": "tutor"}
        assert [(m.role, m.content) for m in transcript.messages] == \
            [(roles[r], c) for r, c in conversations[source[session_id]]]
        assert len(transcript.turn_span_ids) == sum(r == "assistant" for r, _ in conversations[source[session_id]])
        assert set(transcript.turn_span_ids) <= turn_spans
    assert fake.roles["judge"] == 2


def test_a_span_whose_parent_the_store_left_out_stays_in_its_turn(prompt_run):
    """An app's span without a session id is not in the session's spans, so its children look
    parentless-by-omission: in a trace that has a root, they belong to that root's turn."""
    frame = _span_frame(prompt_run)
    expected = {t.session_id: t for t in rebuild_sessions(frame)}
    orphaned = frame.copy()
    chat = orphaned["name"] == "ChatCompletion"
    orphaned.loc[chat, "parent_id"] = "0123456789abcdef"  # a span the store did not return
    assert chat.sum() == 6
    assert {t.session_id: t for t in rebuild_sessions(orphaned)} == expected
    assert all(len(t.turn_span_ids) == 3 for t in expected.values())
