"""The turn loop of one session: the student opens, the tutor answers, the student reacts, until a stop."""

from __future__ import annotations

import time
from dataclasses import dataclass

from openinference.instrumentation import suppress_tracing, using_attributes

from ..matrix import Matrix
from ..models.transport import CallScope, call_scope
from ..records import CallRecord, Message, Sample, SimulatedSession
from ..tracing.setup import record_session_end
from .agents import Agent, split_stop_signal, student_messages, student_system_prompt, tutor_messages


@dataclass
class SessionResult:
    """A finished (completed or errored) session, the closing span's id and the calls it made."""

    session: SimulatedSession
    closing_span_id: str
    calls: list[CallRecord]


async def run_session(matrix: Matrix, tutor: Agent, student: Agent, sample: Sample, session_id: str, attempt: int) -> SessionResult:
    """Simulate one session. Never raises for a model failure: the session is recorded as errored."""
    topic = matrix.topic(sample.topic)
    persona = matrix.persona(sample.persona)
    session = SimulatedSession(sample, session_id, attempt, "running", started_at=time.time())
    tutor_scope = CallScope("tutor", sample.sample_id)
    student_scope = CallScope("student", sample.sample_id)
    tutor_prompt = matrix.render_tutor_prompt(sample.variant, topic)
    student_prompt = student_system_prompt(persona, topic)
    metadata = {
        "variant": sample.variant, "topic": sample.topic, "persona": sample.persona,
        "repeat": sample.repeat, "sample_id": sample.sample_id, "attempt": attempt,
    }

    with using_attributes(session_id=session_id, user_id=sample.persona, metadata=metadata):
        session.messages.append(Message("student", topic.opening))
        try:
            session.stop_reason = await _converse(matrix, tutor, student, tutor_prompt, student_prompt,
                                                  session, tutor_scope, student_scope)
            session.status = "completed"
        except Exception as exc:  # a failed model call ends this session, not the run
            session.status = "errored"
            session.stop_reason = "error"
            session.error = f"{type(exc).__name__}: {exc}"[:1000]
        last = session.messages[-1]
        last_student = last.content if last.role == "student" and session.tutor_turns else None
        closing = record_session_end(last_student, session.stop_reason or "")
    session.ended_at = time.time()
    return SessionResult(session, closing, tutor_scope.calls + student_scope.calls)


async def _converse(matrix, tutor, student, tutor_prompt, student_prompt, session, tutor_scope, student_scope) -> str:
    """Alternate tutor and student turns; return why the session stopped."""
    for _ in range(matrix.max_turns):
        with call_scope(tutor_scope):
            answer = await tutor.reply(tutor_messages(tutor_prompt, session.messages))
        session.messages.append(Message("tutor", answer))
        with suppress_tracing(), call_scope(student_scope):
            raw = await student.reply(student_messages(student_prompt, session.messages))
        text, wants_to_stop = split_stop_signal(raw)
        session.messages.append(Message("student", text))
        if wants_to_stop:
            return "student_stop"
    return "max_turns"
