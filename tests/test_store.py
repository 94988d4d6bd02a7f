"""The run's SQLite file and the local trace store's span dataframe."""

from __future__ import annotations

import json
import sqlite3

import pandas as pd
import pytest

from conftest import base_matrix, run_cli
from simbench.evaluators.sessions import rebuild_sessions
from simbench.records import CallRecord, Sample, SimulatedSession, session_id_for
from simbench.store import SCHEMA_VERSION, RunFileError, RunStore
from simbench.tracing.local import spans_dataframe, unflatten

# The columns DESIGN.md promises from every trace store (Phoenix / AX names).
DESIGN_COLUMNS = [
    "context.span_id", "context.trace_id", "parent_id", "name", "span_kind", "start_time", "end_time",
    "status_code", "attributes.session.id", "attributes.user.id", "attributes.metadata",
    "attributes.llm.input_messages", "attributes.llm.output_messages", "attributes.llm.model_name",
    "attributes.llm.token_count.prompt", "attributes.llm.token_count.completion",
    "attributes.llm.token_count.total", "attributes.input.value", "attributes.output.value",
]


def _one_session_run(fake, write_matrix, tmp_path, max_turns: int = 2):
    matrix = base_matrix(fake.base_url, max_turns=max_turns)
    matrix["tutor"]["variants"] = {"socratic": "You teach {{ topic.name }}."}
    out = tmp_path / "run"
    result = run_cli(write_matrix(matrix), out, "--cache", tmp_path / "c.sqlite")
    assert result.exit_code == 0, result.output
    return out


# -- schema ---------------------------------------------------------------------------------------


def test_schema_version_is_recorded(fake, write_matrix, tmp_path):
    assert SCHEMA_VERSION >= 1
    out = _one_session_run(fake, write_matrix, tmp_path)
    db = sqlite3.connect(out / "run.sqlite")
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()
    assert {"runs", "samples", "sessions", "spans", "evaluations"} <= tables


def test_reopening_keeps_data_and_version(tmp_path):
    store = RunStore(tmp_path / "run.sqlite")
    store.create_run("r1", "m", "m.yaml", "fp", "{}", "0")
    store.close()
    store = RunStore(tmp_path / "run.sqlite")
    try:
        assert store.schema_version == SCHEMA_VERSION
        assert store.run()["run_id"] == "r1"
    finally:
        store.close()


def test_a_file_from_a_newer_simbench_is_refused(tmp_path):
    path = tmp_path / "run.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RunFileError, match="newer"):
        RunStore(path)


def test_latest_attempt_counts_and_older_attempts_are_superseded(tmp_path):
    store = RunStore(tmp_path / "run.sqlite")
    try:
        store.create_run("r1", "m", "m.yaml", "fp", "{}", "0")
        sample = Sample("socratic", "fractions", "impatient", 1)
        other = Sample("socratic", "fractions", "impatient", 2)
        store.add_samples([sample, other])
        for attempt, status in ((1, "errored"), (2, "completed")):
            assert store.next_attempt(sample.sample_id) == attempt
            session = SimulatedSession(sample, session_id_for("r1", sample.sample_id, attempt), attempt, "running")
            store.start_session(session)
            session.status = status
            store.finish_session(session, None, [CallRecord("tutor", "fake", 200, False, 0.01, 3, 4)])
        latest = store.latest_sessions()
        assert [(s["sample_id"], s["attempt"], s["status"]) for s in latest] == [(sample.sample_id, 2, "completed")]
        assert [s["session_id"] for s in store.superseded_sessions()] == [f"r1/{sample.sample_id}/1"]
        assert store.samples() == [sample, other]
    finally:
        store.close()


# -- the span dataframe ---------------------------------------------------------------------------


