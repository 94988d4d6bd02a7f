"""Trace-store configuration, reachability and the local side of ``judge``/``push`` (no Phoenix server needed)."""

from __future__ import annotations

import json
import socket

import pandas as pd
import pytest
from conftest import base_matrix, invoke, run_cli

from simbench.evaluators.sessions import rebuild_sessions
from simbench.store import RunStore
from simbench.tracing.local import add_span_frame, spans_dataframe


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


@pytest.mark.parametrize("store, message", [
    ({"kind": "phoenix", "project": "p"}, "a phoenix trace store needs endpoint"),
    ({"kind": "phoenix", "endpoint": "http://127.0.0.1:6006"}, "needs project"),
    ({"kind": "phoenix", "endpoint": "127.0.0.1:6006", "project": "p"}, "must be an http:// or https:// URL"),
    ({"kind": "local", "endpoint": "http://127.0.0.1:6006"}, "endpoint apply to kind phoenix or arize"),
    ({"kind": "arize", "project": "p", "endpoint": "http://x"}, "an arize trace store takes no endpoint"),
    ({"kind": "jaeger"}, "trace_store.kind"),
    ({"kind": "phoenix", "endpoint": "http://h", "project": "p", "token": "x"}, "trace_store.token: unknown field"),
])
def test_trace_store_fields_are_validated(write_matrix, store, message):
    path = write_matrix(base_matrix("http://127.0.0.1:9/v1", trace_store=store))
    result = invoke("validate", path)
    assert result.exit_code == 2
    assert message in result.output
    assert f"{path}:" in result.output  # names the file (and line)


def test_judge_names_that_arize_would_drop_are_rejected(write_matrix):
    for name in ("goal-completion", "goal.completion"):
        result = invoke("validate", write_matrix(base_matrix("http://127.0.0.1:9/v1", judges={"use": [name]})))
        assert result.exit_code == 2
        assert "must be an identifier" in result.output


def test_an_unreachable_phoenix_stops_the_run_before_any_model_call(fake, write_matrix, tmp_path):
    store = {"kind": "phoenix", "endpoint": f"http://127.0.0.1:{_closed_port()}", "project": "p"}
    result = run_cli(write_matrix(base_matrix(fake.base_url, trace_store=store)), tmp_path / "run")
    assert result.exit_code == 3
    assert "cannot reach Phoenix at http://127.0.0.1:" in result.output
    assert fake.chat_calls == 0
    assert not (tmp_path / "run").exists()


def test_push_to_an_unreachable_store_exits_3_and_keeps_the_run(fake, write_matrix, tmp_path, open_run):
    assert run_cli(write_matrix(base_matrix(fake.base_url)), tmp_path / "run", "--no-cache").exit_code == 0
    before = open_run(tmp_path / "run").judgements()
    result = invoke("push", tmp_path / "run", "--store", "phoenix", "--endpoint", f"http://127.0.0.1:{_closed_port()}",
                    "--project", "p")
    assert result.exit_code == 3 and "cannot reach Phoenix" in result.output
    assert open_run(tmp_path / "run").judgements() == before and len(before) == 4


def test_push_and_judge_usage_errors(tmp_path):
    assert invoke("push", tmp_path, "--store", "phoenix", "--project", "p").exit_code == 2  # no endpoint
    result = invoke("push", tmp_path, "--store", "phoenix", "--endpoint", "http://127.0.0.1:9", "--project", "p")
    assert result.exit_code == 2 and "not a run directory" in result.output
    assert invoke("judge").exit_code == 2
    assert invoke("judge", tmp_path, "--store", "phoenix").exit_code == 2
    result = invoke("judge", "--store", "phoenix", "--endpoint", "http://127.0.0.1:9", "--project", "p", "--end", "2026-01-01")
    assert result.exit_code == 2 and "--start is required" in result.output
    result = invoke("judge", "--store", "phoenix", "--endpoint", "http://127.0.0.1:9", "--project", "p",
                    "--start", "yesterday", "--end", "2026-01-01")
    assert result.exit_code == 2 and "expected an ISO time" in result.output


