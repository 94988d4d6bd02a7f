"""The judge client (simbench/evaluators/judge_client.py) sends exactly what openai's create() sends.

Each case makes the same phoenix.evals call twice — through phoenix's own OpenAI client (create(),
with openai's transform) and through ``judge_llm`` (our client, which posts the body as given) — and
compares the requests: path, headers and body bytes as they leave the HTTP client, and the body the
fake server parsed. The cases cover what a judge sends: a SessionJudge's classification (structured
output, ``max_tokens``, ``temperature``), the tools fallback, ``extra_body`` (the embedded model's
bounded schema) and plain text generation.
"""

from __future__ import annotations

import asyncio
import json

import httpx2
import pytest
from phoenix.evals import LLM
from phoenix.evals.llm.types import ObjectGenerationMethod

from fake_openai import FakeOpenAI
from simbench.evaluators.builtin import BUILTIN
from simbench.evaluators.judges import JudgeInput, SessionJudge, _bounded_explanation, judge_llm, session_row
from simbench.models.endpoints import Endpoint
from simbench.records import Message, Transcript

API_KEY = "sk-judge-client-test"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["yes", "no"]},
                                           "explanation": {"type": "string"}},
          "required": ["label", "explanation"]}


def _recording_client(sent: list) -> httpx2.AsyncClient:
    async def record(request: httpx2.Request) -> None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        sent.append((request.method, str(request.url), headers, request.content))
    return httpx2.AsyncClient(event_hooks={"request": [record]}, timeout=30)


def _phoenix_default_llm(endpoint: Endpoint, http: httpx2.AsyncClient) -> LLM:
    """The LLM as simbench built it before the judge client: phoenix's OpenAI client, create()."""
    return LLM(provider="openai", model=endpoint.model, base_url=endpoint.base_url, api_key=endpoint.api_key,
               initial_per_second_request_rate=100.0, async_client_kwargs={"http_client": http, "timeout": endpoint.timeout})


async def _both(server: FakeOpenAI, call) -> list[tuple]:
    """Run ``call(llm)`` with phoenix's client, then with ours; return what each sent and what each returned."""
    endpoint = Endpoint("fake", server.base_url, "fake", API_KEY, 30.0)
    out = []
    for build in (_phoenix_default_llm, judge_llm):
        sent: list = []
        http = _recording_client(sent)
        llm = build(endpoint, http) if build is _phoenix_default_llm else build(http, endpoint, 100.0)
        start = len(server.requests)
        try:
            result = await call(llm)
        finally:
            await http.aclose()
        out.append((sent, server.requests[start:], result))
    return out


def _assert_same_requests(before: tuple, after: tuple) -> None:
    sent_before, parsed_before, result_before = before
    sent_after, parsed_after, result_after = after
    assert sent_before and len(sent_before) == len(sent_after)
    for (m1, url1, h1, body1), (m2, url2, h2, body2) in zip(sent_before, sent_after):
        assert (m1, url1) == (m2, url2)
        assert h1 == h2
        assert body1 == body2, f"\nbefore: {body1!r}\nafter:  {body2!r}"
    # the server read the same JSON, keys in the same order
    assert [json.dumps(r) for r in parsed_before] == [json.dumps(r) for r in parsed_after]
    assert result_before == result_after


def test_a_session_judge_sends_the_same_request_through_either_client():
    definition = BUILTIN["coherence"]
    transcript = Transcript("s1", "v", [Message("tutor", "What is 1/2 + 1/4?"), Message("student", "3/4")])
    row = session_row(JudgeInput(transcript, sample_key="k", topic="adding fractions", goal="add fractions",
                                 reference="3/4", subject="maths", persona="terse: says little",
                                 misconceptions="adds denominators"), 0)

    async def classify(llm: LLM):
        judge = SessionJudge(definition, llm, "fake", lambda j, calls: None, max_tokens=321, temperature=0.0)
        scores = await judge.async_evaluate(row)
        return [(s.label, s.score, s.explanation) for s in scores]

    with FakeOpenAI() as server:
        before, after = asyncio.run(_both(server, classify))
    _assert_same_requests(before, after)
    body = before[1][0]
    assert body["max_tokens"] == 321 and body["temperature"] == 0.0
    assert body["response_format"]["type"] == "json_schema"
    assert before[2] and before[2][0][0] in definition.choices


@pytest.mark.parametrize("method", [ObjectGenerationMethod.STRUCTURED_OUTPUT, ObjectGenerationMethod.TOOL_CALLING])
def test_structured_output_and_the_tools_fallback_send_the_same_request(method):
    async def generate(llm: LLM):
        return await llm.async_generate_object("Is 3/4 right?", SCHEMA, method=method, max_tokens=50, temperature=0.2)

    with FakeOpenAI() as server:
        before, after = asyncio.run(_both(server, generate))
    _assert_same_requests(before, after)
    body = before[1][0]
    assert before[2]["explanation"].startswith("fake judge chose")
    if method == ObjectGenerationMethod.TOOL_CALLING:
        assert body["tools"][0]["function"]["name"] == "extract_structured_data" and "response_format" not in body
        assert before[2]["label"] in ("yes", "no")  # parsed from the tool call
    else:
        assert body["response_format"]["json_schema"]["strict"] is True and "tools" not in body


def test_extra_body_replaces_the_response_format_the_same_way():
    """The embedded model's bounded schema travels in extra_body and overrides phoenix's response_format."""
    definition = next(iter(BUILTIN.values()))
    extra = _bounded_explanation(definition, 200)

    async def generate(llm: LLM):
        schema = extra["extra_body"]["response_format"]["json_schema"]["schema"]
        return await llm.async_generate_object("Judge this.", schema, method=ObjectGenerationMethod.STRUCTURED_OUTPUT,
                                               max_tokens=200, **extra)

    with FakeOpenAI() as server:
        before, after = asyncio.run(_both(server, generate))
    _assert_same_requests(before, after)
    sent_format = before[1][0]["response_format"]["json_schema"]["schema"]
    assert sent_format["properties"]["explanation"]["maxLength"] == 200 - 48


def test_text_generation_sends_the_same_request():
    async def generate(llm: LLM):
        return await llm.async_generate_text("Say hi.", max_tokens=7)

    with FakeOpenAI() as server:
        before, after = asyncio.run(_both(server, generate))
    _assert_same_requests(before, after)
    assert before[1][0]["max_tokens"] == 7 and "response_format" not in before[1][0]


def test_phoenix_default_openai_client_is_unchanged():
    """Registering the judge client adds a client name; LLM(provider="openai") still gets phoenix's own."""
    import simbench.evaluators.judge_client  # noqa: F401  (registers it)
    from openai import AsyncOpenAI

    llm = LLM(provider="openai", model="m", api_key=API_KEY, base_url="http://127.0.0.1:9/v1")
    assert isinstance(llm._async_client.client, AsyncOpenAI)


def test_judge_llm_uses_the_judge_client():
    """Otherwise the comparisons above would compare phoenix's client with itself."""
    from simbench.evaluators.judge_client import PostedChatCompletions

    http = httpx2.AsyncClient()
    llm = judge_llm(http, Endpoint("fake", "http://127.0.0.1:9/v1", "fake", API_KEY, 30.0), 10)
    assert isinstance(llm._async_client.chat.completions, PostedChatCompletions)
    asyncio.run(http.aclose())