def test_spans_dataframe_has_the_design_shape(fake, write_matrix, tmp_path):
    out = _one_session_run(fake, write_matrix, tmp_path, max_turns=2)
    store = RunStore.open_run_dir(out)
    try:
        run_id = store.run()["run_id"]
        (session,) = store.latest_sessions()
        frame = spans_dataframe(store)
        mine = spans_dataframe(store, f"{run_id}/")
        other = spans_dataframe(store, "some-other-run/")
    finally:
        store.close()

    for column in DESIGN_COLUMNS:
        assert column in frame.columns, column
        assert column in other.columns, column
    assert len(other) == 0
    assert len(mine) == len(frame) == 5  # two tutor.turn roots, each with its LLM call, + session.end
    assert isinstance(frame["start_time"].dtype, pd.DatetimeTZDtype)
    assert (frame["end_time"] >= frame["start_time"]).all()

    tutor_answers = [answer for role, _, answer in fake.exchanges if role == "tutor"]
    student_answers = [answer for role, _, answer in fake.exchanges if role == "student"]
    llm = frame[frame["span_kind"] == "LLM"].sort_values("start_time")
    assert len(llm) == 2
    turns = frame[frame["name"] == "tutor.turn"].sort_values("start_time")
    assert list(turns["span_kind"]) == ["AGENT", "AGENT"] and turns["parent_id"].isna().all()
    assert list(llm["parent_id"]) == list(turns["context.span_id"])  # each call nests under its turn
    assert list(turns["attributes.output.value"]) == [a for r, _, a in fake.exchanges if r == "tutor"]
    for i, span in enumerate(llm.to_dict("records")):
        assert span["attributes.session.id"] == session["session_id"]
        assert span["attributes.user.id"] == "impatient"
        assert span["status_code"] == "OK"
        assert isinstance(span["context.span_id"], str) and isinstance(span["context.trace_id"], str)
        metadata = span["attributes.metadata"]
        assert isinstance(metadata, dict)
        assert metadata["variant"] == "socratic" and metadata["persona"] == "impatient"
        assert metadata["topic"] == "adding fractions" and metadata["sample_id"] == session["sample_id"]
        assert metadata["attempt"] == 1

        inputs = span["attributes.llm.input_messages"]
        assert isinstance(inputs, list) and all(isinstance(m, dict) for m in inputs)
        assert all({"message.role", "message.content"} <= set(m) for m in inputs)
        assert inputs[0] == {"message.role": "system", "message.content": "You teach adding fractions."}
        assert inputs[1] == {"message.role": "user", "message.content": "Why isn't 1/2 + 1/3 equal to 2/5?"}
        assert len(inputs) == 2 + 2 * i  # system, opening, then the turns so far
        outputs = span["attributes.llm.output_messages"]
        assert outputs == [{"message.role": "assistant", "message.content": tutor_answers[i]}]
        assert isinstance(span["attributes.llm.model_name"], str) and span["attributes.llm.model_name"]
        prompt, completion = span["attributes.llm.token_count.prompt"], span["attributes.llm.token_count.completion"]
        assert prompt > 0 and completion > 0
        assert span["attributes.llm.token_count.total"] == prompt + completion

    (closing,) = frame[frame["name"] == "session.end"].to_dict("records")
    assert closing["span_kind"] == "CHAIN"
    assert closing["attributes.session.id"] == session["session_id"]
    assert closing["attributes.input.value"] == student_answers[-1]
    assert closing["attributes.output.value"] == "max_turns"
    assert closing["attributes.llm.input_messages"] == [] and closing["attributes.llm.output_messages"] == []
    assert isinstance(closing["attributes.metadata"], dict)


def test_spans_dataframe_of_an_empty_store(tmp_path):
    store = RunStore(tmp_path / "run.sqlite")
    try:
        frame = spans_dataframe(store)
    finally:
        store.close()
    assert len(frame) == 0
    for column in DESIGN_COLUMNS:
        assert column in frame.columns
    assert rebuild_sessions(frame) == []


