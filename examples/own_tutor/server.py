"""The own tutor (tutor.py) behind an OpenAI-compatible HTTP endpoint: ``tutor: {kind: http}``.

    python server.py --port 8765        # model from SIMBENCH_MODEL_BASE_URL / SIMBENCH_MODEL / SIMBENCH_MODEL_API_KEY
    python server.py --port 8765 --model-base-url http://127.0.0.1:8080/v1 --model smollm2

Endpoints:

- ``GET /v1/models``: the one model id this server answers as (``own-tutor``);
- ``POST /v1/chat/completions``: a chat completion for the conversation in ``messages`` (a system
  message, if any, becomes the tutor's prompt), with the tutor's settings as extra top-level body
  fields (``top_k``, ``calculator``) and the turn's tool calls as a top-level ``tool_calls`` list of
  ``{name, arguments, result}`` (not OpenAI's ``message.tool_calls``: these are tools the tutor already
  ran, not calls it asks the client to make);
- ``POST /reply``: the same turn for simbench's ``protocol: json``: body ``{"messages", "settings"}``,
  answer ``{"reply": {"text", "tool_calls", "metadata", "usage"}}``.

Tracing: when ``PHOENIX_COLLECTOR_ENDPOINT`` is set (simbench sets it when it starts this app and its
trace store is Phoenix), the server exports its own spans there over OTLP/HTTP, in the project
``PHOENIX_PROJECT_NAME``: one AGENT span per request, the two LLM spans (OpenInference's OpenAI
instrumentor) and a TOOL span per tool. The request's W3C ``traceparent`` makes them children of the
caller's span, and the ``session.id`` in its ``baggage`` becomes their session id, so in Phoenix they sit
inside simbench's session, under simbench's turn. Spans are exported before the response is sent
(a simple span processor), so a session is complete in Phoenix when its turn returns.

SIGTERM or SIGINT stops the server cleanly (exit 0, spans flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import openai  # noqa: E402

from tutor import DEFAULT_MAX_TOKENS, TutorApp, no_span  # noqa: E402

MODEL_ID = "own-tutor"
SETTING_FIELDS = ("top_k", "calculator")


class Tracing:
    """OpenInference tracing of this process, exported to Phoenix; inactive without an endpoint."""

    def __init__(self, endpoint: Optional[str], project: Optional[str]) -> None:
        self.provider = None
        self.tracer = None
        if not endpoint:
            return
        from openinference.instrumentation.openai import OpenAIInstrumentor
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        traces_url = endpoint.rstrip("/")
        if not traces_url.endswith("/v1/traces"):
            traces_url += "/v1/traces"
        resource = Resource.create({"openinference.project.name": project or "default", "service.name": MODEL_ID})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=traces_url)))
        OpenAIInstrumentor().instrument(tracer_provider=self.provider)
        self.tracer = self.provider.get_tracer("own-tutor")

    @contextmanager
    def request(self, headers: Any, name: str, input_value: str) -> Iterator[Callable[[str], None]]:
        """Around one request: the caller's trace context and session, and an AGENT span; yields a
        function that records the reply as the span's output."""
        if self.tracer is None:
            yield lambda output: None
            return
        from openinference.instrumentation import using_session
        from opentelemetry import baggage, context
        from opentelemetry.baggage.propagation import W3CBaggagePropagator
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.trace import Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {k.lower(): v for k, v in headers.items()}
        parent = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]).extract(carrier)
        session_id = baggage.get_baggage("session.id", parent)
        token = context.attach(parent)
        try:
            with ExitStack() as stack:
                if session_id:
                    stack.enter_context(using_session(str(session_id)))
                span = stack.enter_context(self.tracer.start_as_current_span(name, attributes={
                    "openinference.span.kind": "AGENT", "input.value": input_value,
                    "input.mime_type": "application/json", **({"session.id": str(session_id)} if session_id else {}),
                }))
                yield lambda output: span.set_attribute("output.value", output)
                span.set_status(Status(StatusCode.OK))
        finally:
            context.detach(token)

    @contextmanager
    def tool(self, name: str, arguments: dict) -> Iterator[Callable[[Any], None]]:
        """A TOOL span around one tool of the tutor (``TutorApp.tool_span``)."""
        if self.tracer is None:
            with no_span(name, arguments) as record:
                yield record
            return
        from openinference.instrumentation import get_attributes_from_context

        with self.tracer.start_as_current_span(f"tool.{name}") as span:
            span.set_attributes(dict(get_attributes_from_context()))
            span.set_attributes({"openinference.span.kind": "TOOL", "tool.name": name,
                                 "tool.parameters": json.dumps(arguments), "input.value": json.dumps(arguments),
                                 "input.mime_type": "application/json"})
            yield lambda result: span.set_attribute("output.value", json.dumps(result))

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


class TutorServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 resets connections under a concurrent run

    def __init__(self, address: tuple[str, int], client: openai.OpenAI, model: str, max_tokens: int,
                 tracing: Tracing) -> None:
        super().__init__(address, Handler)
        self.client, self.model, self.max_tokens, self.tracing = client, model, max_tokens, tracing

    def app(self) -> TutorApp:
        return TutorApp(client=self.client, model=self.model, max_tokens=self.max_tokens, tool_span=self.tracing.tool)


class Handler(BaseHTTPRequestHandler):
    server: TutorServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request is noise in a run
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "own-tutor"}]})
        else:
            self._send(404, {"error": {"message": f"not found: {self.path}"}})

    def do_POST(self) -> None:
        path = self.path.rstrip("/")
        if path not in ("/v1/chat/completions", "/chat/completions", "/reply"):
            self._send(404, {"error": {"message": f"not found: {self.path}"}})
            return
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
            messages = body["messages"]
            if not isinstance(messages, list):
                raise ValueError("messages must be a list")
        except (ValueError, KeyError, TypeError) as exc:
            self._send(400, {"error": {"message": f"invalid request body: {exc}", "type": "invalid_request_error"}})
            return
        if path == "/reply":
            settings = body.get("settings") or {}
        else:
            settings = {k: body[k] for k in SETTING_FIELDS if k in body}
        prompt = next((m.get("content") for m in messages if m.get("role") in ("system", "developer")), None)
        try:
            with self.server.tracing.request(self.headers, "own_tutor.request", raw.decode("utf-8", "replace")) as done:
                result = self.server.app().turn(messages, settings, prompt=prompt)
                done(result["text"])
        except ValueError as exc:
            self._send(400, {"error": {"message": str(exc), "type": "invalid_request_error"}})
            return
        except openai.APIError as exc:
            self._send(502, {"error": {"message": f"the tutor's model failed: {exc}", "type": "upstream_error"}})
            return
        except Exception as exc:  # noqa: BLE001 - the client gets a 500, the log gets the traceback
            traceback.print_exc()
            self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}})
            return
        if path == "/reply":
            self._send(200, {"reply": result})
            return
        usage = result["usage"]
        self._send(200, {
            "id": f"chatcmpl-own-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or MODEL_ID,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": result["text"]}}],
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
            "tool_calls": result["tool_calls"],
            "metadata": result["metadata"],
        })

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8765))
    parser.add_argument("--model-base-url", default=os.environ.get("SIMBENCH_MODEL_BASE_URL"),
                        help="the tutor's model endpoint (default: env SIMBENCH_MODEL_BASE_URL)")
    parser.add_argument("--model", default=os.environ.get("SIMBENCH_MODEL"),
                        help="the model id to ask for (default: env SIMBENCH_MODEL)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    args = parser.parse_args(argv)
    if not args.model_base_url or not args.model:
        parser.error("no model: pass --model-base-url and --model, or set SIMBENCH_MODEL_BASE_URL and SIMBENCH_MODEL")
    api_key = os.environ.get("SIMBENCH_MODEL_API_KEY") or "none"  # never a flag: flags show up in `ps`
    client = openai.OpenAI(base_url=args.model_base_url, api_key=api_key, max_retries=1, timeout=60)
    tracing = Tracing(os.environ.get("PHOENIX_COLLECTOR_ENDPOINT"), os.environ.get("PHOENIX_PROJECT_NAME"))
    server = TutorServer((args.host, args.port), client, args.model, args.max_tokens, tracing)

    def stop(signum: int, frame: Any) -> None:
        # shutdown() waits for serve_forever() to return, so it must run on another thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"own tutor on http://{args.host}:{server.server_address[1]}/v1 (model {args.model} at {args.model_base_url}"
          f"{'; tracing to ' + os.environ['PHOENIX_COLLECTOR_ENDPOINT'] if tracing.tracer else ''})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        tracing.shutdown()
    print("own tutor stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
