"""The own-tutor example (examples/own_tutor): its retrieval, calculator, callable and HTTP server.

These need no simbench core: the callable is called the way simbench calls it (messages and a
``simbench.agent.TurnContext``), and the server runs as its own process against the fake OpenAI
server, with a small OTLP/HTTP collector in this process standing in for Phoenix's span receiver.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Iterator

import httpx
import pytest

from simbench.agent import ModelEndpoint, ToolCall, TurnContext, TutorReply
from test_phoenix import phoenix_server  # noqa: F401  (a fixture: a real Phoenix server, or a skip)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "own_tutor"


def _load_example() -> ModuleType:
    # under its own name, not as `tutor`: another test's matrix may import a `tutor` module of its own
    spec = importlib.util.spec_from_file_location("own_tutor_example_tutor", EXAMPLE / "tutor.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tutor = _load_example()

OPENING = "Why isn't 1/2 + 1/3 equal to 2/5?"
FOCUS = "adding fractions with a common denominator"


def scripted_tutor(request: dict) -> str:
    """The fake model's answers: the focus line for call 1, a reply for call 2."""
    system = request["messages"][0]["content"]
    return FOCUS if system == tutor.FOCUS_PROMPT else "Write both as sixths first: what is 1/2 in sixths?"


def context_for(base_url: str, **overrides) -> TurnContext:
    fields = dict(session_id="run1/sample1/1", sample_id="sample1", attempt=1, variant="with_notes",
                  settings={"top_k": 1, "calculator": True}, prompt=None, topic={"name": "adding fractions"},
                  persona="confused_novice", turn=1,
                  model=ModelEndpoint(name="fake", base_url=base_url, model="fake-model", api_key="test-key"))
    fields.update(overrides)
    return TurnContext(**fields)


# -- retrieval and the calculator ---------------------------------------------------------------------


@pytest.mark.parametrize("query, expected", [
    ("How do I find a common denominator to add fractions?", "adding-fractions"),
    ("What is 3/4 divided by 1/2? I got 3/8.", "dividing-fractions"),
    ("how do I turn 3/8 into a decimal", "fractions-and-decimals"),
    ("can I simplify 6/4", "equivalent-fractions"),
])
def test_retrieval_picks_the_paragraph_about_the_question(query, expected):
    assert tutor.retrieve(query, 1)[0].id == expected
    assert [n.id for n in tutor.retrieve(query, 2)][0] == expected


def test_retrieval_returns_nothing_for_top_k_0_or_no_shared_words():
    assert tutor.retrieve("common denominator", 0) == []
    assert tutor.retrieve("zebra giraffe", 3) == []
    assert len(tutor.retrieve("fraction denominator numerator", 10)) == len(tutor.NOTES) == 6


def test_calculator_is_exact_on_fractions_and_decimals():
    assert tutor.calculate("1/2 + 1/3") == Fraction(5, 6)
    assert tutor.format_number(tutor.calculate("1/2 + 1/3")) == "5/6"
    assert tutor.calculate("(3/4) / (1/2)") == Fraction(3, 2)
    assert tutor.calculate("0.1 + 0.2") == Fraction(3, 10)
    assert tutor.format_number(tutor.calculate("2**3 * 1.5")) == "12"
    assert tutor.calculate("-(1/2)") == Fraction(-1, 2)


@pytest.mark.parametrize("expression", [
    "__import__('os')", "__import__('os').system('true')", "().__class__", "x + 1", "'a' * 3",
    "2 ** 10 ** 10", "1/0", "[1, 2]", "1 if 1 else 2", "1 +",
])
def test_calculator_refuses_what_is_not_plain_arithmetic(expression):
    with pytest.raises(tutor.CalculatorError):
        tutor.calculate(expression)


