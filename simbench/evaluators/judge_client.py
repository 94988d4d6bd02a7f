"""The client phoenix.evals' OpenAI adapter judges through: ``chat.completions.create`` posts the body as given.

openai's ``create()`` runs every request through its TypedDict transform before posting it — about a
sixth of a judge call's harness CPU — although phoenix.evals hands it plain JSON already (messages,
``response_format`` or ``tools``, ``max_tokens``, ``temperature``, our ``extra_body``). This client
posts that body with the same request options ``create()`` builds (auth, ``extra_body``, headers,
timeout), as the tutor and student calls do (``simbench.simulator.agents``), so the request on the
wire is the same (tests/test_judge_client.py compares them).

phoenix.evals picks it by client name: ``LLM(provider="openai", client=JUDGE_CLIENT, ...)``. The
registration is phoenix's own extension point (``register_provider``); it adds a second OpenAI
client, after phoenix's, so ``LLM(provider="openai")`` without a client name is unchanged.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import openai
from openai._base_client import make_request_options
from openai.types.chat import ChatCompletion
from phoenix.evals.llm.adapters.openai.adapter import OpenAIAdapter, get_openai_rate_limit_errors
from phoenix.evals.llm.adapters.openai.factories import OpenAIClientWrapper, create_openai_client
from phoenix.evals.llm.registries import register_provider

JUDGE_CLIENT = "simbench-posted-openai"

# create() writes the body's top-level keys in this order, then the rest alphabetically (openai 3.x);
# the same order keeps the body byte for byte the same. (The response cache reads it key-sorted.)
CREATE_KEY_ORDER = ("model", "stream", "service_tier", "messages")


class PostedChatCompletions:
    """``chat.completions.create`` for non-streaming requests whose parameters are plain JSON."""

    def __init__(self, client: openai.AsyncOpenAI):
        self.client = client

    async def create(self, *, extra_headers: Any = None, extra_query: Any = None, extra_body: Any = None,
                     timeout: Any = openai.NOT_GIVEN, **params: Any) -> ChatCompletion:
        if params.get("stream"):
            raise ValueError("the judge client does not stream")
        # create() leaves out parameters that were not given; so does this
        given = {k: v for k, v in params.items() if not isinstance(v, (openai.NotGiven, openai.Omit))}
        first = [k for k in CREATE_KEY_ORDER if k in given]
        body = {k: given[k] for k in [*first, *sorted(given.keys() - set(first))]}
        options = make_request_options(extra_headers=extra_headers, extra_query=extra_query, extra_body=extra_body,
                                       timeout=timeout, security={"bearer_auth": True})
        return await self.client.post("/chat/completions", cast_to=ChatCompletion, body=body, options=options)


def _judge_client_factory(model: str, is_async: bool, **kwargs: Any) -> Any:
    """phoenix.evals builds a sync and an async client; it judges with the async one, ours."""
    if not is_async:
        return create_openai_client(model=model, is_async=False, **kwargs)
    client = openai.AsyncOpenAI(max_retries=0, **kwargs)
    return OpenAIClientWrapper(SimpleNamespace(chat=SimpleNamespace(completions=PostedChatCompletions(client))), model)


@register_provider(provider="openai", client_factory=_judge_client_factory,
                   get_rate_limit_errors=get_openai_rate_limit_errors, dependencies=["openai"])
class PostedOpenAIAdapter(OpenAIAdapter):
    """phoenix.evals' OpenAI adapter as it is; only its registration (client name, factory) differs."""

    @classmethod
    def client_name(cls) -> str:
        return JUDGE_CLIENT
