"""Typed records passed between pipeline stages, and the ids they rest on.

Ids (see docs/architecture.md):
- a *sample* is one planned session: (variant, topic, persona, repeat);
- a *cell* is (variant, topic, persona): the repeats of one configuration;
- a *pair key* is (topic, persona, repeat): what two variants share;
- a *session id* is ``<run_id>/<sample_id>/<attempt>``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Optional

SessionStatus = Literal["running", "completed", "errored"]
JudgementStatus = Literal["ok", "error", "skipped"]
Role = Literal["tutor", "student", "judge"]
NO_TOOL_CALLS = "(no tool calls)"


def sample_id_for(variant: str, topic: str, persona: str, repeat: int) -> str:
    """A sample id derived from names only, so it is stable across re-runs and matrix reorders."""
    digest = hashlib.sha256(f"{variant}\0{topic}\0{persona}\0{repeat}".encode()).hexdigest()
    return digest[:16]


def session_id_for(run_id: str, sample_id: str, attempt: int) -> str:
    """``<run_id>/<sample_id>/<attempt>``: a retry gets a new attempt, so its spans never mix."""
    return f"{run_id}/{sample_id}/{attempt}"


def run_id_of(session_id: str) -> str:
    """The run id carried in a session id (used to filter one run in a shared store)."""
    return session_id.split("/", 1)[0]


@dataclass(frozen=True)
class Sample:
    """One planned session of the matrix."""

    variant: str
    topic: str
    persona: str
    repeat: int

    @property
    def sample_id(self) -> str:
        return sample_id_for(self.variant, self.topic, self.persona, self.repeat)

    @property
    def cell(self) -> tuple[str, str, str]:
        """(variant, topic, persona): the repeats of one configuration."""
        return (self.variant, self.topic, self.persona)

    @property
    def pair_key(self) -> tuple[str, str, int]:
        """(topic, persona, repeat): what two variants' samples share."""
        return (self.topic, self.persona, self.repeat)


@dataclass(frozen=True)
class ToolUse:
    """One tool call the tutor made during a turn, as the trace store holds it (a TOOL span)."""

    name: str
    arguments: str = ""
    """The arguments as the span holds them (``tool.parameters``: usually JSON)."""
    result: str = ""
    """What the tool returned (the span's ``output.value``)."""

    def render(self) -> str:
        """``name(arguments) -> result``, the way judges read it."""
        return f"{self.name}({self.arguments}) -> {self.result}"


@dataclass(frozen=True)
class Message:
    """One message of a conversation, from the point of view of the assistant under test."""

    role: Literal["student", "tutor"]
    content: str
    tool_calls: tuple[ToolUse, ...] = ()
    """A tutor message's tool calls within its turn, in the order they started."""


@dataclass
class SimulatedSession:
    """What the simulator did for one sample (its own memory; judges do not read this)."""

    sample: Sample
    session_id: str
    attempt: int
    status: SessionStatus
    messages: list[Message] = field(default_factory=list)
    stop_reason: Optional[str] = None
    error: Optional[str] = None
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def tutor_turns(self) -> int:
        return sum(1 for m in self.messages if m.role == "tutor")


@dataclass
class Transcript:
    """A session rebuilt from the trace store: what the judges read."""

    session_id: str
    span_id: str
    messages: list[Message]
    metadata: dict = field(default_factory=dict)
    turn_span_ids: list[str] = field(default_factory=list)
    """The span id of each tutor message, in order (per-turn judgements are stored on these spans)."""

    def render(self) -> str:
        """The conversation as plain text, one message per block, for judge prompts."""
        names = {"student": "Student", "tutor": "Tutor"}
        return "\n\n".join(f"{names[m.role]}: {m.content}" for m in self.messages)

    def render_tool_calls(self, turn: Optional[int] = None) -> str:
        """The tutor's tool calls, one line each: ``Turn N: name(arguments) -> result`` (only turn
        ``turn`` when given), or ``(no tool calls)`` when there are none: the judges' ``{tool_calls}``."""
        tutor = [m for m in self.messages if m.role == "tutor"]
        lines = [f"Turn {n}: {call.render()}" for n, m in enumerate(tutor, start=1)
                 if turn is None or n == turn for call in m.tool_calls]
        return "\n".join(lines) if lines else NO_TOOL_CALLS


@dataclass
class ImportedSession:
    """A conversation judged without simulating it: a line of a transcripts file (docs/transcripts.md)
    or a session rebuilt from a trace store's spans (``simbench judge RUN_DIR`` / ``--store``).

    ``messages`` alternate student and tutor. ``session_id`` is set for sessions from spans, which
    keep their source's id so judgements logged back land on them; a transcripts line gets a new one.
    ``repeat`` is the one a simbench run recorded; None numbers the sessions of a cell 1, 2, ...
    ``line``: the transcripts file's line; ``labels``: human labels per dimension; ``span_id``:
    the root span of a session from spans.
    """

    source_id: str
    messages: list[Message]
    topic: str
    persona: str
    variant: str
    repeat: Optional[int] = None
    reference: Optional[str] = None
    goal: Optional[str] = None
    labels: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    line: Optional[int] = None
    system_messages: int = 0
    session_id: Optional[str] = None
    span_id: Optional[str] = None
    started_at: Optional[float] = None
    ended_at: Optional[float] = None

    @property
    def opening(self) -> str:
        return next((m.content for m in self.messages if m.role == "student"), "")


@dataclass
class Judgement:
    """One judge's verdict on one session."""

    session_id: str
    judge: str
    judge_model: str
    judge_sample: int
    status: JudgementStatus
    label: Optional[str] = None
    score: Optional[float] = None
    passed: Optional[bool] = None
    explanation: Optional[str] = None
    error: Optional[str] = None
    turn: Optional[int] = None
    """For a per-turn judge's verdict on one tutor turn: the turn (1-based); None for a session verdict."""
    span_id: Optional[str] = None
    """For a per-turn verdict: the tutor span of that turn."""


@dataclass
class CallRecord:
    """One HTTP attempt of a model call, for accounting."""

    role: str
    model: str
    status: int  # HTTP status; 0 when the request never got an answer
    cached: bool
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    attempt: int = 0  # 0 for the first try of a call, then 1, 2, ... for its retries
