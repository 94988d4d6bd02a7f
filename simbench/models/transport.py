"""The one path every model call takes: an HTTP transport under the openai client.

It sits *under* the OpenInference instrumentation (it is the client's ``http_client`` transport),
so a cache hit still produces the tutor's span, and it sees every attempt of a retried call.
Here, and only here: the response cache and per-call accounting (tokens, latency, status).

Who is calling (role, sample, judgement sample) travels in a contextvar, ``CallScope``: it follows
asyncio tasks, so the caller opens a scope around its model call and the transport reads it.
"""

from __future__ import annotations

import contextvars
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import httpx2

from ..records import CallRecord
from .cache import ResponseCache, cache_key


@dataclass
class CallScope:
    """Who is calling. ``sample_key`` is the sample id (the session id for imported sessions)."""

    role: str
    sample_key: str
    judge_sample: Optional[int] = None
    calls: list[CallRecord] = field(default_factory=list)


_current_scope: contextvars.ContextVar[Optional[CallScope]] = contextvars.ContextVar("simbench_call_scope", default=None)


@contextmanager
def call_scope(scope: CallScope) -> Iterator[CallScope]:
    """Make ``scope`` the caller of every model call made inside the block (in this task)."""
    token = _current_scope.set(scope)
    try:
        yield scope
    finally:
        _current_scope.reset(token)


def current_scope() -> Optional[CallScope]:
    return _current_scope.get()


_DROP_HEADERS = {"content-encoding", "content-length", "transfer-encoding"}


class ModelTransport(httpx2.AsyncBaseTransport):
    """Cache and account every request to one logical model, then pass it to the real transport."""

    def __init__(self, model_name: str, inner: httpx2.AsyncBaseTransport, cache: Optional[ResponseCache]):
        self.model_name = model_name
        self.inner = inner
        self.cache = cache

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        scope = current_scope() or CallScope(role="unscoped", sample_key="")
        body = await request.aread()
        key = cache_key(self.model_name, body, scope.sample_key, scope.judge_sample) if self.cache else None

        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                content_type, content = hit
                self._record(scope, 200, True, 0.0, content)
                return httpx2.Response(200, headers={"content-type": content_type}, content=content, request=request)

        started = time.perf_counter()
        try:
            response = await self.inner.handle_async_request(request)
            content = await response.aread()
        except Exception as exc:
            scope.calls.append(
                CallRecord(scope.role, self.model_name, 0, False, time.perf_counter() - started, error=_short(exc))
            )
            raise
        latency = time.perf_counter() - started
        usage_ok = self._record(scope, response.status_code, False, latency, content)
        if key is not None and response.status_code == 200 and usage_ok:
            self.cache.put(key, self.model_name, response.headers.get("content-type", "application/json"), content)
        headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _DROP_HEADERS]
        return httpx2.Response(
            response.status_code, headers=headers, content=content, request=request, extensions=response.extensions
        )

    def _record(self, scope: CallScope, status: int, cached: bool, latency: float, content: bytes) -> bool:
        """Append a CallRecord; True when the body is a well-formed completion (so it may be cached)."""
        record = CallRecord(scope.role, self.model_name, status, cached, latency)
        well_formed = False
        if status == 200:
            try:
                payload = json.loads(content)
                well_formed = isinstance(payload, dict) and bool(payload.get("choices"))
                usage = payload.get("usage") or {}
                record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                record.completion_tokens = int(usage.get("completion_tokens") or 0)
            except (ValueError, TypeError, AttributeError):
                well_formed = False
            if not well_formed:
                record.error = "malformed response body"
        else:
            record.error = f"HTTP {status}"
        scope.calls.append(record)
        return well_formed

    async def aclose(self) -> None:
        await self.inner.aclose()


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
