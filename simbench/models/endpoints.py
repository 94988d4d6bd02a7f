"""Model endpoints per role: resolve the matrix's named models into clients that share one transport path."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Optional

import httpx2
import openai

from ..matrix import Matrix, ModelSpec
from .cache import ResponseCache
from . import embedded
from .limits import ModelLimiter, RunCounters
from .transport import ModelTransport

LOCAL_API_KEY = "sk-simbench-local"  # the embedded server ignores it; the openai client insists on one
LOCAL_TIMEOUT_S = 600.0


class EndpointError(Exception):
    """A model cannot be reached or configured (missing key, unreachable URL). ``exit_code``: 2 for
    what the user must fix (a refused API key), 3 for a model that does not answer."""

    def __init__(self, message: str, exit_code: int = 3):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Endpoint:
    """A resolved model: where to send requests and which model id to ask for."""

    name: str
    base_url: str
    model: str
    api_key: str
    timeout: float
    local: bool = False
    api_key_env: Optional[str] = None  # the variable that holds the key (for messages)
    reasoning_budget: Optional[int] = None  # a reasoning model's tokens for reasoning (None: not one)

    def __repr__(self) -> str:  # never show the key
        return f"Endpoint(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r})"


def sampling_params(endpoint: Endpoint, max_tokens: int, temperature: Optional[float]) -> dict[str, Any]:
    """The length and sampling fields of a chat request to ``endpoint``, for every role that calls it.

    A reasoning model (``models.NAME.reasoning``) refuses ``max_tokens`` and any temperature but its
    own (HTTP 400), and spends part of its limit reasoning before it writes: it gets
    ``max_completion_tokens`` of the role's ``max_tokens`` plus its reasoning budget, and no temperature.
    """
    if endpoint.reasoning_budget is not None:
        return {"max_completion_tokens": max_tokens + endpoint.reasoning_budget}
    return {"max_tokens": max_tokens} if temperature is None else {"max_tokens": max_tokens, "temperature": temperature}


def resolve_endpoint(name: str, spec: ModelSpec, local_base_url: Optional[str]) -> Endpoint:
    """An Endpoint for a named model; the API key comes from the environment, never from the matrix."""
    if spec.provider == "local":
        if local_base_url is None:
            raise EndpointError(f"model {name!r} is the embedded model, but it was not started")
        # The embedded server is started with the logical name as its alias, so requests name it. On 2 CPU
        # cores one answer can take a minute: the timeout is for a dead server, not a slow one.
        return Endpoint(name, local_base_url, name, LOCAL_API_KEY, max(spec.timeout, LOCAL_TIMEOUT_S), local=True)
    api_key = "sk-no-key-needed"
    if spec.api_key_env:
        api_key = os.environ.get(spec.api_key_env, "")
        if not api_key.strip():
            state = "is not set" if spec.api_key_env not in os.environ else "is set but empty"
            raise EndpointError(f"model {name!r}: environment variable {spec.api_key_env} {state} (it holds the API key)")
    return Endpoint(name, spec.base_url, spec.model, api_key, spec.timeout, api_key_env=spec.api_key_env,
                    reasoning_budget=spec.reasoning_budget if spec.is_reasoning() else None)


CONNECTIONS_PER_POOL = 4


@functools.lru_cache(maxsize=1)
def _ssl_context():
    return httpx2.create_ssl_context()


class ShardedTransport(httpx2.AsyncBaseTransport):
    """Round-robin over several connection pools.

    httpcore's pool probes every idle connection it holds (a socket check each) whenever a request
    arrives or finishes; at 256 connections that scan was a third of the harness CPU, and at 16 per
    pool still ~7%. Pools of ~4 connections keep it short; a busy pool just opens another.
    """

    def __init__(self, connections: int):
        shards = max(1, -(-connections // CONNECTIONS_PER_POOL))
        limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
        ssl_context = _ssl_context()  # one for all pools: building one costs ~40 ms of CPU
        self.pools = [httpx2.AsyncHTTPTransport(verify=ssl_context, limits=limits) for _ in range(shards)]
        self._next = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        pool = self.pools[self._next]
        self._next = (self._next + 1) % len(self.pools)
        return await pool.handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()


def http_client(endpoint: Endpoint, cache: Optional[ResponseCache], limiter: ModelLimiter) -> httpx2.AsyncClient:
    """An async HTTP client whose transport caches, limits, retries and accounts every request."""
    inner = ShardedTransport(limiter.limit.maximum)
    return httpx2.AsyncClient(transport=ModelTransport(endpoint.name, inner, cache, limiter), timeout=endpoint.timeout)


def openai_client(endpoint: Endpoint, cache: Optional[ResponseCache], limiter: ModelLimiter) -> openai.AsyncOpenAI:
    """The client tutor and student calls use. Its own retries are off: the transport retries,
    under the instrumentation, so a retried call still leaves one span."""
    return openai.AsyncOpenAI(
        base_url=endpoint.base_url,
        api_key=endpoint.api_key,
        max_retries=0,
        timeout=endpoint.timeout,
        http_client=http_client(endpoint, cache, limiter),
    )


def limiters_for(matrix: Matrix, counters: RunCounters) -> dict[str, ModelLimiter]:
    """One limiter per logical model that a role uses, shared by every role calling it; a callable or
    http tutor gets its own, under ``tutor.call_name()``, with the tutor's concurrency and retries."""
    out = {}
    for name in matrix.model_names_in_use():
        spec = matrix.model_spec(name)
        if name not in out:
            concurrency = spec.concurrency or matrix.concurrency
            if spec.provider == "local":
                # More requests than the embedded server has slots only wait in its queue, where timeouts hit them.
                concurrency = min(concurrency, embedded.SLOTS)
            out[name] = ModelLimiter(name, concurrency, spec.rpm, spec.tpm, max_retries=spec.max_retries, counters=counters)
    tutor = matrix.tutor
    if tutor.kind in ("callable", "http"):
        out[tutor.call_name()] = ModelLimiter(tutor.call_name(), tutor.concurrency or matrix.concurrency, None, None,
                                              max_retries=tutor.max_retries, counters=counters)
    return out


