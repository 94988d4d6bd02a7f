"""The ``local`` trace store: spans in the run's SQLite file, read back as the span dataframe.

OTel hands us flattened attribute keys (``llm.input_messages.0.message.role``, ``metadata`` as a JSON
string); ``spans_dataframe`` unflattens them into the shape Phoenix's ``get_spans_dataframe`` and
AX's ``export_to_df`` return, so everything downstream reads one shape whatever the store.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any, Iterable, Optional

import pandas as pd
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from ..store import RunStore, dumps

SPAN_COLUMNS = [
    "context.span_id", "context.trace_id", "parent_id", "name", "span_kind", "start_time", "end_time",
    "status_code", "attributes.session.id", "attributes.user.id", "attributes.metadata",
    "attributes.llm.input_messages", "attributes.llm.output_messages", "attributes.llm.model_name",
    "attributes.llm.token_count.prompt", "attributes.llm.token_count.completion",
    "attributes.llm.token_count.total", "attributes.input.value", "attributes.output.value",
    # TOOL spans: a turn's tool calls (``simbench.tool_call`` marks the ones simbench wrote)
    "attributes.tool.name", "attributes.tool.parameters", "attributes.simbench.tool_call",
]
_LIST_ATTRIBUTES = ("llm.input_messages", "llm.output_messages")
_INDEXED = re.compile(r"^(llm\.(?:input|output)_messages)\.(\d+)\.(.+)$")


class SQLiteSpanProcessor(SpanProcessor):
    """Keeps finished spans in memory and writes them to the run's SQLite file on flush.

    The runner flushes before it commits each finished session, so a committed session's spans are
    always in the file. Writing on flush, in one transaction, rather than one transaction per span
    as a ``SimpleSpanProcessor`` would, saves a commit for every model call. Spans still pending
    when the process dies belong to unfinished sessions, which resume redoes under a new attempt.
    """

    def __init__(self, store: RunStore):
        self.store = store
        self._pending: list[ReadableSpan] = []
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        if span.context.trace_flags.sampled:
            with self._lock:
                self._pending.append(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            spans, self._pending = self._pending, []
        if spans:
            self.store.add_spans([_row(span) for span in spans])
        return True

    def shutdown(self) -> None:
        self.force_flush()


def local_span_processor(store: RunStore) -> SpanProcessor:
    """The local store's processor: spans reach the file at each flush (before a session is committed)."""
    return SQLiteSpanProcessor(store)


def _row(span: ReadableSpan) -> tuple:
    ctx = span.get_span_context()
    attributes = dict(span.attributes or {})
    return (
        format(ctx.span_id, "016x"),
        format(ctx.trace_id, "032x"),
        format(span.parent.span_id, "016x") if span.parent else None,
        span.name,
        attributes.get("openinference.span.kind"),
        span.start_time,
        span.end_time,
        span.status.status_code.name,
        attributes.get("session.id"),
        dumps(attributes),
    )


def unflatten(attributes: dict[str, Any]) -> dict[str, Any]:
    """OTel's flat attribute keys -> Phoenix's columns: message lists as lists of dicts, metadata as a dict."""
    out: dict[str, Any] = {}
    lists: dict[str, dict[int, dict[str, Any]]] = {}
    for key, value in attributes.items():
        match = _INDEXED.match(key)
        if match:
            name, index, rest = match.group(1), int(match.group(2)), match.group(3)
            lists.setdefault(name, {}).setdefault(index, {})[rest] = value
        elif key == "metadata" and isinstance(value, str):
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        else:
            out[key] = value
    for name, items in lists.items():
        out[name] = [items[i] for i in sorted(items)]
    return out


def spans_dataframe(store: RunStore, session_prefix: Optional[str] = None,
                    session_ids: Optional[Iterable[str]] = None) -> pd.DataFrame:
    """The stored spans as the span dataframe: all, one run's (``session_prefix`` = ``"<run_id>/"``)
    or these sessions' (``session_ids``)."""
    records = []
    for row in store.span_rows(session_prefix, session_ids):
        attributes = unflatten(json.loads(row["attributes"]))
        record = {
            "context.span_id": row["span_id"],
            "context.trace_id": row["trace_id"],
            "parent_id": row["parent_id"],
            "name": row["name"],
            "span_kind": row["span_kind"],
            "start_time": row["start_time"],
            "end_time": row["end_time"],
            "status_code": row["status_code"],
        }
        for key, value in attributes.items():
            record[f"attributes.{key}"] = value
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    for column in SPAN_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    for column in ("start_time", "end_time"):
        frame[column] = pd.to_datetime(frame[column], unit="ns", utc=True)
    for name in _LIST_ATTRIBUTES:
        column = f"attributes.{name}"
        frame[column] = frame[column].map(lambda v: v if isinstance(v, list) else [])
    return frame


def add_span_frame(store: RunStore, frame: pd.DataFrame) -> int:
    """Write a span dataframe from another store into the run's file (``simbench judge`` keeps a copy
    of what it judged, so the report can show it); ``spans_dataframe`` reads it back the same."""
    rows = []
    for span in frame.to_dict("records"):
        attributes = flatten({k.removeprefix("attributes."): v for k, v in span.items() if k.startswith("attributes.")})
        rows.append((
            str(span["context.span_id"]),
            str(span.get("context.trace_id") or ""),
            _plain(span.get("parent_id")),
            str(span.get("name") or ""),
            _plain(span.get("span_kind")),
            _nanoseconds(span.get("start_time")),
            _nanoseconds(span.get("end_time") if _plain(span.get("end_time")) is not None else span.get("start_time")),
            str(_plain(span.get("status_code")) or "UNSET"),
            _plain(span.get("attributes.session.id")),
            dumps(attributes),
        ))
    store.add_spans(rows)
    return len(rows)


def flatten(attributes: dict[str, Any]) -> dict[str, Any]:
    """The span dataframe's attribute columns -> OTel's flat keys (the inverse of ``unflatten``)."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        value = _plain(value)
        if value is None:
            continue
        if key in _LIST_ATTRIBUTES:
            for index, item in enumerate(value):
                for name, part in (item or {}).items():
                    if _plain(part) is not None:
                        out[f"{key}.{index}.{name}"] = _plain(part)
        elif key == "metadata" and isinstance(value, dict):
            out[key] = dumps(value)
        else:
            out[key] = value
    return out


def _plain(value: Any) -> Any:
    """numpy/pandas values -> plain Python; missing (None, NaN, NaT) -> None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, dict, str)):
        return value
    if value is None or pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _nanoseconds(value: Any) -> int:
    return int(pd.Timestamp(value).value)


def readable_spans(store: RunStore, span_ids: set[str]) -> list[ReadableSpan]:
    """Stored spans as OTel spans again, with their original ids and times, so ``push`` can send a
    store the spans it missed (its sessions must exist there before judgements can land on them)."""
    from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

    def context(trace_id: str, span_id: str) -> SpanContext:
        return SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))

    out = []
    for row in store.span_rows():
        if row["span_id"] not in span_ids:
            continue
        out.append(ReadableSpan(
            name=row["name"],
            context=context(row["trace_id"], row["span_id"]),
            parent=context(row["trace_id"], row["parent_id"]) if row["parent_id"] else None,
            attributes=json.loads(row["attributes"]),
            status=Status(StatusCode[row["status_code"]]),
            start_time=row["start_time"],
            end_time=row["end_time"],
        ))
    return out
