"""A fake OpenAI-compatible server on 127.0.0.1 that plays tutor, student and judge from scripts.

asyncio streams with HTTP/1.1 keep-alive, so it stays cheap under hundreds of concurrent
connections (the benchmarks share 2 cores with the harness). Runs in a background thread for
tests (``FakeOpenAI()`` as a context manager) or as its own process for benchmarks:

    python tests/fake_openai.py --port 8399 --latency 2.0

Roles are told apart the way a real model would see them: a judge request carries a json_schema
``response_format``; a student request's system prompt says it is role-playing a student; anything
else is the tutor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

Script = Callable[[dict], str]


def default_tutor(request: dict) -> str:
    turn = sum(1 for m in request["messages"] if m["role"] == "assistant") + 1
    return f"Tutor turn {turn}: what do you get if both fractions share the denominator 6?"


def default_student(request: dict) -> str:
    turn = sum(1 for m in request["messages"] if m["role"] == "user")
    return f"Student reply {turn}: is it 5/6?"


def default_judge_label(prompt: str, labels: list[str]) -> str:
    return labels[0]


@dataclass
class Fault:
    """Fault injection: the share of requests answered each way (drawn per request)."""

    rate_limit: float = 0.0  # 429 with Retry-After
    server_error: float = 0.0  # 500
    slow: float = 0.0  # sleep ``slow_seconds`` (past the client's timeout)
    truncated: float = 0.0  # a body cut in half
    malformed: float = 0.0  # 200 with a body that is not a completion
    retry_after: float = 0.05
    slow_seconds: float = 5.0


@dataclass
class FakeOpenAI:
    """The server. ``requests`` records every chat request body; ``roles`` counts them by role."""

    latency: float = 0.0
    tutor: Script = default_tutor
    student: Script = default_student
    judge_label: Callable[[str, list[str]], str] = default_judge_label
    judge_reply: Optional[Callable[[str, list[str]], str]] = None  # raw content, to test unparseable answers
    fault: Fault = field(default_factory=Fault)
    seed: int = 0
    keep_requests: bool = True
    port: int = 0
    # Requests naming a model that starts with one of these are answered as OpenAI answers its
    # reasoning models (gpt-5, o3): HTTP 400 for ``max_tokens`` or a temperature other than 1, and
    # ``reasoning_tokens`` of each answer's ``max_completion_tokens`` spent on reasoning first (an
    # answer cut off before any text when the limit is smaller).
    reasoning_prefixes: tuple[str, ...] = ()
    reasoning_tokens: int = 300
    # A thinking model served as a chat model (llama.cpp serving Qwen3, say): it takes max_tokens and
    # a temperature, and spends this many of its max_tokens thinking before it writes.
    thinking_tokens: int = 0

    def __post_init__(self) -> None:
        self.requests: list[dict] = []
        self.roles: Counter = Counter()
        self.statuses: Counter = Counter()
        self._rng = random.Random(self.seed)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self._thread = threading.Thread(target=self._serve_in_thread, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def _serve_in_thread(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self.start())
        self._ready.set()
        self._loop.run_forever()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def chat_calls(self) -> int:
        return sum(self.roles.values())

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, payload, extra = await self._route(method, path, body)
                out = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'ERR'}", "Content-Type: application/json",
                       f"Content-Length: {len(payload)}"]
                out += [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, bytes, dict]:
        if method == "GET" and path.endswith("/models"):
            return 200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode(), {}
        if method == "GET" and path == "/_stats":
            return 200, json.dumps({"roles": dict(self.roles), "statuses": {str(k): v for k, v in self.statuses.items()}}).encode(), {}
        if method != "POST" or not path.endswith("/chat/completions"):
            return 404, b'{"error": {"message": "not found"}}', {}
        request = json.loads(body)
        role = self.role_of(request)
        self.roles[role] += 1
        if self.keep_requests:
            self.requests.append(request)
        if self.latency:
            await asyncio.sleep(self.latency)
        status, payload, extra = await self._maybe_fault()
        if status is None and self._is_reasoning(request):
            status, payload, extra = self._reasoning_refusal(request)
        if status is None:
            status, payload, extra = 200, self._completion(role, request), {}
        self.statuses[status] += 1
        return status, payload, extra

    async def _maybe_fault(self) -> tuple[Optional[int], bytes, dict]:
        f, r = self.fault, self._rng.random()
        for share, kind in ((f.rate_limit, "429"), (f.server_error, "500"), (f.slow, "slow"),
                            (f.truncated, "truncated"), (f.malformed, "malformed")):
            if r < share:
                break
            r -= share
        else:
            return None, b"", {}
        if kind == "429":
            return 429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}', {"Retry-After": str(f.retry_after)}
        if kind == "500":
            return 500, b'{"error": {"message": "internal error"}}', {}
        if kind == "slow":
            await asyncio.sleep(f.slow_seconds)
            return None, b"", {}
        if kind == "truncated":
            return 200, b'{"id": "x", "choices": [{"index": 0, "message": {"role": "assis', {}
        return 200, b'{"unexpected": true}', {}

    # -- roles -----------------------------------------------------------------------------

    @staticmethod
    def role_of(request: dict) -> str:
        if request.get("response_format", {}).get("type") == "json_schema" or request.get("tools"):
            return "judge"
        system = next((m["content"] for m in request["messages"] if m["role"] in ("system", "developer")), "")
        return "student" if "role-playing a student" in system else "tutor"

    def _is_reasoning(self, request: dict) -> bool:
        return bool(self.reasoning_prefixes) and str(request.get("model", "")).startswith(self.reasoning_prefixes)

    @staticmethod
    def _reasoning_refusal(request: dict) -> tuple[Optional[int], bytes, dict]:
        def refused(param: str, code: str, message: str) -> tuple[int, bytes, dict]:
            return 400, json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                              "param": param, "code": code}}).encode(), {}
        if "max_tokens" in request:
            return refused("max_tokens", "unsupported_parameter", "Unsupported parameter: 'max_tokens' is not "
                           "supported with this model. Use 'max_completion_tokens' instead.")
        if request.get("temperature", 1) != 1:
            return refused("temperature", "unsupported_value", f"Unsupported value: 'temperature' does not support "
                           f"{request['temperature']} with this model. Only the default (1) value is supported.")
        return None, b"", {}

    def _completion(self, role: str, request: dict) -> bytes:
        if role == "judge":
            content = self._judge_content(request)
        elif role == "student":
            content = self.student(request)
        else:
            content = self.tutor(request)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request["messages"])
        completion_tokens = len(content.split())
        finish, details = "stop", {}
        thinking, limit = 0, 1_000_000
        if self._is_reasoning(request):
            thinking, limit = self.reasoning_tokens, int(request.get("max_completion_tokens") or limit)
        elif self.thinking_tokens:
            thinking, limit = self.thinking_tokens, int(request.get("max_tokens") or limit)
        if thinking:
            if limit <= thinking:  # the reasoning took the whole limit: no text at all
                content, completion_tokens, finish = "", limit, "length"
            else:
                completion_tokens += thinking
            details = {"completion_tokens_details": {"reasoning_tokens": min(limit, thinking)}}
        message = {"role": "assistant", "content": content}
        if role == "judge" and request.get("tools"):
            # phoenix.evals' fallback when structured output is refused: the answer comes as a tool call
            name = request["tools"][0]["function"]["name"]
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": name, "arguments": content}}]}
        return json.dumps({
            "id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": finish, "message": message}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens, **details},
        }).encode()

    def _judge_content(self, request: dict) -> str:
        if request.get("tools"):
            schema = request["tools"][0]["function"]["parameters"]
        else:
            schema = request["response_format"]["json_schema"]["schema"]
        labels = schema["properties"]["label"]["enum"]
        prompt = "\n".join(str(m.get("content", "")) for m in request["messages"])
        if self.judge_reply is not None:
            return self.judge_reply(prompt, labels)
        label = self.judge_label(prompt, labels)
        return json.dumps({"explanation": f"fake judge chose {label}", "label": label})


def judge_name(prompt: str) -> str:
    """Which built-in judge a prompt belongs to (for scripts that answer per judge)."""
    for name, marker in (("coherence", r"tutor coherent"), ("goal_completion", r"learning goal"),
                         ("frustration", r"frustrated\?"), ("correctness", r"reference answer")):
        if re.search(marker, prompt):
            return name
    return "unknown"


async def _serve_forever(server: FakeOpenAI) -> None:
    await server.start()
    print(f"fake openai server on {server.base_url}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop  # type: ignore

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve_forever(FakeOpenAI(latency=args.latency, port=args.port, keep_requests=False)))


if __name__ == "__main__":
    main()