async def check_reachable(endpoint: Endpoint) -> None:
    """Fail fast (before any model call is spent) when an endpoint does not answer, refuses the API
    key (401/403: exit code 2) or fails (5xx). Other answers pass: a server may have no /models route."""
    url = endpoint.base_url.rstrip("/") + "/models"
    try:
        async with httpx2.AsyncClient(timeout=10) as client:
            response = await client.get(url, headers={"Authorization": f"Bearer {endpoint.api_key}"})
    except httpx2.HTTPError as exc:
        raise EndpointError(f"model {endpoint.name!r} at {endpoint.base_url} is unreachable: {type(exc).__name__}: {exc}") from None
    status = response.status_code
    if status in (401, 403):
        fix = (f"check the API key in ${endpoint.api_key_env}" if endpoint.api_key_env else
               f"it needs an API key: set api_key_env of model {endpoint.name!r} to the variable that holds it")
        raise EndpointError(f"model {endpoint.name!r} at {endpoint.base_url} refused the request (HTTP {status}): {fix}", 2)
    if status >= 500:
        raise EndpointError(f"model {endpoint.name!r} at {endpoint.base_url} is failing: GET {url} answered HTTP {status}")


def endpoints_for(matrix: Matrix, local_base_url: Optional[str]) -> dict[str, Endpoint]:
    """Endpoints by role ("student", "judge"), for every model a tutor variant uses, by
    ``tutor:<model name>``, and for every model a judge runs on, by ``judge:<model name>`` (a custom
    judge may name its own model)."""
    out = {}
    for role in ("student", "judge") if matrix.simulates() else ("judge",):
        name, spec = matrix.model_for(role)
        out[role] = resolve_endpoint(name, spec, local_base_url)
    for name in matrix.tutor.model_names():
        out[f"tutor:{name}"] = resolve_endpoint(name, matrix.model_spec(name), local_base_url)
    for name in matrix.judge_model_names():
        out[f"judge:{name}"] = resolve_endpoint(name, matrix.model_spec(name), local_base_url)
    return out
