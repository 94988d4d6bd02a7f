"""The two sides of a session: the tutor under test and the simulated student.

Each builds its own view of the conversation (roles flipped for the student) and makes one chat
call. The tutor call is traced by the OpenAI instrumentor; the student's is made under
``suppress_tracing()`` by the turn loop, so it never reaches the trace store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import openai
from openai.types.chat import ChatCompletion

from ..models.endpoints import Endpoint, sampling_params
from ..personas.prompt import STOP_MARKER, student_system_prompt  # noqa: F401  (the simulator's public names)
from ..records import Message

_STOP = re.compile(r"\[\s*end\s*\]", re.IGNORECASE)


class AnswerError(Exception):
    """A model's answer that holds no reply to use; the message says why and what to change."""


@dataclass
class Agent:
    """One side of the conversation: a client, the endpoint it talks to, and its sampling settings."""

    client: openai.AsyncOpenAI
    endpoint: Endpoint
    max_tokens: int
    temperature: float

    async def reply(self, messages: list[dict]) -> str:
        """One chat completion (retries happen below, in the transport, inside this one traced call)."""
        body = {"model": self.endpoint.model, "messages": messages,
                **sampling_params(self.endpoint, self.max_tokens, self.temperature)}
        # The client's own post(), not chat.completions.create(): create() walks every message of the
        # history through openai's TypedDict transform, about 40% of the harness CPU at scale, and our
        # body is plain JSON already. The instrumentor reads the request from the same options, so the
        # span is the same.
        response = await self.client.post("/chat/completions", cast_to=ChatCompletion, body=body)
        if not response.choices:
            raise AnswerError("the model answered with no choices")
        choice = response.choices[0]
        text = (choice.message.content or "").strip()
        if not text and choice.finish_reason == "length":
            raise AnswerError(_cut_off(self.endpoint, body, response))
        return text


def _cut_off(endpoint: Endpoint, body: dict, response: ChatCompletion) -> str:
    """Why an answer came back empty: its limit ran out first (a reasoning model's thinking, often)."""
    limit_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    details = response.usage.completion_tokens_details if response.usage else None
    reasoning = getattr(details, "reasoning_tokens", None) or 0
    spent = f", {reasoning} of them reasoning" if reasoning else ""
    if endpoint.reasoning_budget is not None:
        fix = f"raise models.{endpoint.name}.reasoning_budget or the role's max_tokens"
    else:
        fix = f"raise the role's max_tokens (or set models.{endpoint.name}.reasoning: true for a reasoning model)"
    return f"the answer was cut off before any text ({limit_field} {body[limit_field]} reached{spent}): {fix}"


def tutor_messages(system_prompt: str, history: list[Message]) -> list[dict]:
    """The tutor sees the student as ``user`` and itself as ``assistant``."""
    return [{"role": "system", "content": system_prompt}] + [
        {"role": "user" if m.role == "student" else "assistant", "content": m.content} for m in history
    ]


def student_messages(system_prompt: str, history: list[Message]) -> list[dict]:
    """The student sees the tutor as ``user`` and itself as ``assistant`` (roles flipped)."""
    return [{"role": "system", "content": system_prompt}] + [
        {"role": "assistant" if m.role == "student" else "user", "content": m.content} for m in history
    ]


def split_stop_signal(text: str) -> tuple[str, bool]:
    """(the message without the stop marker, whether the student asked to stop)."""
    if _STOP.search(text):
        return _STOP.sub("", text).strip(), True
    return text, False
