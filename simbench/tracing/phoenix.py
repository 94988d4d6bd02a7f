"""The ``phoenix`` trace store: an Arize Phoenix server.

Spans go in over OTLP/HTTP (``<endpoint>/v1/traces``) into ``project``; they come back through
``phoenix.client``'s ``get_spans_dataframe``, which answers at most ``limit`` spans (1,000 by
default) and truncates silently, so ``spans`` splits the time window until every page is short of
the limit; session judgements go back as session annotations and per-turn judgements as span
annotations on their turn's tutor span (annotator kind LLM, ``sync=True`` so we know they landed). A ``PHOENIX_API_KEY`` in the environment is sent with both, for servers with auth.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from typing import Sequence

import httpx
import pandas as pd
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from ..records import Judgement
from .local import SPAN_COLUMNS
from .setup import REPLY_METADATA, TOOL_CALL_MARK
from .stores import SpanSelection, TraceStore, TraceStoreError

# Phoenix picks a span's project from this resource attribute.
PROJECT_ATTRIBUTE = "openinference.project.name"
DEFAULT_PAGE_SIZE = 1000
# How long to wait for the server to make freshly exported spans queryable.
INGEST_WAIT_S = 30.0
REQUEST_TIMEOUT_S = 30
# Text columns in which Phoenix's dataframe writes a missing value as "None" (``to_span_frame``).
CAST_TEXT_COLUMNS = ("parent_id", "attributes.session.id", "attributes.input.value", "attributes.output.value",
                     "attributes.tool.name")
# Where Phoenix's dataframe puts the attributes simbench names ``simbench.*``.
NESTED_SIMBENCH = "attributes.simbench"


class PhoenixStore(TraceStore):
    kind = "phoenix"

    def __init__(self, endpoint: str, project: str, *, page_size: int = DEFAULT_PAGE_SIZE,
                 ingest_wait_s: float = INGEST_WAIT_S):
        from phoenix.client import Client

        self.endpoint = endpoint.rstrip("/")
        self.project = project
        self.page_size = page_size
        self.ingest_wait_s = ingest_wait_s
        self.api_key = os.environ.get("PHOENIX_API_KEY") or None
        self.client = Client(base_url=self.endpoint, api_key=self.api_key)

    def describe(self) -> str:
        return f"Phoenix at {self.endpoint}, project {self.project!r}"

    def check(self) -> None:
        try:
            self.client.projects.list()
        except httpx.HTTPStatusError as exc:
            raise TraceStoreError(f"{self.describe()} refused the request: HTTP {exc.response.status_code}"
                                  f"{' (set PHOENIX_API_KEY)' if exc.response.status_code in (401, 403) else ''}") from None
        except (httpx.HTTPError, OSError) as exc:
            raise TraceStoreError(f"cannot reach {self.describe()}: {type(exc).__name__}: {exc}. "
                                  "Start the server (phoenix serve) or fix the endpoint.") from None

    # -- spans in ---------------------------------------------------------------------------

    def span_processor(self) -> SpanProcessor:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else None
        exporter = OTLPSpanExporter(endpoint=f"{self.endpoint}/v1/traces", headers=headers, timeout=REQUEST_TIMEOUT_S)
        resource = Resource.create({PROJECT_ATTRIBUTE: self.project, "service.name": "simbench"})
        return BatchSpanProcessor(ResourceExporter(exporter, resource))

    # -- spans out --------------------------------------------------------------------------

    def spans(self, selection: SpanSelection) -> pd.DataFrame:
        """Every span of the selected sessions in the window, waiting (up to ``ingest_wait_s``) for
        ``selection.expected_spans`` to be queryable: Phoenix ingests OTLP asynchronously."""
        deadline = time.monotonic() + self.ingest_wait_s
        while True:
            frame = self._select(selection)
            if len(frame) >= selection.expected_spans or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if len(frame) < selection.expected_spans:
            raise TraceStoreError(f"{self.describe()} holds {len(frame)} of the run's {selection.expected_spans} "
                                  f"spans after {self.ingest_wait_s:.0f} s")
        return frame

    def _select(self, selection: SpanSelection) -> pd.DataFrame:
        from phoenix.client.types.spans import SpanQuery

        frame = self.fetch_all(selection.start, selection.end)
        sessions = frame["attributes.session.id"]
        keep = sessions.notna()
        if selection.session_prefix is not None:
            keep &= sessions.astype(str).str.startswith(selection.session_prefix)
        if selection.where:
            matching = self.fetch_all(selection.start, selection.end, SpanQuery().where(selection.where))
            keep &= sessions.isin(set(matching["attributes.session.id"].dropna()))
        return frame[keep].reset_index(drop=True)

    def fetch_all(self, start: datetime, end: datetime, query=None) -> pd.DataFrame:
        """All spans of the project that started in [start, end), page by page, as the span dataframe.

        A page as long as the limit may be truncated: split its window in two and ask again, so no
        span is left out without an error saying so.
        """
        pages = self._window(start, end, query)
        frame = pd.concat(pages, ignore_index=True) if pages else pd.DataFrame()
        if not frame.empty:
            frame = frame.drop_duplicates("context.span_id", ignore_index=True)
        return to_span_frame(frame)

    def _window(self, start: datetime, end: datetime, query) -> list[pd.DataFrame]:
        try:
            page = self.client.spans.get_spans_dataframe(
                query=query, start_time=start, end_time=end, limit=self.page_size,
                project_identifier=self.project, timeout=REQUEST_TIMEOUT_S)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:
                return []  # no such project yet: no spans
            raise TraceStoreError(f"{self.describe()}: reading spans failed: HTTP {exc.response.status_code} "
                                  f"{exc.response.text[:300]}") from None
        except Exception as exc:  # transport errors, and phoenix.client's own
            raise TraceStoreError(f"{self.describe()}: reading spans failed: {type(exc).__name__}: {exc}") from None
        if len(page) < self.page_size:
            return [page.reset_index(drop="context.span_id" in page.columns)] if len(page) else []
        if end - start <= timedelta(microseconds=1):
            raise TraceStoreError(f"{self.describe()}: more than {self.page_size} spans started within one "
                                  f"microsecond at {start.isoformat()}; cannot page through them")
        middle = start + (end - start) / 2
        return self._window(start, middle, query) + self._window(middle, end, query)

    # -- judgements back --------------------------------------------------------------------

    def log_judgements(self, judgements: list[Judgement], spans: pd.DataFrame) -> int:
        """Session verdicts as session annotations, per-turn verdicts as span annotations on their
        turn's tutor span; both ``sync=True`` so the count is what the server stored."""
        sessions = [j for j in judgements if j.turn is None]
        turns = [j for j in judgements if j.turn is not None]
        return (self._annotate("session", self.client.sessions.log_session_annotations_dataframe,
                               annotation_rows(sessions))
                + self._annotate("span", self.client.spans.log_span_annotations_dataframe,
                                 span_annotation_rows(turns)))

    def _annotate(self, kind: str, log_dataframe, rows: list[dict]) -> int:
        if not rows:
            return 0
        try:
            inserted = log_dataframe(dataframe=pd.DataFrame(rows), annotator_kind="LLM", sync=True)
        except httpx.HTTPStatusError as exc:
            raise TraceStoreError(f"{self.describe()}: logging {kind} annotations failed: HTTP "
                                  f"{exc.response.status_code} {exc.response.text[:300]}") from None
        except Exception as exc:  # transport errors, and phoenix.client's own (e.g. a server too old)
            raise TraceStoreError(f"{self.describe()}: logging {kind} annotations failed: "
                                  f"{type(exc).__name__}: {exc}") from None
        return len(inserted or [])