def test_unflatten_turns_otel_keys_into_phoenix_columns():
    flat = {
        "session.id": "run/abc/1",
        "metadata": json.dumps({"variant": "socratic", "repeat": 2}),
        "llm.model_name": "fake-model",
        "llm.token_count.prompt": 12,
        "llm.input_messages.0.message.role": "system",
        "llm.input_messages.0.message.content": "You teach fractions.",
        "llm.input_messages.2.message.role": "assistant",
        "llm.input_messages.2.message.content": "What is a denominator?",
        "llm.input_messages.10.message.role": "user",
        "llm.input_messages.10.message.content": "the eleventh",
        "llm.input_messages.1.message.role": "user",
        "llm.input_messages.1.message.content": "Why {x} and {{y}}?",
        "llm.output_messages.0.message.role": "assistant",
        "llm.output_messages.0.message.content": "Let us see.",
    }
    out = unflatten(flat)
    assert out["session.id"] == "run/abc/1"
    assert out["metadata"] == {"variant": "socratic", "repeat": 2}
    assert out["llm.model_name"] == "fake-model" and out["llm.token_count.prompt"] == 12
    # Ordered by index as a number (10 after 2), not as text.
    assert out["llm.input_messages"] == [
        {"message.role": "system", "message.content": "You teach fractions."},
        {"message.role": "user", "message.content": "Why {x} and {{y}}?"},
        {"message.role": "assistant", "message.content": "What is a denominator?"},
        {"message.role": "user", "message.content": "the eleventh"},
    ]
    assert out["llm.output_messages"] == [{"message.role": "assistant", "message.content": "Let us see."}]
    assert not any(k.startswith("llm.input_messages.") for k in out)


def test_unflatten_keeps_metadata_that_is_not_json():
    assert unflatten({"metadata": "not {json"})["metadata"] == "not {json"
    assert unflatten({"metadata": {"already": "a dict"}})["metadata"] == {"already": "a dict"}
    assert unflatten({}) == {}


def test_a_schema_1_file_opens_and_gains_the_import_tables(tmp_path):
    from simbench.store import MIGRATIONS

    path = tmp_path / "run.sqlite"
    db = sqlite3.connect(path)
    db.executescript(f"BEGIN;\n{MIGRATIONS[0]()}\nPRAGMA user_version = 1;\nCOMMIT;")
    db.execute("INSERT INTO runs VALUES ('r1', 'm', 'm.yaml', 'fp', '{}', '0', 0, NULL, 'finished')")
    db.commit()
    db.close()
    store = RunStore(path)
    try:
        assert store.schema_version == SCHEMA_VERSION >= 2
        assert store.run()["run_id"] == "r1"
        assert store.imported_sessions() == {} and store.human_labels() == {}
        store.add_imported([("r1/s/1", "t.jsonl", "conv-1", 3)], [("r1/s/1", "coherence", "good")])
        store.set_setting("judge_samples", 3)
        assert store.imported_sessions() == {"r1/s/1": {"source": "t.jsonl", "source_id": "conv-1", "line": 3}}
        assert store.human_labels() == {"r1/s/1": {"coherence": "good"}}
        assert store.setting("judge_samples") == 3 and store.setting("missing", "d") == "d"
    finally:
        store.close()


def test_local_spans_reach_the_file_at_flush_in_one_batch(tmp_path):
    """The runner commits a session only after a flush: spans must be in the file after it, not lost."""
    from simbench.tracing.local import local_span_processor
    from simbench.tracing.setup import flush_spans, route_spans_to, tracer

    store = RunStore(tmp_path / "run.sqlite")
    with route_spans_to(local_span_processor(store)):
        for name in ("a", "b", "c"):
            with tracer().start_as_current_span(name) as span:
                span.set_attribute("session.id", "run/sample/1")
        assert store.span_rows() == []  # held in memory until the flush
        assert flush_spans()
        assert sorted(r["name"] for r in store.span_rows()) == ["a", "b", "c"]
        with tracer().start_as_current_span("d"):
            pass
    # Leaving the run's block flushes what is left.
    assert sorted(r["name"] for r in store.span_rows()) == ["a", "b", "c", "d"]
    assert {r["session_id"] for r in store.span_rows()} == {"run/sample/1", None}
    store.close()
