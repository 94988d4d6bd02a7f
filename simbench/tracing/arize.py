"""The ``arize`` trace store: Arize AX.

Space id and API key come from the environment (never the matrix). Spans go in through
``arize.otel.register`` over gRPC (its HTTP transport crashes in ``register``); they come back with
``ArizeClient.spans.export_to_df`` over the run's time window, filtered on the run id the session ids
carry, only the columns the session rebuild needs, polling until AX has ingested the spans the run
sent (AX ingests with a delay); session judgements go to ``spans.update_evaluations`` as
``session_eval.<judge>.label/score/explanation`` on the root span of each session's first trace, and
per-turn judgements as ``eval.<judge>.*`` on their turn's tutor span, with the SDK's client-side
validation on.

This path is tested up to the network (AX is not reachable from the test machine): the evaluation
dataframe passes the SDK's own validation, and the export mapping reads a dataframe shaped the way
the SDK's ``export_to_df`` builds one.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Optional
from urllib.parse import urlparse

import pandas as pd
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from ..records import Judgement
from .local import SPAN_COLUMNS
from .phoenix import with_resource
from .stores import SpanSelection, TraceStore, TraceStoreError, session_roots

# What the session rebuild and log-back read; asking for these only keeps the export small.
EXPORT_COLUMNS = [c for c in SPAN_COLUMNS if c != "attributes.llm.token_count.total"]
INGEST_WAIT_S = 600.0
POLL_INTERVAL_S = 15.0


class ArizeStore(TraceStore):
    kind = "arize"

    def __init__(self, space_id: str, api_key: str, project: str, *, ingest_wait_s: float = INGEST_WAIT_S):
        self.space_id = space_id
        self.api_key = api_key
        self.project = project
        self.ingest_wait_s = ingest_wait_s
        self._client: Any = None

    @classmethod
    def from_env(cls, project: str, space_id_env: str = "ARIZE_SPACE_ID", api_key_env: str = "ARIZE_API_KEY") -> "ArizeStore":
        missing = [name for name in (space_id_env, api_key_env) if not os.environ.get(name)]
        if missing:
            raise TraceStoreError(f"the arize trace store reads the space id and API key from the environment: "
                                  f"set {' and '.join(missing)}", 2)
        return cls(os.environ[space_id_env], os.environ[api_key_env], project)

    def describe(self) -> str:
        return f"Arize AX, project {self.project!r}"

    @property
    def client(self) -> Any:
        if self._client is None:
            from arize import ArizeClient

            self._client = ArizeClient(api_key=self.api_key)
        return self._client

    def check(self) -> None:
        """AX has no cheap authenticated ping: check that its collector answers on the network."""
        from arize.otel import Endpoint

        url = urlparse(os.environ.get("ARIZE_COLLECTOR_ENDPOINT") or Endpoint.ARIZE.value)
        host, port = url.hostname or "", url.port or 443
        try:
            socket.create_connection((host, port), timeout=10).close()
        except OSError as exc:
            raise TraceStoreError(f"cannot reach {self.describe()} at {host}:{port}: {exc}") from None

    # -- spans in ---------------------------------------------------------------------------

    def span_processor(self) -> SpanProcessor:
        from arize.otel import Transport, register

        provider = register(space_id=self.space_id, api_key=self.api_key, project_name=self.project,
                            transport=Transport.GRPC, batch=True, set_global_tracer_provider=False, verbose=False)
        return ProviderForwarder(provider)

    # -- spans out --------------------------------------------------------------------------

    def spans(self, selection: SpanSelection) -> pd.DataFrame:
        deadline = time.monotonic() + self.ingest_wait_s
        while True:
            frame = self._export(selection)
            if len(frame) >= selection.expected_spans or time.monotonic() > deadline:
                break
            time.sleep(POLL_INTERVAL_S)
        if len(frame) < selection.expected_spans:
            raise TraceStoreError(f"{self.describe()} holds {len(frame)} of the run's {selection.expected_spans} "
                                  f"spans after {self.ingest_wait_s:.0f} s")
        return frame

    def _export(self, selection: SpanSelection) -> pd.DataFrame:
        try:
            raw = self.client.spans.export_to_df(
                space_id=self.space_id, project_name=self.project,
                start_time=_hour_floor(selection.start), end_time=_hour_ceil(selection.end),
                where=export_filter(selection), columns=EXPORT_COLUMNS)
        except Exception as exc:  # the SDK raises its own, gRPC's and Arrow's errors
            raise TraceStoreError(f"{self.describe()}: export failed: {type(exc).__name__}: {exc}") from None
        return select(from_export(raw), selection)

    # -- judgements back --------------------------------------------------------------------

    def log_judgements(self, judgements: list[Judgement], spans: pd.DataFrame) -> int:
        frame = evaluations_frame(judgements, session_roots(spans))
        if frame.empty:
            return 0
        try:
            self.client.spans.update_evaluations(space_id=self.space_id, project_name=self.project,
                                                 dataframe=frame, validate=True)
        except Exception as exc:
            raise TraceStoreError(f"{self.describe()}: logging evaluations failed: {type(exc).__name__}: {exc}") from None
        return int(frame.filter(like=".label").notna().sum().sum())


def export_filter(selection: SpanSelection) -> str:
    """AX's filter language: ``"column" contains 'text'``; the run id is the start of its session ids."""
    clauses = []
    if selection.session_prefix:
        prefix = selection.session_prefix.replace("'", "''")
        clauses.append(f"\"attributes.session.id\" contains '{prefix}'")
    if selection.where:
        clauses.append(f"({selection.where})")
    return " and ".join(clauses)