def _identifier(j: Judgement) -> str:
    """Tells the judge samples apart, and makes a second push update an annotation instead of adding
    a copy (Phoenix upserts on name, session or span, and identifier)."""
    return f"simbench:{j.judge_model}:{j.judge_sample}"


def annotation_rows(judgements: Sequence[Judgement]) -> list[dict]:
    """One session annotation per ``ok`` session judgement."""
    return [
        {"session_id": j.session_id, "name": j.judge, "label": j.label, "score": j.score,
         "explanation": j.explanation or "", "identifier": _identifier(j),
         "metadata": {"judge_model": j.judge_model, "judge_sample": j.judge_sample, "passed": j.passed}}
        for j in judgements if j.status == "ok"
    ]


def span_annotation_rows(turns: Sequence[Judgement]) -> list[dict]:
    """One span annotation per ``ok`` per-turn judgement, on the tutor span of its turn."""
    return [
        {"span_id": j.span_id, "name": j.judge, "label": j.label, "score": j.score,
         "explanation": j.explanation or "", "identifier": _identifier(j),
         "metadata": {"judge_model": j.judge_model, "judge_sample": j.judge_sample, "passed": j.passed,
                      "session_id": j.session_id, "turn": j.turn}}
        for j in turns if j.status == "ok" and j.span_id
    ]


def to_span_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Phoenix's dataframe -> the span dataframe: every design column present, times in UTC,
    message lists as lists (Phoenix leaves them out of a span that has none), missing text missing.

    Phoenix's dataframe comes as a JSON table schema whose text columns are cast to ``str``, so a
    value a span lacks (a root's parent id, a closing span's input) arrives as the string
    ``"None"``: read back as missing in the text columns the rebuild reads (a reply that is exactly
    "None" cannot be told apart from no reply there).
    """
    frame = frame.copy()
    for column in SPAN_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    for column in CAST_TEXT_COLUMNS:
        frame[column] = frame[column].where(~frame[column].isin(["None"]), None)
    frame["parent_id"] = frame["parent_id"].where(frame["parent_id"] != "", None)
    frame = _unnest_simbench(frame)
    for column in ("start_time", "end_time"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    for column in ("attributes.llm.input_messages", "attributes.llm.output_messages"):
        frame[column] = frame[column].map(lambda v: list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else [])
    return frame


def _unnest_simbench(frame: pd.DataFrame) -> pd.DataFrame:
    """Phoenix nests attributes outside OpenInference's names: ``simbench.tool_call`` comes back
    inside one ``attributes.simbench`` dict column. Give simbench's keys their dotted columns again,
    as the other stores name them."""
    if NESTED_SIMBENCH not in frame.columns:
        return frame
    nested = frame.pop(NESTED_SIMBENCH)
    for key in (TOOL_CALL_MARK, REPLY_METADATA):
        path = key.split(".")[1:]
        frame[f"attributes.{key}"] = nested.map(lambda value: _dig(value, path))
    return frame


def _dig(value, path: list[str]):
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class ResourceExporter(SpanExporter):
    """Exports spans with another resource: the process-wide tracer provider has one resource, but a
    remote store picks the project from the resource, so each run's exporter sets its own."""

    def __init__(self, inner: SpanExporter, resource: Resource):
        self.inner = inner
        self.resource = resource

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([with_resource(span, self.resource) for span in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def with_resource(span: ReadableSpan, resource: Resource) -> ReadableSpan:
    return ReadableSpan(
        name=span.name, context=span.context, parent=span.parent, resource=resource,
        attributes=span.attributes, events=span.events, links=span.links, kind=span.kind,
        status=span.status, start_time=span.start_time, end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )
