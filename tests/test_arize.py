"""The arize (AX) trace store, tested up to the network: AX cannot be reached from here.

- the evaluations dataframe simbench would upload passes the arize SDK's own client-side checks (the
  ones ``spans.update_evaluations(validate=True)`` runs, called here in the same order), and one the
  SDK rejects is rejected;
- the export mapping reads a dataframe shaped like ``export_to_df``'s output, built with the SDK's
  own transformer from the raw Arrow shape (JSON strings, epoch nanoseconds, all-null columns dropped);
- spans go through ``arize.otel.register`` over gRPC into a real OTLP gRPC receiver (Phoenix's), so
  the provider, resource (project) and gRPC exporter are exercised for real;
- per-turn verdicts go out as ``eval.<judge>.*`` on their turn's span through the SDK's own
  ``update_evaluations`` and Arrow Flight client, into a Flight server on loopback that keeps what
  it receives (a stand-in at the network boundary, like the fake model server).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
from conftest import base_matrix, invoke, run_cli

from simbench.evaluators.sessions import rebuild_sessions
from simbench.records import Judgement
from simbench.store import RunStore
from simbench.tracing.arize import ArizeStore, evaluations_frame, export_filter, from_export, select
from simbench.tracing.local import SPAN_COLUMNS, spans_dataframe
from simbench.tracing.setup import TUTOR_TURN_SPAN
from simbench.tracing.stores import SpanSelection, TraceStoreError, session_roots

PROJECT = "simbench-tests"


def sdk_validation_errors(frame: pd.DataFrame) -> list:
    """Exactly the checks ``ArizeClient.spans.update_evaluations(validate=True)`` runs before it sends."""
    from arize.spans.columns import EVAL_COLUMN_PATTERN, SPAN_SPAN_ID_COL
    from arize.spans.validation.evals import evals_validation
    from arize.utils.dataframe import remove_extraneous_columns, reset_dataframe_index

    frame = frame.copy()
    reset_dataframe_index(dataframe=frame)
    errors = evals_validation.validate_argument_types(evals_dataframe=frame, project_name=PROJECT)
    if errors:
        return errors
    errors = evals_validation.validate_dataframe_form(evals_dataframe=frame)
    if errors:
        return errors
    frame = remove_extraneous_columns(df=frame, column_list=[SPAN_SPAN_ID_COL.name], regex=EVAL_COLUMN_PATTERN)
    return evals_validation.validate_values(evals_dataframe=frame, project_name=PROJECT)


@pytest.fixture
def finished_run(fake, write_matrix, tmp_path):
    assert run_cli(write_matrix(base_matrix(fake.base_url, repeats=2)), tmp_path / "run", "--no-cache").exit_code == 0
    store = RunStore.open_run_dir(tmp_path / "run")
    yield store
    store.close()


def test_the_evaluations_frame_passes_the_sdks_validation(finished_run):
    spans = spans_dataframe(finished_run)
    judgements = finished_run.judgements()
    frame = evaluations_frame(judgements, session_roots(spans))
    assert sdk_validation_errors(frame) == []
    assert len(frame) == 4  # one row per session
    assert sorted(frame.columns) == sorted(
        ["context.span_id"] + [f"session_eval.{judge}.{part}" for judge in ("coherence", "correctness")
                               for part in ("label", "score", "explanation")])
    # each row sits on the root span of the session's first trace: its first tutor.turn span
    turns = spans[spans["name"] == TUTOR_TURN_SPAN]
    assert turns["parent_id"].isna().all()
    first_span = turns.sort_values("start_time").groupby("attributes.session.id")["context.span_id"].first()
    assert set(frame["context.span_id"]) == set(first_span)
    assert {t.session_id: t.turn_span_ids[0] for t in rebuild_sessions(spans)} == first_span.to_dict()
    by_span = frame.set_index("context.span_id")
    for j in judgements:
        assert by_span.loc[first_span[j.session_id], f"session_eval.{j.judge}.label"] == j.label


def test_the_sdk_rejects_what_it_should(finished_run):
    frame = evaluations_frame(finished_run.judgements(), session_roots(spans_dataframe(finished_run)))
    assert sdk_validation_errors(frame.drop(columns=["context.span_id"])) != []
    broken = frame.copy()
    broken["session_eval.coherence.score"] = "high"  # a score must be numeric
    assert sdk_validation_errors(broken) != []


def test_the_sdk_silently_drops_eval_names_with_dots_or_dashes():
    """Why simbench rejects such judge names when the matrix loads (test_trace_stores covers that)."""
    from arize.spans.columns import EVAL_COLUMN_PATTERN
    from arize.utils.dataframe import remove_extraneous_columns

    frame = pd.DataFrame({"context.span_id": ["a" * 16], "session_eval.goal-completion.label": ["yes"],
                          "session_eval.goal_completion.label": ["yes"]})
    kept = remove_extraneous_columns(df=frame, column_list=["context.span_id"], regex=EVAL_COLUMN_PATTERN)
    assert sorted(kept.columns) == ["context.span_id", "session_eval.goal_completion.label"]


def test_only_ok_judgements_are_logged_and_one_sample_per_judge():
    roots = {"r/s/1": "1" * 16}
    judgements = [
        Judgement("r/s/1", "coherence", "m", 1, "ok", "incoherent", 0.0, False, "second sample"),
        Judgement("r/s/1", "coherence", "m", 0, "ok", "coherent", 1.0, True, "first sample"),
        Judgement("r/s/1", "correctness", "m", 0, "error", error="timeout"),
        Judgement("r/other/1", "coherence", "m", 0, "ok", "coherent", 1.0, True, "no root span: not logged"),
    ]
    frame = evaluations_frame(judgements, roots)
    assert frame.to_dict("records") == [{"context.span_id": "1" * 16, "session_eval.coherence.label": "coherent",
                                         "session_eval.coherence.score": 1.0,
                                         "session_eval.coherence.explanation": "first sample"}]
    assert sdk_validation_errors(frame) == []


def _as_ax_export(spans: pd.DataFrame) -> pd.DataFrame:
    """A span dataframe in the raw shape AX's Arrow export delivers (before the SDK's transform):
    message lists as arrays of JSON strings, metadata as a JSON string, times as epoch nanoseconds,
    no column that is null everywhere, rows in no particular order, plus AX's own columns."""
    raw = pd.DataFrame({
        "context.span_id": spans["context.span_id"],
        "context.trace_id": spans["context.trace_id"],
        "parent_id": spans["parent_id"],
        "name": spans["name"],
        "span_kind": spans["span_kind"],
        "start_time": spans["start_time"].map(lambda t: t.value),
        "end_time": spans["end_time"].map(lambda t: t.value),
        "status_code": spans["status_code"],
        "attributes.session.id": spans["attributes.session.id"],
        "attributes.user.id": spans["attributes.user.id"],
        "attributes.metadata": spans["attributes.metadata"].map(json.dumps),
        "attributes.llm.input_messages": spans["attributes.llm.input_messages"].map(
            lambda ms: np.array([json.dumps(m) for m in ms], dtype=object) if ms else None),
        "attributes.llm.output_messages": spans["attributes.llm.output_messages"].map(
            lambda ms: np.array([json.dumps(m) for m in ms], dtype=object) if ms else None),
        "attributes.input.value": spans["attributes.input.value"],
        "attributes.output.value": spans["attributes.output.value"],
        "attributes.llm.model_name": spans["attributes.llm.model_name"],
        "attributes.llm.token_count.total": None,
    })
    raw["time"] = raw["start_time"]
    raw = raw.sample(frac=1, random_state=random.Random(7).randint(0, 99)).reset_index(drop=True)
    return raw.drop(columns=raw.columns[raw.isnull().all()])