def test_a_span_frame_from_another_store_round_trips_through_the_run_file(fake, write_matrix, tmp_path):
    assert run_cli(write_matrix(base_matrix(fake.base_url)), tmp_path / "run", "--no-cache").exit_code == 0
    source = RunStore.open_run_dir(tmp_path / "run")
    copy = RunStore(tmp_path / "copy.sqlite")
    try:
        frame = spans_dataframe(source)
        assert add_span_frame(copy, frame) == len(frame) == 10  # 2 sessions x (2 turn spans + 2 LLM spans + session.end)
        again = spans_dataframe(copy)
        columns = ["context.span_id", "context.trace_id", "parent_id", "name", "span_kind", "start_time", "end_time",
                   "status_code", "attributes.session.id", "attributes.metadata", "attributes.llm.input_messages",
                   "attributes.llm.output_messages", "attributes.input.value"]
        pd.testing.assert_frame_equal(frame[columns], again[columns])
        assert rebuild_sessions(again) == rebuild_sessions(frame)
    finally:
        source.close()
        copy.close()


def test_judge_run_dir_rejudges_with_other_judges(fake, write_matrix, tmp_path, open_run):
    assert run_cli(write_matrix(base_matrix(fake.base_url)), tmp_path / "run", "--no-cache").exit_code == 0
    original = open_run(tmp_path / "run")
    judged_before = original.judgements()
    other = write_matrix(base_matrix(fake.base_url, judges={"model": "fake", "use": ["frustration"]}), "other.yaml")
    tutor_calls = fake.roles["tutor"]
    result = invoke("judge", tmp_path / "run", "--matrix", other, "--out", tmp_path / "again", "-q", "--no-cache")
    assert result.exit_code == 0, result.output
    assert fake.roles["tutor"] == tutor_calls  # nothing simulated
    again = open_run(tmp_path / "again")
    assert {j["judge"] for j in again.judgements()} == {"frustration"}
    assert {j["session_id"] for j in again.judgements()} == {s["session_id"] for s in original.sessions()}
    assert {s["sample_id"] for s in again.sessions()} == {s["sample_id"] for s in original.sessions()}
    assert again.transcripts() == original.transcripts()
    assert original.judgements() == judged_before  # the source run is not changed
    assert again.summary()["sessions"]["completed"] == 2
    assert "frustration" in again.summary()["dimensions"]


def test_a_judged_run_records_imported_sessions_not_a_made_up_tutor(fake, write_matrix, tmp_path, open_run):
    # The matrix a judge-only run records says what it was: the sessions' variants, kind imported,
    # no student, and only the judges' model in use; and `compare` names it so.
    assert run_cli(write_matrix(base_matrix(fake.base_url)), tmp_path / "run", "--no-cache").exit_code == 0
    result = invoke("judge", tmp_path / "run", "--out", tmp_path / "again", "-q", "--no-cache")
    assert result.exit_code == 0, result.output
    recorded = json.loads(open_run(tmp_path / "again").rows("SELECT matrix_json FROM runs")[0]["matrix_json"])
    assert recorded["tutor"]["kind"] == "imported"
    assert recorded["student"] is None
    assert set(recorded["tutor"]["variants"]) == {"socratic", "direct"}
    assert recorded["tutor"]["variants"]["socratic"].startswith("You are a patient tutor")  # the run's own prompt
    assert recorded["tutor"]["baseline"] == "socratic"
    compared = invoke("compare", tmp_path / "run", tmp_path / "again", "--out", tmp_path / "cmp.html")
    assert compared.exit_code == 0, compared.output
    assert "tutor models differ" not in compared.output  # the same sessions, judged again
    assert "imported sessions (not simulated)" in (tmp_path / "cmp.html").read_text()


def test_judge_run_dir_into_an_existing_run_is_refused_and_keeps_it(fake, write_matrix, tmp_path, open_run):
    # One path for every judge-only run: the same refusal as `run`, and nothing of the existing run removed.
    assert run_cli(write_matrix(base_matrix(fake.base_url)), tmp_path / "run", "--no-cache").exit_code == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    result = invoke("judge", tmp_path / "run", "--out", tmp_path / "run", "-q", "--no-cache")
    assert result.exit_code == 2, result.output
    assert "already holds a run" in result.output
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert open_run(tmp_path / "run").summary()["sessions"]["completed"] == 2