@pytest.mark.parametrize("message, value", [
    (OPENING, Fraction(5, 6)),
    ("What is 3/4 divided by 1/2? I got 3/8.", Fraction(3, 2)),
    ("so 3/4 ÷ 1/2 is what", Fraction(3, 2)),
    ("is 2/3 times 3/4 a half", Fraction(1, 2)),
    ("and 5 - 1/4?", Fraction(19, 4)),
])
def test_the_expression_in_a_message_is_found_and_read_as_the_student_means_it(message, value):
    assert tutor.calculate(tutor.find_expression(message)) == value


@pytest.mark.parametrize("message", ["I got 3/8", "I don't get fractions at all", "is 6/4 simplified?"])
def test_a_message_without_a_calculation_has_no_expression(message):
    assert tutor.find_expression(message) is None


# -- the callable ----------------------------------------------------------------------------------------


def test_reply_makes_two_model_calls_and_returns_its_tool_calls(make_fake):
    fake = make_fake(tutor=scripted_tutor)
    result = tutor.reply([{"role": "user", "content": OPENING}], context_for(fake.base_url))

    assert len(fake.requests) == 2
    focus_request, answer_request = fake.requests
    assert focus_request["messages"] == [{"role": "system", "content": tutor.FOCUS_PROMPT},
                                         {"role": "user", "content": OPENING}]
    assert all(r["model"] == "fake-model" for r in fake.requests)
    assert [r["max_tokens"] for r in fake.requests] == [tutor.FOCUS_MAX_TOKENS, tutor.DEFAULT_MAX_TOKENS]
    system = answer_request["messages"][0]["content"]
    assert f"The student needs help with: {FOCUS}" in system
    assert "3/6 + 2/6 = 5/6" in system  # the adding-fractions paragraph, and only it (top_k 1)
    assert "reciprocal" not in system
    assert "Calculator: (1/2) + (1/3) = 5/6" in system
    assert answer_request["messages"][1:] == [{"role": "user", "content": OPENING}]

    assert result["text"] == "Write both as sixths first: what is 1/2 in sixths?"
    assert result["tool_calls"] == [
        {"name": "search_notes", "arguments": {"query": f"{FOCUS} {OPENING}", "top_k": 1},
         "result": ["adding-fractions"]},
        {"name": "calculator", "arguments": {"expression": "(1/2) + (1/3)"}, "result": "5/6"},
    ]
    assert result["usage"]["prompt_tokens"] > 0 and result["usage"]["completion_tokens"] > 0
    # the dict is TutorReply's shape: simbench builds one from it
    as_record = TutorReply(**{**result, "tool_calls": [ToolCall(**t) for t in result["tool_calls"]]})
    assert as_record.tool_calls[1].result == "5/6"


def test_reply_without_notes_or_calculator_still_calls_the_model_twice_and_keeps_the_conversation(make_fake):
    fake = make_fake(tutor=scripted_tutor)
    conversation = [{"role": "user", "content": OPENING}, {"role": "assistant", "content": "What is a half in sixths?"},
                    {"role": "user", "content": "3/6? so 3/6 + 2/6"}]
    context = context_for(fake.base_url, settings={"top_k": 0, "calculator": False}, prompt="Be brief.",
                          max_tokens=40, temperature=0.3, turn=2)
    result = tutor.reply(conversation, context)

    assert len(fake.requests) == 2
    answer_request = fake.requests[1]
    assert answer_request["messages"][0]["content"].startswith("Be brief.")
    assert "Course notes" not in answer_request["messages"][0]["content"]
    assert "Calculator" not in answer_request["messages"][0]["content"]
    assert answer_request["messages"][1:] == conversation
    assert answer_request["max_tokens"] == 40 and answer_request["temperature"] == 0.3
    assert result["tool_calls"] == []


def test_reply_names_the_setting_that_is_wrong(make_fake):
    fake = make_fake(tutor=scripted_tutor)
    with pytest.raises(ValueError, match="settings.top_k"):
        tutor.reply([{"role": "user", "content": OPENING}], context_for(fake.base_url, settings={"top_k": "two"}))
    assert fake.requests == []


