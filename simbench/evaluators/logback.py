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
from ..tracing.local import spans_dataframe
from ..tracing.stores import SpanSelection, TraceStore

# Clock skew between us and a store, and spans that end after the run row was written.
WINDOW_MARGIN = timedelta(minutes=5)


@dataclass
class PushResult:
    sessions: int
    judgements: int
    logged: int


def run_window(store: RunStore) -> tuple[datetime, datetime]:
    """The time window a run's spans fall in (with a margin), for stores that read by time."""
    run = store.run() or {}
    start = datetime.fromtimestamp(run.get("created_at") or 0, timezone.utc) - WINDOW_MARGIN
    end_at = run.get("finished_at") or datetime.now(timezone.utc).timestamp()
    return start, datetime.fromtimestamp(end_at, timezone.utc) + WINDOW_MARGIN


def run_selection(store: RunStore, run_id: str, local_spans: pd.DataFrame) -> SpanSelection:
    """This run's spans in a remote store: its time window, its session ids, as many as it exported."""
    start, end = run_window(store)
    return SpanSelection(start=start, end=end, session_prefix=f"{run_id}/", expected_spans=len(local_spans))


def push_judgements(trace_store: TraceStore, store: RunStore, spans: pd.DataFrame | None = None) -> PushResult:
    """Log every judgement of the run's counted sessions to ``trace_store``.

    ``spans``: the span dataframe of those sessions as the store holds them (a store like AX logs a
    session judgement on a span id it assigned); default the run's own copy, which has the same ids.
    """
    counted = {s["session_id"] for s in store.latest_sessions() if s["status"] == "completed"}
    judgements = [j for j in store.judgements() if j.session_id in counted]
    if spans is None:
        run_id = (store.run() or {}).get("run_id", "")
        spans = spans_dataframe(store, f"{run_id}/" if run_id else None)
    logged = trace_store.log_judgements(judgements, spans)
    return PushResult(len({j.session_id for j in judgements}), len(judgements), logged)
