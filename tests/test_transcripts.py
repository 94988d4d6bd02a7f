"""Imported transcripts: the JSONL format, line-numbered errors, judging them into a run and its report."""

from __future__ import annotations

import json

import pytest

from conftest import base_matrix, invoke
from fake_openai import judge_name
from simbench.evaluators.transcripts import TranscriptError, parse_transcripts

FRACTIONS_REF = "Use a common denominator: 3/6 + 2/6 = 5/6."


def session_line(session_id: str, *, messages=None, **extra) -> dict:
    line = {
        "session_id": session_id,
        "messages": messages or [
            {"role": "user", "content": "Why isn't 1/2 + 1/3 equal to 2/5?"},
            {"role": "assistant", "content": f"[{session_id}] Let's find a common denominator first."},
            {"role": "user", "content": "So 3/6 + 2/6 = 5/6?"},
            {"role": "assistant", "content": "Exactly."},
            {"role": "user", "content": "Thanks, got it."},
        ],
    }
    line.update(extra)
    return line


def write_jsonl(path, lines) -> str:
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")
    return str(path)


def judge_matrix(fake, write_matrix, **judges):
    matrix = base_matrix(fake.base_url)
    matrix["judges"].update(judges)
    return write_matrix(matrix, "judge.yaml")


# -- parsing --------------------------------------------------------------------------------------


def test_parse_keeps_turns_metadata_and_labels():
    lines = [
        json.dumps(session_line("a", metadata={"topic": "fractions", "persona": "impatient", "reference": FRACTIONS_REF,
                                               "goal": "adds fractions", "channel": "web"},
                                labels={"coherence": "good"})),
        "",
        json.dumps(session_line("b", messages=[
            {"role": "system", "content": "You are a tutor."},
            {"role": "assistant", "content": "Hi! What shall we study?"},
            {"role": "user", "content": "Fractions."},
            {"role": "user", "content": "Adding them."},
            {"role": "assistant", "content": "Sure."},
        ])),
    ]
    a, b = parse_transcripts(lines, "t.jsonl")
    assert (a.line, a.source_id, a.topic, a.persona, a.reference, a.goal) == (1, "a", "fractions", "impatient",
                                                                               FRACTIONS_REF, "adds fractions")
    assert a.labels == {"coherence": "good"} and a.extra == {"channel": "web"}
    assert [m.role for m in a.messages] == ["student", "tutor", "student", "tutor", "student"]
    # Line 3 (after a blank line): system dropped and counted, consecutive user messages joined.
    assert b.line == 3 and b.system_messages == 1
    assert [(m.role, m.content) for m in b.messages] == [
        ("tutor", "Hi! What shall we study?"), ("student", "Fractions.\n\nAdding them."), ("tutor", "Sure.")]
    assert (b.topic, b.persona, b.variant) == ("(none)", "(none)", "imported")


@pytest.mark.parametrize("bad, expected", [
    ("{not json", "t.jsonl:2: not valid JSON"),
    ('["a list"]', "t.jsonl:2: a session must be a JSON object"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), "t.jsonl:2: session_id: required field is missing"),
    (json.dumps(session_line("x", messages=[{"role": "bot", "content": "x"}])), "t.jsonl:2: messages[0].role:"),
    (json.dumps(session_line("x", messages=[{"role": "user", "content": "only the user"}])),
     "t.jsonl:2: messages: no assistant message"),
    (json.dumps(session_line("x", labels={"coherence": 3})), "t.jsonl:2: labels.coherence:"),
    (json.dumps(session_line("x", turns=[])), "t.jsonl:2: turns: unknown field"),
    (json.dumps(session_line("x", metadata={"variant": "a/b"})), "t.jsonl:2: metadata.variant:"),
    (json.dumps(session_line("first")), "t.jsonl:2: session_id: 'first' is already used on line 1"),
])
def test_every_malformed_line_is_named(bad, expected):
    with pytest.raises(TranscriptError) as caught:
        parse_transcripts([json.dumps(session_line("first")), bad, json.dumps(session_line("third"))], "t.jsonl")
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems
    assert len(caught.value.problems) == 1  # the good lines around it raise nothing


def test_all_problems_are_reported_not_just_the_first():
    with pytest.raises(TranscriptError) as caught:
        parse_transcripts(["{", json.dumps(session_line("ok")), "[]", "42"], "t.jsonl")
    assert [p.split(":")[1] for p in caught.value.problems] == ["1", "3", "4"]


def test_an_empty_file_is_an_error():
    with pytest.raises(TranscriptError, match="no sessions"):
        parse_transcripts(["", "  "], "t.jsonl")


def test_cli_rejects_a_malformed_file_before_any_model_call(fake, write_matrix, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [session_line("a"), "{oops"])
    result = invoke("judge", "--transcripts", path, "--matrix", judge_matrix(fake, write_matrix),
                    "--out", tmp_path / "run", "-q")
    assert result.exit_code == 2
    assert f"{path}:2: not valid JSON" in result.output
    assert fake.chat_calls == 0
    assert not (tmp_path / "run" / "run.sqlite").exists()


def test_judge_needs_something_to_judge():
    result = invoke("judge")
    assert result.exit_code == 2 and "--transcripts" in result.output


# -- judging ----------------------------------------------------------------------------------------