def test_the_export_mapping_rebuilds_the_same_sessions(finished_run):
    from arize._exporter.parsers.tracing_data_parser import OtelTracingDataTransformer

    spans = spans_dataframe(finished_run)
    exported = OtelTracingDataTransformer().transform(_as_ax_export(spans))  # the SDK's own last step
    assert "attributes.llm.token_count.total" not in exported.columns
    frame = from_export(exported)
    assert len(frame) == len(spans)
    assert list(frame.columns[:len(SPAN_COLUMNS)]) == SPAN_COLUMNS  # the span dataframe every store hands back
    mine = {t.session_id: t for t in rebuild_sessions(spans)}
    theirs = {t.session_id: t for t in rebuild_sessions(frame)}
    assert theirs == mine and len(mine) == 4
    assert str(frame["start_time"].dt.tz) == "UTC"
    # the hour-wide export window and the ``contains`` filter are trimmed to the selection
    run_id = finished_run.run()["run_id"]
    start, end = spans["start_time"].min(), spans["start_time"].max()
    foreign = frame.copy()
    foreign["attributes.session.id"] = "x" + foreign["attributes.session.id"]
    both = pd.concat([frame, foreign], ignore_index=True)
    chosen = select(both, SpanSelection(start=start, end=end, session_prefix=f"{run_id}/"))
    assert set(chosen["attributes.session.id"]) <= set(mine)
    assert len(chosen) == len(spans) - (spans["start_time"] == spans["start_time"].max()).sum()  # end is exclusive