def from_export(raw: pd.DataFrame) -> pd.DataFrame:
    """``export_to_df``'s dataframe -> the span dataframe.

    The SDK drops columns that are null in every row, turns message lists and metadata from JSON
    into lists and dicts, and start/end times from epoch nanoseconds into naive Timestamps (UTC).
    """
    frame = raw.copy()
    for column in SPAN_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    frame = frame[SPAN_COLUMNS + [c for c in frame.columns if c not in SPAN_COLUMNS]]
    for column in ("start_time", "end_time"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    for column in ("attributes.llm.input_messages", "attributes.llm.output_messages"):
        frame[column] = frame[column].map(_as_list)
    frame["attributes.metadata"] = frame["attributes.metadata"].map(lambda v: v if isinstance(v, dict) else {})
    return frame.reset_index(drop=True)


def select(frame: pd.DataFrame, selection: SpanSelection) -> pd.DataFrame:
    """What the export's hour-wide window and ``contains`` filter let through beyond the selection."""
    start = pd.Timestamp(selection.start).tz_convert("UTC") if pd.Timestamp(selection.start).tzinfo else pd.Timestamp(selection.start, tz="UTC")
    end = pd.Timestamp(selection.end).tz_convert("UTC") if pd.Timestamp(selection.end).tzinfo else pd.Timestamp(selection.end, tz="UTC")
    sessions = frame["attributes.session.id"]
    keep = sessions.notna() & (frame["start_time"] >= start) & (frame["start_time"] < end)
    if selection.session_prefix:
        keep &= sessions.astype(str).str.startswith(selection.session_prefix)
    return frame[keep].reset_index(drop=True)


def evaluations_frame(judgements: list[Judgement], roots: dict[str, str]) -> pd.DataFrame:
    """One row per span: a session verdict as ``session_eval.<judge>.label/score/explanation`` on the
    root span of its session's first trace, a per-turn verdict as ``eval.<judge>.*`` on its turn's
    tutor span (turn 1's span is often also the root: both land in one row).

    AX holds one value per span and name, so a judge sampled several times logs its first ``ok`` sample.
    Judge names are identifiers (checked when the matrix loads): AX drops names with '.' or '-'.
    """
    rows: dict[str, dict[str, Any]] = {}
    for j in sorted((j for j in judgements if j.status == "ok"), key=lambda j: j.judge_sample):
        span_id = roots.get(j.session_id) if j.turn is None else j.span_id
        if not span_id:
            continue
        row = rows.setdefault(span_id, {"context.span_id": span_id})
        prefix = f"session_eval.{j.judge}" if j.turn is None else f"eval.{j.judge}"
        if f"{prefix}.label" in row:
            continue
        row[f"{prefix}.label"] = j.label
        row[f"{prefix}.score"] = float(j.score) if j.score is not None else None
        row[f"{prefix}.explanation"] = j.explanation or ""
    return pd.DataFrame(list(rows.values()))


class ProviderForwarder(SpanProcessor):
    """Hands the run's spans to the tracer provider ``arize.otel.register`` built (its processors,
    exporter and resource, which names the AX project); simbench's own provider stays the one the
    OpenAI instrumentor uses."""

    def __init__(self, provider: Any):
        self.provider = provider

    def on_start(self, span: Span, parent_context: Optional[Context] = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        # OTel's TracerProvider has no public "process this finished span"; its processor chain is
        # ``_active_span_processor`` (stable across SDK releases).
        self.provider._active_span_processor.on_end(with_resource(span, self.provider.resource))

    def shutdown(self) -> None:
        self.provider.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.provider.force_flush(timeout_millis)


def _as_list(value: Any) -> list:
    if isinstance(value, list):
        return value
    if hasattr(value, "tolist"):
        return list(value.tolist())
    return []


def _hour_floor(moment: datetime) -> datetime:
    # AX exports at hourly granularity: widen to whole hours, then ``select`` trims to the window.
    moment = moment.astimezone(timezone.utc)
    return moment.replace(minute=0, second=0, microsecond=0)


def _hour_ceil(moment: datetime) -> datetime:
    floor = _hour_floor(moment)
    return floor if floor == moment.astimezone(timezone.utc) else floor + timedelta(hours=1)
