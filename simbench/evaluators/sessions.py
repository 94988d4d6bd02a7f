"""Rebuild one transcript per session from the span dataframe (whatever store it came from).

Judges read what the trace store holds, not the simulator's memory, so the same code judges real
production sessions. Tutor LLM spans give the turns (the last user message of each span's input,
then its output); the closing ``session.end`` span gives the student's last message. ERROR spans
(a failed attempt of a call) are ignored.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..records import Message, Transcript
from ..tracing.setup import SESSION_END_SPAN


def rebuild_sessions(spans: pd.DataFrame) -> list[Transcript]:
    """One Transcript per ``attributes.session.id``, messages in time order."""
    if spans.empty:
        return []
    spans = spans[spans["attributes.session.id"].notna() & (spans["status_code"] != "ERROR")]
    spans = spans.sort_values("start_time", kind="stable")
    # One conversion of the whole frame, then plain dicts: a per-session ``to_dict`` costs ~2.5 ms
    # each in pandas, 25 s for 10,000 sessions. Sessions keep the order of their first span.
    by_session: dict[Any, list[dict]] = {}
    for span in spans.to_dict("records"):
        by_session.setdefault(span["attributes.session.id"], []).append(span)
    return [_transcript(str(session_id), group) for session_id, group in by_session.items()]


def _transcript(session_id: str, group: list[dict]) -> Transcript:
    messages: list[Message] = []
    turn_span_ids: list[str] = []
    first_span_id = None
    metadata: dict[str, Any] = {}
    for span in group:
        if span["name"] == SESSION_END_SPAN:
            text = span.get("attributes.input.value")
            if isinstance(text, str) and text and (not messages or messages[-1].role == "tutor"):
                messages.append(Message("student", text))
            first_span_id = first_span_id or span["context.span_id"]
            metadata = metadata or _as_dict(span.get("attributes.metadata"))
            continue
        if span["span_kind"] != "LLM":
            continue
        first_span_id = first_span_id or span["context.span_id"]
        metadata = metadata or _as_dict(span.get("attributes.metadata"))
        student = _last_content(span.get("attributes.llm.input_messages"), "user")
        if student is not None and (not messages or messages[-1].role == "tutor"):
            messages.append(Message("student", student))
        tutor = _last_content(span.get("attributes.llm.output_messages"), "assistant")
        if tutor is not None:
            messages.append(Message("tutor", tutor))
            turn_span_ids.append(span["context.span_id"])
    return Transcript(session_id, first_span_id or "", messages, metadata, turn_span_ids)


def _last_content(messages: Any, role: str) -> str | None:
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("message.role") == role:
            content = message.get("message.content")
            return content if isinstance(content, str) else ""
    return None


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}
