"""Run many sessions concurrently, committing each one as it finishes (after its spans are flushed)."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional

from tqdm import tqdm

from ..matrix import Matrix
from ..models.limits import RunCounters
from ..models.transport import call_sink
from ..records import CallRecord, Sample, SimulatedSession, session_id_for
from ..store import RunStore
from ..tracing.setup import flush_spans
from .agents import Agent
from .tutors import Tutor
from .session import run_session


async def simulate(
    matrix: Matrix,
    run_id: str,
    samples: list[Sample],
    tutor: Tutor,
    student: Agent,
    store: RunStore,
    progress: Optional[tqdm] = None,
    counters: Optional[RunCounters] = None,
    on_completed: Optional[Callable[[SimulatedSession], None]] = None,
) -> None:
    """Simulate ``samples`` with at most ``matrix.concurrency`` sessions in flight;
    ``on_completed`` gets each completed session once it is committed (its spans in the file)."""
    gate = asyncio.Semaphore(matrix.concurrency)
    errored = 0

    async def one(sample: Sample) -> None:
        nonlocal errored
        async with gate:
            attempt = store.next_attempt(sample.sample_id)
            session_id = session_id_for(run_id, sample.sample_id, attempt)
            store.start_session(SimulatedSession(sample, session_id, attempt, "running", started_at=time.time()))
            calls: list[CallRecord] = []
            try:
                with call_sink(calls):
                    result = await run_session(matrix, tutor, student, sample, session_id, attempt)
            except BaseException:  # cancelled (Ctrl-C): the attempt stays 'running', its calls are still counted
                store.add_calls(session_id, calls)
                raise
            flush_spans()
            store.finish_session(result.session, result.closing_span_id, result.calls)
            if result.session.status == "errored":
                errored += 1
            elif on_completed is not None:
                on_completed(result.session)
            if progress is not None:
                progress.set_postfix_str(_live_counts(errored, counters), refresh=False)
                progress.update(1)

    await asyncio.gather(*(one(sample) for sample in samples))


def _live_counts(errored: int, counters: Optional[RunCounters]) -> str:
    text = f"errored={errored}"
    if counters is not None:
        text += f" retries={counters.retries} 429s={counters.rate_limited}"
    return text


def pending_samples(store: RunStore, samples: list[Sample], retry_errors: bool = False) -> list[Sample]:
    """Samples whose latest attempt did not finish (never started, or killed while running), and
    with ``retry_errors`` those whose latest attempt errored."""
    done = ("completed",) if retry_errors else ("completed", "errored")
    finished = {s["sample_id"] for s in store.latest_sessions() if s["status"] in done}
    return [s for s in samples if s.sample_id not in finished]
