"""Tracer setup: one process-wide tracer provider with the OpenAI instrumentor, routed to the current run.

The instrumentor patches the openai module once per process, so the provider is created once and
its spans go to whichever trace store the current run has opened (``route_spans_to``). We never
touch the global provider: phoenix.evals emits its own spans there, and judges run under
``suppress_tracing()`` anyway.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from openinference.instrumentation import get_attributes_from_context
from openinference.instrumentation.openai import OpenAIInstrumentor
from openinference.semconv.trace import MessageAttributes, OpenInferenceSpanKindValues, SpanAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.trace import Status, StatusCode, Tracer

SESSION_END_SPAN = "session.end"


class _Router(SpanProcessor):
    """Forwards spans to the processor of the run that is tracing now; drops them between runs."""

    def __init__(self) -> None:
        self.target: Optional[SpanProcessor] = None

    def on_start(self, span: Span, parent_context: Optional[Context] = None) -> None:
        if self.target is not None:
            self.target.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self.target is not None:
            self.target.on_end(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.target.force_flush(timeout_millis) if self.target is not None else True


_lock = threading.Lock()
_provider: Optional[TracerProvider] = None
_router = _Router()


def _tracer_provider() -> TracerProvider:
    global _provider
    with _lock:
        if _provider is None:
            _provider = TracerProvider()
            _provider.add_span_processor(_router)
            OpenAIInstrumentor().instrument(tracer_provider=_provider)
        return _provider


def tracer() -> Tracer:
    return _tracer_provider().get_tracer("simbench")


@contextmanager
def route_spans_to(processor: SpanProcessor) -> Iterator[SpanProcessor]:
    """Send every span created inside the block to ``processor``; flush and shut it down at the end."""
    _tracer_provider()
    _router.target = processor
    try:
        yield processor
    finally:
        processor.force_flush()
        _router.target = None
        processor.shutdown()


def flush_spans() -> bool:
    """Flush the current run's spans to its store; a session counts as done only after this."""
    return _router.force_flush()


def record_session_end(last_student_message: Optional[str], stop_reason: str) -> str:
    """Write the closing CHAIN span of a session (inside ``using_attributes``); return its span id.

    It carries the student's last message (the one after the tutor's last turn), so the trace store
    holds the whole conversation.
    """
    with tracer().start_as_current_span(SESSION_END_SPAN) as span:
        span.set_attributes(dict(get_attributes_from_context()))
        span.set_attribute(SpanAttributes.OPENINFERENCE_SPAN_KIND, OpenInferenceSpanKindValues.CHAIN.value)
        if last_student_message is not None:
            span.set_attribute(SpanAttributes.INPUT_VALUE, last_student_message)
        span.set_attribute(SpanAttributes.OUTPUT_VALUE, stop_reason)
        span.set_status(Status(StatusCode.OK))
        return format(span.get_span_context().span_id, "016x")


TUTOR_TURN_SPAN = "tutor.turn"


class TurnSpan:
    """The open ``tutor.turn`` span of one tutor turn; ``answered`` records the reply on it."""

    def __init__(self, span: Span):
        self.span = span

    def answered(self, text: str, tool_calls: list, metadata: dict, chat_messages: Optional[list[dict]]) -> None:
        """The reply as the span's output (and as ``llm.output_messages`` when it came from one chat
        call, whose request is ``llm.input_messages``); each tool call a TOOL child span."""
        span = self.span
        span.set_attribute(SpanAttributes.OUTPUT_VALUE, text)
        if chat_messages is not None:
            for index, message in enumerate(chat_messages):
                prefix = f"{SpanAttributes.LLM_INPUT_MESSAGES}.{index}."
                span.set_attribute(prefix + MessageAttributes.MESSAGE_ROLE, str(message.get("role", "")))
                span.set_attribute(prefix + MessageAttributes.MESSAGE_CONTENT, str(message.get("content") or ""))
            prefix = f"{SpanAttributes.LLM_OUTPUT_MESSAGES}.0."
            span.set_attribute(prefix + MessageAttributes.MESSAGE_ROLE, "assistant")
            span.set_attribute(prefix + MessageAttributes.MESSAGE_CONTENT, text)
        if metadata:
            span.set_attribute(REPLY_METADATA, _json(metadata))
        for call in tool_calls:
            _tool_span(call.name, call.arguments, call.result)
        span.set_status(Status(StatusCode.OK))


# The reply metadata an agent returned (JSON), kept on its turn's span.
REPLY_METADATA = "simbench.reply.metadata"
# Marks the TOOL spans simbench wrote from an agent's answer (the rebuild prefers them to an app's own).
TOOL_CALL_MARK = "simbench.tool_call"


def _json(value) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)


def _tool_span(name: str, arguments, result) -> None:
    with tracer().start_as_current_span(name or "tool") as span:
        span.set_attributes(dict(get_attributes_from_context()))
        span.set_attribute(SpanAttributes.OPENINFERENCE_SPAN_KIND, OpenInferenceSpanKindValues.TOOL.value)
        span.set_attribute(SpanAttributes.TOOL_NAME, name)
        parameters = _json(arguments if arguments is not None else {})
        span.set_attribute(SpanAttributes.TOOL_PARAMETERS, parameters)
        span.set_attribute(SpanAttributes.INPUT_VALUE, parameters)
        span.set_attribute(SpanAttributes.OUTPUT_VALUE, _json(result if result is not None else ""))
        span.set_attribute(TOOL_CALL_MARK, True)
        span.set_status(Status(StatusCode.OK))


@contextmanager
def tutor_turn_span(student_message: str) -> Iterator[TurnSpan]:
    """The root span of one tutor turn (an AGENT span, inside ``using_attributes``): whatever the
    tutor calls nests under it. An exception out of the block marks it ERROR."""
    with tracer().start_as_current_span(TUTOR_TURN_SPAN) as span:
        span.set_attributes(dict(get_attributes_from_context()))
        span.set_attribute(SpanAttributes.OPENINFERENCE_SPAN_KIND, OpenInferenceSpanKindValues.AGENT.value)
        span.set_attribute(SpanAttributes.INPUT_VALUE, student_message)
        yield TurnSpan(span)