def test_judge_transcripts_end_to_end(make_fake, write_matrix, tmp_path, open_run):
    # The fake judge fails coherence for session "bad" only; correctness always passes.
    def label(prompt, labels):
        if judge_name(prompt) == "coherence" and "[bad]" in prompt:
            return "incoherent"
        return labels[0]

    fake = make_fake(judge_label=label)
    meta = {"topic": "adding fractions", "persona": "impatient", "reference": FRACTIONS_REF}
    path = write_jsonl(tmp_path / "t.jsonl", [
        session_line("good", metadata=meta),
        session_line("bad", metadata=meta),
        session_line("noref", metadata={"topic": "adding fractions", "persona": "curious"}),
    ])
    out = tmp_path / "run"
    result = invoke("judge", "--transcripts", path, "--matrix", judge_matrix(fake, write_matrix),
                    "--out", out, "-q", "--cache", tmp_path / "c.sqlite")
    assert result.exit_code == 0, result.output

    run = open_run(out)
    sessions = run.sessions()
    assert len(sessions) == 3 and all(s["status"] == "completed" and s["stop_reason"] == "imported" for s in sessions)
    # The judges read the conversations back from the trace store, whole.
    transcripts = run.transcripts()
    assert sorted(len(m) for m in transcripts.values()) == [5, 5, 5]
    assert all(m[-1] == ("student", "Thanks, got it.") for m in transcripts.values())
    origins = {r["session_id"]: r["source_id"] for r in run.rows("SELECT * FROM imported_sessions")}
    verdicts = {(origins[j["session_id"]], j["judge"]): (j["status"], j["label"]) for j in run.judgements()}
    assert verdicts == {
        ("good", "coherence"): ("ok", "coherent"), ("good", "correctness"): ("ok", "correct"),
        ("bad", "coherence"): ("ok", "incoherent"), ("bad", "correctness"): ("ok", "correct"),
        ("noref", "coherence"): ("ok", "coherent"),
        ("noref", "correctness"): ("skipped", None),  # no reference in its metadata: skipped, not a verdict
    }
    # The session's own reference reached the correctness judge's prompt.
    correctness_prompts = [json.dumps(r) for r in fake.requests_of("judge") if "reference answer" in json.dumps(r)]
    assert correctness_prompts and all("3/6 + 2/6 = 5/6" in p for p in correctness_prompts)

    summary = run.summary()
    assert summary["matrix_source"] == path
    assert summary["sessions"] == {"planned": 3, "completed": 3, "errored": 0, "not_run": 0, "superseded_attempts": 0}
    coherence = summary["dimensions"]["coherence"]
    assert (coherence["overall"]["pass"], coherence["overall"]["fail"]) == (2, 1)
    assert set(coherence["by_persona"]) == {"impatient", "curious"}
    assert summary["dimensions"]["correctness"]["overall"]["skipped"] == 1
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "[bad] Let&#39;s find a common denominator first." in html
    assert "imported <code><bdi>bad</bdi></code> (line 2)" in html

    # The same file again, into a new run: every judgement comes from the cache.
    calls = fake.roles["judge"]
    again = invoke("judge", "--transcripts", path, "--matrix", judge_matrix(fake, write_matrix),
                   "--out", tmp_path / "run2", "-q", "--cache", tmp_path / "c.sqlite")
    assert again.exit_code == 0, again.output
    assert fake.roles["judge"] == calls

    # The report rebuilds from the run file alone.
    rebuilt = invoke("report", out)
    assert rebuilt.exit_code == 0, rebuilt.output


def test_gate_on_imported_sessions_exits_1(make_fake, write_matrix, tmp_path):
    fake = make_fake(judge_label=lambda prompt, labels: labels[-1])
    path = write_jsonl(tmp_path / "t.jsonl", [session_line("a")])
    result = invoke("judge", "--transcripts", path, "--matrix", judge_matrix(fake, write_matrix, use=["coherence"]),
                    "--out", tmp_path / "run", "-q", "--gate", "coherence=0.5")
    assert result.exit_code == 1, result.output
    assert "gate failed" in result.output


@pytest.mark.parametrize("lazy", [False, True])
def test_imported_text_is_escaped_in_the_report(fake, write_matrix, tmp_path, lazy):
    from simbench.reports.html import render_report
    from simbench.reports.summary import build_summary
    from simbench.store import RunStore

    evil = "</script><script>alert(1)</script>"
    path = write_jsonl(tmp_path / "t.jsonl", [session_line(f"id{evil}", messages=[
        {"role": "user", "content": f"hi {evil}"}, {"role": "assistant", "content": f"hello {evil}"}],
        metadata={"topic": f"t{evil}", "persona": f"p{evil}"})])
    out = tmp_path / "run"
    result = invoke("judge", "--transcripts", path, "--matrix", judge_matrix(fake, write_matrix), "--out", out, "-q")
    assert result.exit_code == 0, result.output
    store = RunStore.open_run_dir(out)
    try:
        html = render_report(store, build_summary(store), embedded=False, lazy=lazy)
    finally:
        store.close()
    assert "<script>alert(1)" not in html
    assert html.count("<script") == 1 + lazy  # the report's own script (and the lazy JSON block)


def test_a_conversation_too_long_for_the_embedded_judge_is_an_input_error(tmp_path):
    long = session_line("long", messages=[{"role": "user", "content": "why? " * 2000},
                                          {"role": "assistant", "content": "because " * 6000}])
    path = write_jsonl(tmp_path / "t.jsonl", [session_line("short"), long])
    # No --matrix: the built-in judges on the embedded model, which holds 8,192 tokens.
    result = invoke("judge", "--transcripts", path, "--out", tmp_path / "run", "-q")
    assert result.exit_code == 2, result.output
    assert f"{path}:2: the conversation needs about" in result.output
    assert not (tmp_path / "run").exists()
