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
from openinference.semconv.trace import OpenInferenceSpanKindValues, SpanAttributes
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
