"""Log a run's judgements back onto its sessions in a trace store (after a run, or later with ``push``).

The judgements themselves always live in the run's SQLite file first; logging back is a copy, so a
store that fails loses nothing and ``simbench push`` can try again. Only the latest attempt of each
sample is logged: a superseded attempt's session is not what the report counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pandas as pd

from ..store import RunStore
from ..tracing.local import readable_spans, spans_dataframe
from ..tracing.stores import SpanSelection, TraceStore

# Clock skew between us and a store, and spans that end after the run row was written.
WINDOW_MARGIN = timedelta(minutes=5)


@dataclass
class PushResult:
    sessions: int
    judgements: int
    logged: int
    spans_resent: int = 0
    turn_judgements: int = 0
    """Per-turn verdicts sent besides the session ``judgements`` (``logged`` counts both)."""

    @property
    def sent(self) -> int:
        return self.judgements + self.turn_judgements

    def turns_note(self) -> str:
        """For messages: how many of those sent were per-turn verdicts (nothing when none)."""
        return f", {self.turn_judgements} of them per turn on the turn's tutor span" if self.turn_judgements else ""


def run_window(store: RunStore, spans: pd.DataFrame | None = None) -> tuple[datetime, datetime]:
    """The time window a run's spans fall in (with a margin), for stores that read by time.
    ``spans`` widens it to their start times (a judged run holds sessions older than itself)."""
    run = store.run() or {}
    start = datetime.fromtimestamp(run.get("created_at") or 0, timezone.utc)
    end = datetime.fromtimestamp(run.get("finished_at") or datetime.now(timezone.utc).timestamp(), timezone.utc)
    if spans is not None and not spans.empty:
        start = min(start, spans["start_time"].min().floor("us").to_pydatetime())
        end = max(end, spans["start_time"].max().ceil("us").to_pydatetime())
    return start - WINDOW_MARGIN, end + WINDOW_MARGIN


def run_selection(store: RunStore, run_id: str, local_spans: pd.DataFrame) -> SpanSelection:
    """This run's spans in a remote store: its time window, its session ids, as many as it exported."""
    start, end = run_window(store)
    return SpanSelection(start=start, end=end, session_prefix=f"{run_id}/", expected_spans=len(local_spans))


def push_judgements(trace_store: TraceStore, store: RunStore, spans: pd.DataFrame | None = None) -> PushResult:
    """Log every judgement of the run's counted sessions to ``trace_store``: session verdicts onto
    their sessions, per-turn verdicts onto their turn's tutor span.

    ``spans``: the span dataframe of those sessions as the store holds them (a store like AX logs a
    session judgement on a span id it assigned); default the run's own copy, which has the same ids.
    """
    counted = {s["session_id"] for s in store.latest_sessions() if s["status"] == "completed"}
    judgements = [j for j in store.judgements() if j.session_id in counted]
    turns = [j for j in store.turn_judgements() if j.session_id in counted]
    if spans is None:
        spans = spans_dataframe(store)
        spans = spans[spans["attributes.session.id"].isin(counted)]
    resent = resend_missing_spans(trace_store, store, spans)
    logged = trace_store.log_judgements(judgements + turns, spans)
    return PushResult(len({j.session_id for j in judgements}), len(judgements), logged, resent, len(turns))


def resend_missing_spans(trace_store: TraceStore, store: RunStore, spans: pd.DataFrame) -> int:
    """Send the store the run's spans it does not hold (it was down, or the run traced locally):
    a judgement can only land on a session the store knows. Waits until they are queryable."""
    processor = trace_store.span_processor()
    if processor is None or spans.empty:
        return 0
    start, end = run_window(store, spans)
    sessions = set(spans["attributes.session.id"].dropna())
    held = trace_store.spans(SpanSelection(start=start, end=end))
    held_ids = set(held.loc[held["attributes.session.id"].isin(sessions), "context.span_id"])
    missing = set(spans["context.span_id"]) - held_ids
    if not missing:
        processor.shutdown()
        return 0
    try:
        for span in readable_spans(store, missing):
            processor.on_end(span)
        processor.force_flush()
    finally:
        processor.shutdown()
    trace_store.spans(SpanSelection(start=start, end=end, expected_spans=len(held) + len(missing)))
    return len(missing)
