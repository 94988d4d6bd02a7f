"""The one path every model call takes: an HTTP transport under the openai client.

It sits *under* the OpenInference instrumentation (it is the client's ``http_client`` transport),
so a cache hit still produces the tutor's span, and it sees every attempt of a retried call.
Here, and only here: the response cache, the per-model limits, retries with back-off, and per-call
accounting (tokens, latency, status).

Who is calling (role, sample, judgement sample) travels in a contextvar, ``CallScope``: it follows
asyncio tasks, so the caller opens a scope around its model call and the transport reads it.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import httpx2

from ..records import CallRecord
from .cache import ResponseCache, cache_key
from .limits import ModelLimiter, parse_retry_after


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
_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
_TRANSIENT = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)


class ModelTransport(httpx2.AsyncBaseTransport):
    """Cache, limit, retry and account every request to one logical model, then pass it on.

    Retries live here (the openai client's own are off) so that every role, judges included, gets
    the same back-off: Retry-After on 429 with jitter, exponential back-off on 5xx, timeouts,
    connection errors and malformed bodies, up to the limiter's ``max_retries``. A request that
    still fails returns its last answer (or raises its last error) for the caller to record.
    """

    def __init__(self, model_name: str, inner: httpx2.AsyncBaseTransport, cache: Optional[ResponseCache],
                 limiter: ModelLimiter):
        self.model_name = model_name
        self.inner = inner
        self.cache = cache
        self.limiter = limiter

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        scope = current_scope() or CallScope(role="unscoped", sample_key="")
        body = await request.aread()
        key = cache_key(self.model_name, body, scope.sample_key, scope.judge_sample) if self.cache else None
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                content_type, content = hit
                self._record(scope, 0, 200, True, 0.0, content)
                return httpx2.Response(200, headers={"content-type": content_type}, content=content, request=request)

        estimate = _estimated_tokens(body) if self.limiter.tokens is not None else 0
        attempt = 0
        while True:
            async with self.limiter.slot(estimate) as window_event:
                started = time.perf_counter()
                try:
                    response = await self.inner.handle_async_request(request)
                    content = await response.aread()
                    error: Optional[BaseException] = None
                except _TRANSIENT as exc:
                    response, content, error = None, b"", exc
                latency = time.perf_counter() - started
            if error is not None:
                scope.calls.append(CallRecord(scope.role, self.model_name, 0, False, latency, error=_short(error), attempt=attempt))
                retryable, retry_after = True, None
            else:
                record = self._record(scope, attempt, response.status_code, False, latency, content)
                self.limiter.used_tokens(window_event, record.prompt_tokens + record.completion_tokens)
                if record.error is None:
                    self.limiter.on_success()
                    if key is not None:
                        self.cache.put(key, self.model_name, response.headers.get("content-type", "application/json"), content)
                    return _rebuilt(response, content, request)
                if response.status_code == 429:
                    self.limiter.on_rate_limited()
                retryable = response.status_code in _RETRYABLE_STATUS or response.status_code == 200
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            if not retryable or attempt >= self.limiter.max_retries:
                self.limiter.counters.failed_calls += 1
                if error is not None:
                    raise error
                return _rebuilt(response, content, request)
            attempt += 1
            self.limiter.counters.retries += 1
            await asyncio.sleep(self.limiter.backoff(attempt, retry_after))

    def _record(self, scope: CallScope, attempt: int, status: int, cached: bool, latency: float, content: bytes) -> CallRecord:
        """Append the CallRecord of one attempt; its ``error`` is None only for a well-formed completion."""
        record = CallRecord(scope.role, self.model_name, status, cached, latency, attempt=attempt)
        if status == 200:
            try:
                payload = json.loads(content)
                if not (isinstance(payload, dict) and payload.get("choices")):
                    raise ValueError
                usage = payload.get("usage") or {}
                record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                record.completion_tokens = int(usage.get("completion_tokens") or 0)
            except (ValueError, TypeError, AttributeError):
                record.error = "malformed response body"
        else:
            record.error = f"HTTP {status}"
        scope.calls.append(record)
        return record

    async def aclose(self) -> None:
        await self.inner.aclose()


def _rebuilt(response: httpx2.Response, content: bytes, request: httpx2.Request) -> httpx2.Response:
    """The response with its body already read (and decoded), as the client above expects it."""
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _DROP_HEADERS]
    return httpx2.Response(response.status_code, headers=headers, content=content, request=request,
                           extensions=response.extensions)


def _estimated_tokens(body: bytes) -> int:
    """Prompt tokens (about 4 bytes each) plus the answer's ceiling, for the tpm window."""
    try:
        max_tokens = int(json.loads(body).get("max_tokens") or 256)
    except (ValueError, AttributeError, TypeError):
        max_tokens = 256
    return len(body) // 4 + max_tokens


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
