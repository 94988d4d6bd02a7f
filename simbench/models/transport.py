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
from typing import Awaitable, Callable, Iterator, Optional

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


_call_sink: contextvars.ContextVar[Optional[list[CallRecord]]] = contextvars.ContextVar("simbench_call_sink", default=None)


@contextmanager
def call_sink(records: list[CallRecord]) -> Iterator[list[CallRecord]]:
    """Also collect into ``records`` every CallRecord made inside the block (in this task), whatever
    its scope: work cancelled before it committed its calls (Ctrl-C) can still record what they cost."""
    token = _call_sink.set(records)
    try:
        yield records
    finally:
        _call_sink.reset(token)


def _add(scope: CallScope, record: CallRecord) -> None:
    scope.calls.append(record)
    sink = _call_sink.get()
    if sink is not None:
        sink.append(record)


_DROP_HEADERS = {"content-encoding", "content-length", "transfer-encoding"}
_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
_TRANSIENT = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)


@dataclass
class Attempt:
    """What one attempt of a call gave: its answer (``content``) or why it failed."""

    status: int = 200  # HTTP status; 0 when no answer came
    content: bytes = b""
    content_type: str = "application/json"
    error: Optional[str] = None  # None only for an answer the caller can use
    retryable: bool = True
    retry_after: Optional[float] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    raised: Optional[BaseException] = None  # a transport error, raised again when the call gives up
    response: Optional[httpx2.Response] = None


async def guarded_call(name: str, limiter: ModelLimiter, cache: Optional[ResponseCache], key: Optional[str],
                       estimate: int, attempt_once: Callable[[], Awaitable[Attempt]],
                       judge_cached: Callable[[bytes], Attempt]) -> Attempt:
    """Every call simbench makes, to a model, a user's function or a user's app, goes through here:
    the response cache (``key``; None: not cached), the limiter's slot and windows, retries with
    back-off up to ``limiter.max_retries``, and one CallRecord per attempt in the caller's scope.
    Returns the good attempt, or the last failed one (the caller records it as the call's error)."""
    scope = current_scope() or CallScope(role="unscoped", sample_key="")
    if key is not None:
        hit = cache.get(key)
        if hit is not None:
            content_type, content = hit
            result = judge_cached(content)
            result.content_type = content_type
            _add(scope, CallRecord(scope.role, name, 200, True, 0.0, result.prompt_tokens, result.completion_tokens,
                                   attempt=0))
            return result
    attempt = 0
    while True:
        async with limiter.slot(estimate) as window_event:
            started = time.perf_counter()
            try:
                result = await attempt_once()
            except asyncio.CancelledError:  # Ctrl-C mid-call: it may have reached the model, so count it
                _add(scope, CallRecord(scope.role, name, 0, False, time.perf_counter() - started,
                                       error="cancelled", attempt=attempt))
                raise
            latency = time.perf_counter() - started
        _add(scope, CallRecord(scope.role, name, result.status, False, latency, result.prompt_tokens,
                               result.completion_tokens, error=result.error, attempt=attempt))
        if result.raised is None:
            limiter.used_tokens(window_event, result.prompt_tokens + result.completion_tokens)
        if result.error is None:
            limiter.on_success()
            if key is not None:
                cache.put(key, name, result.content_type, result.content)
            return result
        if result.status == 429:
            limiter.on_rate_limited()
        if not result.retryable or attempt >= limiter.max_retries:
            limiter.counters.failed_calls += 1
            return result
        attempt += 1
        limiter.counters.retries += 1
        await asyncio.sleep(limiter.backoff(attempt, result.retry_after))


def completion_usage(content: bytes) -> tuple[int, int]:
    """(prompt, completion) tokens of a well-formed chat completion; ValueError if it is not one."""
    try:
        payload = json.loads(content)
        if not (isinstance(payload, dict) and payload.get("choices")):
            raise ValueError
        usage = payload.get("usage") or {}
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (ValueError, TypeError, AttributeError):
        raise ValueError("malformed response body") from None


# A request may carry what its cache key is made of instead of its body (an app's request holds the
# session id, which differs every run): ``extensions={CACHE_MATERIAL: b"..."}``.
CACHE_MATERIAL = "simbench.cache_material"


class ModelTransport(httpx2.AsyncBaseTransport):
    """Cache, limit, retry and account every request to one logical model (or app), then pass it on.

    Retries live here (the openai client's own are off) so that every role, judges included, gets
    the same back-off: Retry-After on 429 with jitter, exponential back-off on 5xx, timeouts,
    connection errors and malformed bodies, up to the limiter's ``max_retries``. A request that
    still fails returns its last answer (or raises its last error) for the caller to record.
    ``usage_of`` reads a 200 answer's tokens and raises ValueError (the attempt's error, retried)
    when the answer is not one the caller can use; by default, a chat completion.
    """

    def __init__(self, model_name: str, inner: httpx2.AsyncBaseTransport, cache: Optional[ResponseCache],
                 limiter: ModelLimiter, usage_of: Callable[[bytes], tuple[int, int]] = completion_usage):
        self.model_name = model_name
        self.inner = inner
        self.cache = cache
        self.limiter = limiter
        self.usage_of = usage_of

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        scope = current_scope() or CallScope(role="unscoped", sample_key="")
        body = await request.aread()
        material = request.extensions.get(CACHE_MATERIAL, body)
        key = cache_key(self.model_name, material, scope.sample_key, scope.judge_sample) if self.cache else None
        estimate = _estimated_tokens(body) if self.limiter.tokens is not None else 0

        async def attempt_once() -> Attempt:
            try:
                response = await self.inner.handle_async_request(request)
                content = await response.aread()
            except _TRANSIENT as exc:
                return Attempt(status=0, error=_short(exc), raised=exc)
            result = self._judged(response.status_code, content)
            result.response = response
            result.content_type = response.headers.get("content-type", "application/json")
            result.retry_after = parse_retry_after(response.headers.get("retry-after"))
            return result

        result = await guarded_call(self.model_name, self.limiter, self.cache, key, estimate, attempt_once,
                                    lambda content: self._judged(200, content))
        if result.response is None and result.raised is not None:
            raise result.raised
        if result.response is None:  # from the cache
            return httpx2.Response(200, headers={"content-type": result.content_type}, content=result.content,
                                   request=request)
        return _rebuilt(result.response, result.content, request)

    def _judged(self, status: int, content: bytes) -> Attempt:
        if status != 200:
            return Attempt(status, content, error=f"HTTP {status}", retryable=status in _RETRYABLE_STATUS)
        try:
            prompt_tokens, completion_tokens = self.usage_of(content)
        except ValueError as exc:
            return Attempt(status, content, error=str(exc) or "malformed response body")
        return Attempt(status, content, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

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
        request = json.loads(body)
        max_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 256)
    except (ValueError, AttributeError, TypeError):
        max_tokens = 256
    return len(body) // 4 + max_tokens


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