# -- the HTTP server -------------------------------------------------------------------------------------


@contextmanager
def own_tutor_server(model_base_url: str, **env: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """server.py as its own process on a free port; yields (process, its /v1 base URL)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "OTEL_", "SIMBENCH_MODEL"))}
    child_env.update(SIMBENCH_MODEL_BASE_URL=model_base_url, SIMBENCH_MODEL="fake-model",
                     SIMBENCH_MODEL_API_KEY="test-key", **env)
    process = subprocess.Popen([sys.executable, str(EXAMPLE / "server.py"), "--port", "0"], env=child_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        line = process.stdout.readline() if ready else ""
        assert line.startswith("own tutor on "), f"server.py did not start: {line!r} {process.stderr.read() if process.poll() is not None else ''}"
        yield process, line.split()[3]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(15)


def test_server_answers_models_and_a_chat_completion_with_tool_calls_and_stops_on_sigterm(make_fake):
    fake = make_fake(tutor=scripted_tutor)
    with own_tutor_server(fake.base_url) as (process, base_url):
        models = httpx.get(f"{base_url}/models", timeout=10)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "own-tutor"

        response = httpx.post(f"{base_url}/chat/completions", timeout=30, json={
            "model": "own-tutor", "messages": [{"role": "user", "content": OPENING}], "top_k": 1, "calculator": True})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["message"] == {"role": "assistant",
                                                  "content": "Write both as sixths first: what is 1/2 in sixths?"}
        assert body["tool_calls"] == [
            {"name": "search_notes", "arguments": {"query": f"{FOCUS} {OPENING}", "top_k": 1},
             "result": ["adding-fractions"]},
            {"name": "calculator", "arguments": {"expression": "(1/2) + (1/3)"}, "result": "5/6"},
        ]
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > 0
        assert len(fake.requests) == 2 and all(r["model"] == "fake-model" for r in fake.requests)

        # settings as top-level body fields: no notes, no calculator
        off = httpx.post(f"{base_url}/chat/completions", timeout=30, json={
            "model": "own-tutor", "messages": [{"role": "user", "content": OPENING}], "top_k": 0, "calculator": False})
        assert off.json()["tool_calls"] == []
        assert len(fake.requests) == 4

        # protocol: json
        reply = httpx.post(f"{base_url[:-3]}/reply", timeout=30, json={
            "messages": [{"role": "user", "content": OPENING}], "settings": {"top_k": 1}})
        assert reply.json()["reply"]["tool_calls"][1]["result"] == "5/6"

        bad = httpx.post(f"{base_url}/chat/completions", timeout=10, json={"model": "own-tutor", "top_k": 1})
        assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
        wrong = httpx.post(f"{base_url}/chat/completions", timeout=10, json={
            "messages": [{"role": "user", "content": "hi"}], "top_k": -1})
        assert wrong.status_code == 400 and "settings.top_k" in wrong.json()["error"]["message"]
        assert len(fake.requests) == 6

        assert stop(process) == 0
        assert "own tutor stopped" in process.stdout.read()


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP span receiver (what Phoenix listens on at /v1/traces): keeps the decoded spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[dict] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                for resource_spans in request.resource_spans:
                    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            collector.spans.append({
                                "path": self.path, "name": span.name, "resource": resource,
                                "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                                "parent_id": span.parent_span_id.hex(),
                                "attributes": {a.key: a.value.string_value for a in span.attributes},
                            })
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_server_spans_nest_under_the_callers_turn_and_join_its_session(make_fake):
    fake = make_fake(tutor=scripted_tutor)
    collector = Collector()
    trace_id, turn_span_id, session_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "run1/sample1/1"
    try:
        with own_tutor_server(fake.base_url, PHOENIX_COLLECTOR_ENDPOINT=collector.url,
                              PHOENIX_PROJECT_NAME="own-tutor-test") as (process, base_url):
            response = httpx.post(f"{base_url}/chat/completions", timeout=30, headers={
                "traceparent": f"00-{trace_id}-{turn_span_id}-01", "baggage": "session.id=run1%2Fsample1%2F1"},
                json={"model": "own-tutor", "messages": [{"role": "user", "content": OPENING}], "top_k": 1})
            assert response.status_code == 200, response.text
            # exported before the response was sent (simple span processor)
            kinds = sorted(s["attributes"].get("openinference.span.kind") for s in collector.spans)
            assert kinds == ["AGENT", "LLM", "LLM", "TOOL", "TOOL"], collector.spans
            assert stop(process) == 0
    finally:
        collector.shutdown()
        collector.server_close()

    spans = collector.spans
    assert {s["path"] for s in spans} == {"/v1/traces"}
    assert {s["resource"]["openinference.project.name"] for s in spans} == {"own-tutor-test"}
    assert {s["trace_id"] for s in spans} == {trace_id}
    assert {s["attributes"]["session.id"] for s in spans} == {session_id}
    (agent,) = [s for s in spans if s["attributes"]["openinference.span.kind"] == "AGENT"]
    assert agent["parent_id"] == turn_span_id and agent["name"] == "own_tutor.request"
    assert agent["attributes"]["output.value"] == "Write both as sixths first: what is 1/2 in sixths?"
    children = [s for s in spans if s is not agent]
    assert {s["parent_id"] for s in children} == {agent["span_id"]}
    tools = {s["attributes"]["tool.name"]: s for s in children if s["attributes"]["openinference.span.kind"] == "TOOL"}
    assert json.loads(tools["calculator"]["attributes"]["output.value"]) == "5/6"
    assert json.loads(tools["search_notes"]["attributes"]["output.value"]) == ["adding-fractions"]


def test_server_without_a_model_says_how_to_give_one():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMBENCH_MODEL")}
    out = subprocess.run([sys.executable, str(EXAMPLE / "server.py"), "--port", "0"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "SIMBENCH_MODEL_BASE_URL" in out.stderr


def test_server_spans_reach_a_real_phoenix_in_the_callers_session(make_fake, phoenix_server):
    """The same against a real Phoenix server (skipped without SIMBENCH_PHOENIX): the endpoint form
    simbench passes (Phoenix's root URL) is the one Phoenix receives OTLP/HTTP on."""
    import time

    from test_phoenix import _phoenix_spans

    fake = make_fake(tutor=scripted_tutor)
    project, trace_id, turn_span_id = "own-tutor-example", "5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8"
    with own_tutor_server(fake.base_url, PHOENIX_COLLECTOR_ENDPOINT=phoenix_server["url"],
                          PHOENIX_PROJECT_NAME=project) as (process, base_url):
        response = httpx.post(f"{base_url}/chat/completions", timeout=30, headers={
            "traceparent": f"00-{trace_id}-{turn_span_id}-01", "baggage": "session.id=runP%2FsampleP%2F1"},
            json={"model": "own-tutor", "messages": [{"role": "user", "content": OPENING}], "top_k": 1})
        assert response.status_code == 200, response.text
        assert stop(process) == 0
    deadline, spans = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        spans = _phoenix_spans(phoenix_server["url"], project)
        if len(spans) >= 5:
            break
        time.sleep(1)
    assert sorted(spans["span_kind"]) == ["AGENT", "LLM", "LLM", "TOOL", "TOOL"]
    assert set(spans["context.trace_id"]) == {trace_id}
    assert set(spans["attributes.session.id"]) == {"runP/sampleP/1"}
    agent = spans[spans["span_kind"] == "AGENT"].iloc[0]
    assert agent["parent_id"] == turn_span_id
    assert set(spans[spans["span_kind"] != "AGENT"]["parent_id"]) == {agent["context.span_id"]}
