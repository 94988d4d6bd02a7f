"""The trace-store interface: where tutor spans go, where sessions come back from, where judgements go.

Three backends behind one interface (DESIGN.md "Trace store"): ``local`` (the run's SQLite file),
``phoenix`` (an Arize Phoenix server) and ``arize`` (Arize AX). Each hands back the span dataframe
(``tracing.local.SPAN_COLUMNS``), so session rebuild and judges never know which store they read.

Every run keeps a copy of its spans in its own SQLite file whatever the store: the report reads
transcripts from it, and a store that fails mid-run loses nothing (``simbench push`` logs the
judgements later).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

import pandas as pd
from opentelemetry.sdk.trace import SpanProcessor

from ..records import Judgement
from ..store import RunStore


class TraceStoreError(Exception):
    """A store that cannot be used. ``exit_code`` 2: fix the configuration; 3: the store is unreachable."""

    def __init__(self, message: str, exit_code: int = 3):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class SpanSelection:
    """Which spans to read back: a time window, and either one run's sessions or a store-side filter.

    ``session_prefix`` keeps the sessions whose id starts with it (``"<run_id>/"``: one run);
    ``where`` is a filter in the store's own language that picks sessions (every span of a session
    with one matching span is returned); ``expected_spans`` makes a store that ingests
    asynchronously wait until it holds that many.
    """

    start: datetime
    end: datetime
    session_prefix: Optional[str] = None
    where: Optional[str] = None
    expected_spans: int = 0


class TraceStore(ABC):
    """One backend. ``check`` before any model call; ``span_processor`` while simulating;
    ``spans`` to read sessions back; ``log_judgements`` to write verdicts onto sessions and turn spans."""

    kind: str = ""

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for messages (never a secret)."""

    def check(self) -> None:
        """Raise ``TraceStoreError`` if the store cannot be reached or is misconfigured."""

    def span_processor(self) -> Optional[SpanProcessor]:
        """Where a run's tutor and closing spans go besides the run's own file (None: nowhere else)."""
        return None

    @abstractmethod
    def spans(self, selection: SpanSelection) -> pd.DataFrame:
        """The selected spans as the span dataframe. Never silently fewer than the store holds."""

    def log_judgements(self, judgements: list[Judgement], spans: pd.DataFrame) -> int:
        """Log the ``ok`` judgements: a session verdict onto its session (``spans``, the span
        dataframe of those sessions, lets a store find the span it belongs on), a per-turn verdict
        (``turn`` set) onto its ``span_id``. Returns how many landed."""
        return 0

    def close(self) -> None:
        pass


class LocalStore(TraceStore):
    """The run's SQLite file: spans are already there (the run always keeps a copy), and so are the
    judgements, so nothing is logged anywhere else."""

    kind = "local"

    def __init__(self, run_store: RunStore):
        self.run_store = run_store

    def describe(self) -> str:
        return f"the run's file {self.run_store.path}"

    def spans(self, selection: SpanSelection) -> pd.DataFrame:
        from .local import spans_dataframe

        return spans_dataframe(self.run_store, selection.session_prefix)


@dataclass(frozen=True)
class StoreConfig:
    """A store as the matrix or the command line names it (validated before it gets here)."""

    kind: str
    endpoint: Optional[str] = None
    project: Optional[str] = None
    space_id_env: str = "ARIZE_SPACE_ID"
    api_key_env: str = "ARIZE_API_KEY"


def open_store(config: StoreConfig, run_store: Optional[RunStore] = None) -> TraceStore:
    """The backend for ``config``. Imports a remote store's client only when it is used."""
    if config.kind == "local":
        if run_store is None:
            raise TraceStoreError("the local store is a run's own file: give a run directory", 2)
        return LocalStore(run_store)
    if config.kind == "phoenix":
        from .phoenix import PhoenixStore

        return PhoenixStore(config.endpoint or "", config.project or "")
    if config.kind == "arize":
        from .arize import ArizeStore

        return ArizeStore.from_env(config.project or "", config.space_id_env, config.api_key_env)
    raise TraceStoreError(f"unknown trace store kind {config.kind!r}; use local, phoenix or arize", 2)


def session_roots(spans: pd.DataFrame) -> dict[str, str]:
    """session id -> span id of the root span of the session's first trace (AX logs session evals there)."""
    if spans.empty:
        return {}
    frame = spans[spans["attributes.session.id"].notna()].sort_values("start_time", kind="stable")
    roots: dict[str, str] = {}
    first_trace = frame.groupby("attributes.session.id", sort=False)["context.trace_id"].first()
    for session_id, trace_id in first_trace.items():
        trace = frame[frame["context.trace_id"] == trace_id]
        parentless = trace[trace["parent_id"].isna()]
        root = parentless if not parentless.empty else trace
        roots[str(session_id)] = str(root["context.span_id"].iloc[0])
    return roots
