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

from ..models.endpoints import Endpoint
from ..personas.prompt import STOP_MARKER, student_system_prompt  # noqa: F401  (the simulator's public names)
from ..records import Message

_STOP = re.compile(r"\[\s*end\s*\]", re.IGNORECASE)


@dataclass
class Agent:
    """One side of the conversation: a client, the endpoint it talks to, and its sampling settings."""

    client: openai.AsyncOpenAI
    endpoint: Endpoint
    max_tokens: int
    temperature: float

    async def reply(self, messages: list[dict]) -> str:
        """One chat completion (retries happen below, in the transport, inside this one traced call)."""
        body = {"model": self.endpoint.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature}
        # The client's own post(), not chat.completions.create(): create() walks every message of the
        # history through openai's TypedDict transform, about 40% of the harness CPU at scale, and our
        # body is plain JSON already. The instrumentor reads the request from the same options, so the
        # span is the same.
        response = await self.client.post("/chat/completions", cast_to=ChatCompletion, body=body)
        if not response.choices:
            raise ValueError("the model answered with no choices")
        return (response.choices[0].message.content or "").strip()


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
