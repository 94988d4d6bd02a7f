"""Secrets never reach a stored or printed message: one registry of secret values, one ``redact``.

The values of every environment variable that holds a secret (``Matrix.secret_env_names``: each
model's ``api_key_env``, the trace store's keys) are registered when endpoints and stores resolve.
``redact`` replaces each registered value by ``[redacted $NAME]``; the run's file applies it to
every string it stores (errors, explanations, span attributes) and the CLI to every error it prints,
so an endpoint or proxy that echoes the key in an error body cannot leak it into ``run.sqlite``,
``summary.json`` or ``report.html``.
"""

from __future__ import annotations

import os
import threading
from typing import Iterable, Optional

# Shorter values (a placeholder like "none", "x") would mask ordinary words, not secrets.
MIN_SECRET_LENGTH = 6

_lock = threading.Lock()
_secrets: dict[str, str] = {}  # value -> name of the variable it came from
_ordered: tuple[tuple[str, str], ...] = ()  # longest first, so a key containing another is masked whole


def register_secret(value: Optional[str], name: str) -> None:
    """Mask ``value`` (read from the variable ``name``) in every message from now on."""
    global _ordered
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        if _secrets.get(value) == name:
            return
        _secrets.setdefault(value, name)
        _ordered = tuple(sorted(_secrets.items(), key=lambda item: -len(item[0])))


def register_env(names: Iterable[Optional[str]]) -> None:
    """Register the values of the environment variables ``names`` (unset or empty ones are skipped)."""
    for name in names:
        if name:
            register_secret(os.environ.get(name), name)


def redact(text):
    """``text`` with every registered secret replaced by ``[redacted $NAME]``; non-strings unchanged."""
    if not _ordered or not isinstance(text, str):
        return text
    for value, name in _ordered:
        if value in text:
            text = text.replace(value, f"[redacted ${name}]")
    return text


def redact_row(row: tuple) -> tuple:
    """A row of values with every registered secret masked in its strings (the row itself if none are)."""
    if not _ordered:
        return row
    return tuple(redact(v) if isinstance(v, str) else v for v in row)


def _redacted_value(value):
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) if isinstance(v, str) else v for v in value)
    return value


def redacted_span(span):
    """A finished OTel span with the registered secrets masked in its attributes, events (an
    exception's message quotes the error body) and status; ``span`` itself when nothing changes."""
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import Status

    if not _ordered:
        return span
    attributes = {k: _redacted_value(v) for k, v in (span.attributes or {}).items()}
    events = [Event(e.name, {k: _redacted_value(v) for k, v in (e.attributes or {}).items()}, e.timestamp)
              for e in span.events]
    description = redact(span.status.description)
    changed = (attributes != dict(span.attributes or {}) or description != span.status.description
               or any(dict(a.attributes or {}) != dict(b.attributes or {}) for a, b in zip(events, span.events)))
    if not changed:
        return span
    return ReadableSpan(
        name=span.name, context=span.context, parent=span.parent, resource=span.resource,
        attributes=attributes, events=events, links=span.links, kind=span.kind,
        status=Status(span.status.status_code, description), start_time=span.start_time,
        end_time=span.end_time, instrumentation_scope=span.instrumentation_scope,
    )


def redacting_processor(inner):
    """A span processor that hands ``inner`` (a remote trace store's) each span with secrets masked."""
    from opentelemetry.sdk.trace import SpanProcessor

    class _Redacting(SpanProcessor):
        def on_start(self, span, parent_context=None) -> None:
            inner.on_start(span, parent_context)

        def on_end(self, span) -> None:
            inner.on_end(redacted_span(span))

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return inner.force_flush(timeout_millis)

    return _Redacting()
