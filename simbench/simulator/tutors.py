"""The assistant under test, of each kind: a prompt sent to a model, the user's Python function, or
the user's running app. Each answers one tutor turn (``reply``) through the one call path
(``models.transport.guarded_call``): the same cache, limits, retries and accounting as model calls.
The turn's span is opened by the turn loop (session.py); whatever a tutor calls nests under it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import httpx2
from opentelemetry import baggage
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..agent import ModelEndpoint, ToolCall, TurnContext, TutorReply
from ..matrix import Matrix, http_body_context, is_missing, load_callable, render_user_template, select
from ..models.cache import ResponseCache, cache_key
from ..models.endpoints import Endpoint, ShardedTransport, openai_client
from ..models.limits import ModelLimiter
from ..models.transport import CACHE_MATERIAL, Attempt, ModelTransport, guarded_call
from ..records import Message
from .agents import Agent, tutor_messages


class TutorError(Exception):
    """A tutor turn that failed after its retries; the message says why (it becomes the session's error)."""


@dataclass
class TutorAnswer:
    """One tutor turn's reply, with what the turn's span shows of it."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    chat_messages: Optional[list[dict]] = None
    """The request's messages when the reply came from one chat call (``llm.input_messages``)."""


class Tutor(Protocol):
    def model_for(self, variant: str) -> Optional[ModelEndpoint]:
        """The model a variant's agent is handed (``TurnContext.model``)."""

    async def reply(self, history: list[Message], context: TurnContext) -> TutorAnswer: ...

    async def aclose(self) -> None: ...


class _Variants:
    """What every kind knows of its variants: the model each is handed."""

    def __init__(self, matrix: Matrix, endpoints: dict[str, Endpoint]):
        self._models = {v: model_endpoint(endpoints, matrix.tutor.model_of(v)) for v in matrix.tutor.variants}

    def model_for(self, variant: str) -> Optional[ModelEndpoint]:
        return self._models[variant]


def conversation(history: list[Message]) -> list[dict]:
    """The conversation as the tutor sees it: the student is ``user``, the tutor ``assistant``."""
    return [{"role": "user" if m.role == "student" else "assistant", "content": m.content} for m in history]


def _cache_material(context: TurnContext, messages: list[dict]) -> bytes:
    """What a callable's or app's answer depends on, as far as simbench knows: never the session id
    or trace headers, so a re-run of the same conversation hits the cache."""
    return json.dumps({"messages": messages, "variant": context.variant, "settings": context.settings,
                       "prompt": context.prompt, "model": context.model.name if context.model else None,
                       "temperature": context.temperature, "max_tokens": context.max_tokens},
                      sort_keys=True, default=str).encode()


# -- prompt ---------------------------------------------------------------------------------


class PromptTutor(_Variants):
    """A system prompt per variant, sent to the variant's model with its sampling settings."""

    def __init__(self, matrix: Matrix, endpoints: dict[str, Endpoint], cache: Optional[ResponseCache],
                 limiters: dict[str, ModelLimiter]):
        super().__init__(matrix, endpoints)
        tutor = matrix.tutor
        self.clients = {name: openai_client(endpoints[f"tutor:{name}"], cache, limiters[name])
                        for name in tutor.model_names()}
        self.agents = {variant: Agent(self.clients[tutor.model_of(variant)], endpoints[f"tutor:{tutor.model_of(variant)}"],
                                      tutor.max_tokens_of(variant), tutor.temperature_of(variant))
                       for variant in tutor.variants}

    async def reply(self, history: list[Message], context: TurnContext) -> TutorAnswer:
        messages = tutor_messages(context.prompt or "", history)
        text = await self.agents[context.variant].reply(messages)
        return TutorAnswer(text, chat_messages=messages)

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.close()


# -- callable -------------------------------------------------------------------------------


def _as_reply(value: Any) -> TutorReply:
    """A callable's return value as a TutorReply; TypeError naming what came back instead."""
    if isinstance(value, str):
        return TutorReply(value)
    if isinstance(value, TutorReply):
        reply = value
    elif isinstance(value, dict) and isinstance(value.get("text"), str):
        unknown = set(value) - {"text", "tool_calls", "metadata", "usage"}
        if unknown:
            raise TypeError(f"the reply dict has unknown keys {sorted(unknown)} (text, tool_calls, metadata, usage)")
        reply = TutorReply(value["text"], list(value.get("tool_calls") or []), dict(value.get("metadata") or {}),
                           value.get("usage"))
    else:
        shown = type(value).__name__ if not isinstance(value, dict) else "a dict without a 'text' string"
        raise TypeError(f"returned {shown}; a tutor returns the reply text, a TutorReply, or a dict with 'text'")
    if not isinstance(reply.text, str):
        raise TypeError(f"the reply's text is a {type(reply.text).__name__}, not a string")
    reply.tool_calls = [_as_tool_call(t) for t in reply.tool_calls]
    return reply


def _as_tool_call(value: Any) -> ToolCall:
    if isinstance(value, ToolCall):
        return value
    if isinstance(value, dict):
        function = value.get("function") if isinstance(value.get("function"), dict) else None
        if function is not None:  # OpenAI's shape: {"function": {"name", "arguments"}}
            return ToolCall(str(function.get("name", "")), function.get("arguments"), value.get("result"))
        if isinstance(value.get("name"), str):
            return ToolCall(value["name"], value.get("arguments"), value.get("result"))
    raise TypeError(f"a tool call must be a ToolCall or a dict with 'name' (and 'arguments', 'result'), got {value!r:.80}")


def _reply_bytes(reply: TutorReply) -> bytes:
    return json.dumps({"text": reply.text, "tool_calls": [asdict(t) for t in reply.tool_calls],
                       "metadata": reply.metadata, "usage": reply.usage}, default=str).encode()


def _answer_from_bytes(content: bytes) -> TutorAnswer:
    data = json.loads(content)
    return TutorAnswer(data["text"], [ToolCall(**t) for t in data.get("tool_calls") or []], data.get("metadata") or {})


def _usage(usage: Any) -> tuple[int, int]:
    if not isinstance(usage, dict):
        return 0, 0
    try:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        return 0, 0


def _reply_attempt(content: bytes, usage: Any) -> Attempt:
    prompt_tokens, completion_tokens = _usage(usage)
    return Attempt(200, content, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def _cached_reply(content: bytes) -> Attempt:
    """A reply the cache holds (``_reply_bytes``), with the tokens it recorded."""
    return _reply_attempt(content, json.loads(content).get("usage"))


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a sync function in its own daemon thread, with this task's context (tracing, session
    attributes) copied in. A daemon thread, not a pool's: a function that hangs past its timeout
    must not keep the process from exiting."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, error: Optional[BaseException]) -> None:
        if future.done():  # the caller gave up (timeout, Ctrl-C)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def work() -> None:
        value, error = None, None
        try:
            value = context.run(fn, *args)
        except BaseException as exc:  # handed to the awaiting task, which records it
            error = exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the run ended while this call hung past its timeout: nobody waits
            pass

    threading.Thread(target=work, name="simbench-tutor", daemon=True).start()
    return await future


class _Exited(Exception):
    """A ``SystemExit`` (or another ``BaseException`` but Ctrl-C) from the user's function, carried
    as an ``Exception`` so that it fails the turn: raised as itself, asyncio would stop the run."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


class CallableTutor(_Variants):
    """The user's function, called once per turn with the conversation and a TurnContext."""

    def __init__(self, matrix: Matrix, endpoints: dict[str, Endpoint], cache: Optional[ResponseCache],
                 limiters: dict[str, ModelLimiter]):
        super().__init__(matrix, endpoints)
        tutor = matrix.tutor
        self.target = tutor.callable
        self.function = load_callable(tutor.callable, Path(matrix.base_dir) if matrix.base_dir else None)
        self.is_async = inspect.iscoroutinefunction(self.function) or inspect.iscoroutinefunction(
            getattr(self.function, "__call__", None))
        self.name = tutor.call_name()
        self.limiter = limiters[self.name]
        self.cache = cache if tutor.cache else None
        self.timeout = tutor.timeout

    async def reply(self, history: list[Message], context: TurnContext) -> TutorAnswer:
        messages = conversation(history)
        key = cache_key(self.name, _cache_material(context, messages), context.sample_id, None) if self.cache else None

        async def attempt_once() -> Attempt:
            try:
                value = await asyncio.wait_for(self._invoke(messages, context), self.timeout)
            except asyncio.TimeoutError:
                return Attempt(status=0, error=f"{self.target} did not return within {self.timeout:g} s (tutor.timeout)")
            except Exception as exc:
                raised = exc.original if isinstance(exc, _Exited) else exc
                return Attempt(status=0, error=f"{self.target} raised {type(raised).__name__}: {raised}"[:500])
            try:
                reply = _as_reply(value)
                content = _reply_bytes(reply)
            except (TypeError, ValueError) as exc:  # the same function will return the same kind of thing
                return Attempt(status=0, error=f"{self.target} {exc}"[:500], retryable=False)
            return _reply_attempt(content, reply.usage)

        result = await guarded_call(self.name, self.limiter, self.cache, key, 0, attempt_once, _cached_reply)
        if result.error is not None:
            raise TutorError(result.error)
        return _answer_from_bytes(result.content)

    async def _invoke(self, messages: list[dict], context: TurnContext) -> Any:
        try:
            if self.is_async:
                return await self.function(messages, context)
            value = await _in_thread(self.function, messages, context)
            if inspect.isawaitable(value):  # a sync wrapper that returned a coroutine
                value = await value
            return value
        except (Exception, KeyboardInterrupt, asyncio.CancelledError):
            raise
        except BaseException as exc:  # sys.exit() in the user's code: asyncio would end the whole run with it
            raise _Exited(exc) from None

    async def aclose(self) -> None:
        pass


# -- http -----------------------------------------------------------------------------------


class HttpTutor(_Variants):
    """The user's running app: an OpenAI-compatible chat endpoint (``protocol: openai``), or any
    JSON endpoint with a body template and a reply selector (``protocol: json``)."""

    def __init__(self, matrix: Matrix, endpoints: dict[str, Endpoint], base_url: str, headers: dict[str, str],
                 cache: Optional[ResponseCache], limiters: dict[str, ModelLimiter]):
        super().__init__(matrix, endpoints)
        tutor = matrix.tutor
        self.spec = tutor.http
        self.name = tutor.call_name()
        self.url = base_url.rstrip("/") + "/chat/completions" if self.spec.protocol == "openai" else base_url
        self.reply_selector = self.spec.reply or "$.choices[0].message.content"
        self.headers = headers
        limiter = limiters[self.name]
        transport = ModelTransport(self.name, ShardedTransport(limiter.limit.maximum), cache if tutor.cache else None,
                                   limiter, usage_of=self._usage_of)
        self.timeout = tutor.timeout
        self.client = httpx2.AsyncClient(transport=transport, timeout=self.timeout)

    def _usage_of(self, content: bytes) -> tuple[int, int]:
        """Tokens of a usable answer; ValueError (retried, then the turn's error) when it is not one."""
        try:
            payload = json.loads(content)
        except ValueError:
            raise ValueError("the app's answer is not JSON") from None
        text = select(payload, self.reply_selector)
        if is_missing(text):
            raise ValueError(f"the reply selector {self.reply_selector} matched nothing in the app's answer")
        if not isinstance(text, str):
            raise ValueError(f"the reply selector {self.reply_selector} matched a {type(text).__name__}, not text")
        return _usage(payload.get("usage") if isinstance(payload, dict) else None)

    def _body(self, messages: list[dict], context: TurnContext) -> dict:
        if self.spec.protocol == "openai":
            system = [{"role": "system", "content": context.prompt}] if context.prompt else []
            return {"model": self.spec.model or context.variant, "messages": system + messages,
                    "max_tokens": context.max_tokens, "temperature": context.temperature, **context.settings}
        rendered = render_user_template(self.spec.body, **http_body_context(
            messages=messages, last_message=messages[-1]["content"] if messages else "", session_id=context.session_id,
            sample_id=context.sample_id, settings=context.settings, variant=context.variant, prompt=context.prompt,
            turn=context.turn, topic=context.topic, persona=context.persona, model=self.spec.model,
            max_tokens=context.max_tokens, temperature=context.temperature))
        return json.loads(rendered)

    async def reply(self, history: list[Message], context: TurnContext) -> TutorAnswer:
        messages = conversation(history)
        body = self._body(messages, context)
        headers = {"content-type": "application/json", **self.headers}
        # The app's own spans join the turn's trace and the session (W3C trace context and baggage).
        TraceContextTextMapPropagator().inject(headers)
        W3CBaggagePropagator().inject(headers, context=baggage.set_baggage("session.id", context.session_id))
        try:
            response = await self.client.post(self.url, content=json.dumps(body).encode(), headers=headers,
                                              extensions={CACHE_MATERIAL: _cache_material(context, messages)})
        except httpx2.TimeoutException:
            raise TutorError(f"the app at {self.url} did not answer within {self.timeout:g} s (tutor.timeout)") from None
        except httpx2.HTTPError as exc:
            raise TutorError(f"the app at {self.url} did not answer: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise TutorError(f"the app at {self.url} answered HTTP {response.status_code}: {response.text[:200]}")
        try:
            self._usage_of(response.content)
            payload = response.json()
        except ValueError as exc:
            raise TutorError(f"the app at {self.url}: {exc}") from None
        text = select(payload, self.reply_selector).strip()
        tool_calls: list[ToolCall] = []
        if self.spec.tool_calls:
            found = select(payload, self.spec.tool_calls)
            if isinstance(found, list):
                tool_calls = [_as_tool_call(t) for t in found]
        chat = body["messages"] if self.spec.protocol == "openai" else None
        return TutorAnswer(text, tool_calls, chat_messages=chat)

    async def aclose(self) -> None:
        await self.client.aclose()


def model_endpoint(endpoints: dict[str, Endpoint], name: Optional[str]) -> Optional[ModelEndpoint]:
    """The model a variant's agent may call, as the agent sees it."""
    if name is None:
        return None
    endpoint = endpoints[f"tutor:{name}"]
    return ModelEndpoint(name, endpoint.base_url, endpoint.model, endpoint.api_key)
