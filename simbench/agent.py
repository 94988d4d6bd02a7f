"""What simbench hands your own assistant, and what it may hand back (``tutor: {kind: callable}``).

simbench calls your function once per tutor turn::

    def reply(messages: list[dict], context: TurnContext) -> str | TutorReply | dict: ...
    async def reply(messages: list[dict], context: TurnContext) -> str | TutorReply | dict: ...

``messages`` is the conversation so far, OpenAI-style: ``{"role": "user", "content": ...}`` for the
simulated student, ``{"role": "assistant", ...}`` for your earlier replies (no system message: your
app has its own; a variant's ``prompt`` is in ``context.prompt``). A sync function runs in a worker
thread with the tracing context copied in, so its own instrumented calls (OpenAI, ...) nest under
the turn's span either way. Return the reply text, a ``TutorReply``, or a dict with the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["ModelEndpoint", "ToolCall", "TurnContext", "TutorReply"]


@dataclass(frozen=True)
class ModelEndpoint:
    """An OpenAI-compatible model your agent may call: the tutor's or the variant's ``model``."""

    name: str
    """The model's name under the matrix's ``models:`` (``local`` for the embedded model)."""
    base_url: str
    """Where to send requests, e.g. ``openai.OpenAI(base_url=..., api_key=...)``."""
    model: str
    """The model id to ask for in each request."""
    api_key: str = field(repr=False)
    """From the environment variable the matrix names (never stored by simbench)."""


@dataclass(frozen=True)
class TurnContext:
    """Who is asking, for one tutor turn."""

    session_id: str
    """``<run_id>/<sample_id>/<attempt>``: the id every span of this session carries."""
    sample_id: str
    attempt: int
    variant: str
    """The variant's name."""
    settings: dict[str, Any]
    """The variant's free-form ``settings`` (empty when it has none)."""
    prompt: Optional[str]
    """The variant's ``prompt``, rendered for this topic (None when it has none)."""
    topic: dict[str, Any]
    """Every field of the topic: name, opening, reference, goal, subject, misconceptions."""
    persona: str
    """The simulated user's persona name."""
    turn: int
    """This tutor turn, from 1."""
    model: Optional[ModelEndpoint] = None
    """The variant's (or the tutor's) model, when the matrix names one."""
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None


@dataclass
class ToolCall:
    """A tool your agent called during the turn: shown under the reply, traced as a TOOL span,
    and offered to judges as ``{tool_calls}``."""

    name: str
    arguments: Any = None
    """The arguments as the tool got them (a dict, or a JSON string)."""
    result: Any = None
    """What the tool returned."""


@dataclass
class TutorReply:
    """A reply with what went into it."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    """Anything you want kept on the turn's span (``simbench.reply.metadata``)."""
    usage: Optional[dict[str, int]] = None
    """``{"prompt_tokens": N, "completion_tokens": M}`` if you want the turn's tokens counted."""