def test_export_filter_names_the_run():
    selection = SpanSelection(start=pd.Timestamp.now(tz="UTC"), end=pd.Timestamp.now(tz="UTC"), session_prefix="run-1/",
                              where="\"span_kind\" = 'LLM'")
    assert export_filter(selection) == "\"attributes.session.id\" contains 'run-1/' and (\"span_kind\" = 'LLM')"


def test_arize_credentials_come_from_the_environment(monkeypatch, fake, write_matrix, tmp_path):
    monkeypatch.delenv("ARIZE_SPACE_ID", raising=False)
    monkeypatch.delenv("ARIZE_API_KEY", raising=False)
    with pytest.raises(TraceStoreError) as info:
        ArizeStore.from_env(PROJECT)
    assert info.value.exit_code == 2 and "set ARIZE_SPACE_ID and ARIZE_API_KEY" in str(info.value)
    matrix = write_matrix(base_matrix(fake.base_url, trace_store={"kind": "arize", "project": PROJECT}))
    assert invoke("validate", matrix).exit_code == 0
    result = run_cli(matrix, tmp_path / "run")
    assert result.exit_code == 2 and "ARIZE_SPACE_ID" in result.output
    assert fake.chat_calls == 0
    monkeypatch.setenv("ARIZE_SPACE_ID", "space-secret-id")
    monkeypatch.setenv("ARIZE_API_KEY", "key-secret")
    monkeypatch.setenv("ARIZE_COLLECTOR_ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    result = run_cli(matrix, tmp_path / "run")
    assert result.exit_code == 3 and "cannot reach Arize AX" in result.output
    assert "key-secret" not in result.output
    assert fake.chat_calls == 0


@pytest.fixture
def turn_judged_run(make_fake, write_matrix, tmp_path):
    """A run with a per-turn judge: each session's turn 2 reveals the answer (see test_turn_judges)."""
    from test_turn_judges import TURN_JUDGE, _tutor

    fake = make_fake(tutor=_tutor,
                     judge_label=lambda prompt, labels: "reveals" if "Reply: The answer is" in prompt else labels[0])
    matrix = base_matrix(fake.base_url, max_turns=3)
    matrix["judges"]["custom"] = {"reveals_turn": TURN_JUDGE}
    matrix["judges"]["use"] = ["coherence", "reveals_turn"]
    result = run_cli(write_matrix(matrix), tmp_path / "run", "--no-cache")
    assert result.exit_code == 0, result.output
    store = RunStore.open_run_dir(tmp_path / "run")
    yield store
    store.close()


def _tutor_spans(spans: pd.DataFrame) -> pd.Series:
    """session id -> its turn spans (the tutor.turn roots) in turn order: the ones the rebuild names."""
    tutor = spans[spans["name"] == TUTOR_TURN_SPAN].sort_values("start_time")
    by_session = tutor.groupby("attributes.session.id")["context.span_id"].agg(list)
    assert by_session.to_dict() == {t.session_id: t.turn_span_ids for t in rebuild_sessions(spans)}
    return by_session


def test_per_turn_verdicts_are_evals_on_their_turn_spans(turn_judged_run):
    spans = spans_dataframe(turn_judged_run)
    turns = turn_judged_run.turn_judgements()
    assert len(turns) == 6
    frame = evaluations_frame(turn_judged_run.judgements() + turns, session_roots(spans))
    assert sdk_validation_errors(frame) == []
    by_span = frame.set_index("context.span_id")
    for session_id, span_ids in _tutor_spans(spans).items():
        assert list(by_span.loc[span_ids, "eval.reveals_turn.label"]) == ["withholds", "reveals", "withholds"]
        assert list(by_span.loc[span_ids, "eval.reveals_turn.score"]) == [1.0, 0.0, 1.0]
        # turn 1's span is also the session's root: the session verdicts share its row
        assert by_span.loc[span_ids[0], "session_eval.reveals_turn.label"] == "failing_turn"
        assert by_span.loc[span_ids[0], "session_eval.coherence.label"] == "coherent"
        assert by_span.loc[span_ids[1:], "session_eval.reveals_turn.label"].isna().all()
    assert len(frame) == 6  # one row per turn span, nothing on the LLM calls under them or the closing spans


def test_a_turn_verdict_without_a_span_or_verdict_is_not_logged():
    judgements = [
        Judgement("r/s/1", "reveals_turn", "m", 0, "ok", "reveals", 0.0, False, "turn 2", turn=2, span_id="2" * 16),
        Judgement("r/s/1", "reveals_turn", "m", 1, "ok", "withholds", 1.0, True, "second sample", turn=2,
                  span_id="2" * 16),
        Judgement("r/s/1", "reveals_turn", "m", 0, "skipped", error="pre-filter", turn=3, span_id="3" * 16),
        Judgement("r/s/1", "reveals_turn", "m", 0, "ok", "reveals", 0.0, False, "no span", turn=4, span_id=""),
    ]
    frame = evaluations_frame(judgements, {})
    assert frame.to_dict("records") == [{"context.span_id": "2" * 16, "eval.reveals_turn.label": "reveals",
                                         "eval.reveals_turn.score": 0.0, "eval.reveals_turn.explanation": "turn 2"}]
    assert sdk_validation_errors(frame) == []


def _flight_receiver():
    """An Arrow Flight server on loopback that answers DoPut like AX's and keeps each table it gets
    (``received``). Use it in a ``with``: its own exit shuts it down.

    It serves from the moment it is built; ``serve()`` is never called. Run on a thread of its own,
    ``serve()`` (which installs signal handlers) sometimes stopped the server under its client and
    once crashed the test process (seen: "Connection refused" mid-run, and a segfault in CI)."""
    import pyarrow as pa
    import pyarrow.flight as flight
    from arize._generated.protocol.flight import flight_pb2

    class Receiver(flight.FlightServerBase):
        def __init__(self):
            super().__init__("grpc+tcp://127.0.0.1:0")
            self.received = []

        def do_put(self, context, descriptor, reader, writer):
            table = reader.read_all()
            self.received.append((json.loads(descriptor.command), table.to_pandas()))
            response = flight_pb2.WriteSpanEvaluationResponse(records_updated=table.num_rows)
            writer.write(pa.py_buffer(response.SerializeToString()))

    return Receiver()


@pytest.fixture
def flight_receiver(monkeypatch):
    """A ``_flight_receiver`` the arize SDK sends to (its Flight endpoint comes from the environment)."""
    with _flight_receiver() as receiver:
        monkeypatch.setenv("ARIZE_FLIGHT_HOST", "127.0.0.1")
        monkeypatch.setenv("ARIZE_FLIGHT_PORT", str(receiver.port))
        monkeypatch.setenv("ARIZE_FLIGHT_SCHEME", "grpc+tcp")
        yield receiver


def test_log_judgements_sends_turn_evals_through_the_sdk(turn_judged_run, flight_receiver):
    """The store's own call (``update_evaluations(validate=True)``) up to the wire: what arrives is
    one row per tutor span with ``eval.reveals_turn.*`` and the session evals on each root span."""
    spans = spans_dataframe(turn_judged_run)
    judgements = turn_judged_run.judgements() + turn_judged_run.turn_judgements()
    logged = ArizeStore("space-id", "api-key", PROJECT).log_judgements(judgements, spans)
    assert logged == 6 + 2 * 2  # six turn labels, two session labels on each of two sessions
    [(command, table)] = flight_receiver.received
    assert PROJECT in json.dumps(command)
    table = table.set_index("context.span_id")
    for span_ids in _tutor_spans(spans):
        assert list(table.loc[span_ids, "eval.reveals_turn.label"]) == ["withholds", "reveals", "withholds"]
        assert table.loc[span_ids[0], "session_eval.reveals_turn.label"] == "failing_turn"


def test_the_sdk_refuses_a_broken_turn_eval_before_sending(turn_judged_run, flight_receiver):
    """validate=True is on: what the SDK rejects never reaches the wire, and the error says why."""
    turn = turn_judged_run.turn_judgements()[0]
    turn.label = "x" * 101  # AX takes labels of at most 100 characters
    with pytest.raises(TraceStoreError, match="logging evaluations failed: ValidationFailure"):
        ArizeStore("space-id", "api-key", PROJECT).log_judgements([turn], spans_dataframe(turn_judged_run))
    assert flight_receiver.received == []
