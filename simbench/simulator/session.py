"""The turn loop of one session: the student opens, the tutor answers, the student reacts, until a stop."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Awaitable, TypeVar

from openinference.instrumentation import suppress_tracing, using_attributes

from ..agent import TurnContext
from ..matrix import Matrix
from ..models.transport import CallScope, call_scope
from ..records import CallRecord, Message, Sample, SimulatedSession
from ..tracing.setup import record_session_end, tutor_turn_span
from .agents import Agent, AnswerError, split_stop_signal, student_messages, student_system_prompt
from .tutors import Tutor, TutorError


@dataclass
class SessionResult:
    """A finished (completed or errored) session, the closing span's id and the calls it made."""

    session: SimulatedSession
    closing_span_id: str
    calls: list[CallRecord]


async def run_session(matrix: Matrix, tutor: Tutor, student: Agent, sample: Sample, session_id: str, attempt: int) -> SessionResult:
    """Simulate one session. Never raises for a model failure: the session is recorded as errored."""
    topic = matrix.topic(sample.topic)
    persona = matrix.persona(sample.persona)
    session = SimulatedSession(sample, session_id, attempt, "running", started_at=time.time())
    tutor_scope = CallScope("tutor", sample.sample_id)
    student_scope = CallScope("student", sample.sample_id)
    variant = matrix.tutor.variant(sample.variant)
    context = TurnContext(
        session_id=session_id, sample_id=sample.sample_id, attempt=attempt, variant=sample.variant,
        settings=dict(variant.settings), prompt=matrix.render_tutor_prompt(sample.variant, topic),
        topic=topic.model_dump(), persona=sample.persona, turn=0, model=tutor.model_for(sample.variant),
        temperature=matrix.tutor.temperature_of(sample.variant), max_tokens=matrix.tutor.max_tokens_of(sample.variant))
    student_prompt = student_system_prompt(persona, topic)
    metadata = {
        "variant": sample.variant, "topic": sample.topic, "persona": sample.persona,
        "repeat": sample.repeat, "sample_id": sample.sample_id, "attempt": attempt,
    }

    with using_attributes(session_id=session_id, user_id=sample.persona, metadata=metadata):
        session.messages.append(Message("student", topic.opening))
        try:
            session.stop_reason = await _converse(matrix, tutor, student, context, student_prompt,
                                                  session, tutor_scope, student_scope)
            session.status = "completed"
        except Exception as exc:  # a failed model call ends this session, not the run
            session.status = "errored"
            session.stop_reason = "error"
            session.error = (str(exc) if isinstance(exc, CallFailed) else f"{type(exc).__name__}: {exc}")[:1000]
        last = session.messages[-1]
        last_student = last.content if last.role == "student" and session.tutor_turns else None
        closing = record_session_end(last_student, session.stop_reason or "")
    session.ended_at = time.time()
    return SessionResult(session, closing, tutor_scope.calls + student_scope.calls)


class CallFailed(Exception):
    """A tutor or student call that failed; the message says which (``tutor call failed: ...``)."""


T = TypeVar("T")


async def _call(role: str, reply: Awaitable[T]) -> T:
    """Await one side's call, naming the side if it fails."""
    try:
        return await reply
    except (TutorError, AnswerError) as exc:  # already says what failed (after its retries)
        raise CallFailed(f"{role} call failed: {exc}") from exc
    except Exception as exc:
        raise CallFailed(f"{role} call failed: {type(exc).__name__}: {exc}") from exc


async def _converse(matrix, tutor, student, context, student_prompt, session, tutor_scope, student_scope) -> str:
    """Alternate tutor and student turns; return why the session stopped."""
    for turn in range(1, matrix.max_turns + 1):
        turn_context = dataclasses.replace(context, turn=turn)
        with call_scope(tutor_scope), tutor_turn_span(session.messages[-1].content) as span:
            answer = await _call("tutor", tutor.reply(session.messages, turn_context))
            span.answered(answer.text, answer.tool_calls, answer.metadata, answer.chat_messages)
        session.messages.append(Message("tutor", answer.text))
        with suppress_tracing(), call_scope(student_scope):
            raw = await _call("student", student.reply(student_messages(student_prompt, session.messages)))
        text, wants_to_stop = split_stop_signal(raw)
        session.messages.append(Message("student", text))
        if wants_to_stop:
            return "student_stop"
    return "max_turns"
