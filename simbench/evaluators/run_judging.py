"""Judging a run's completed sessions: what each still owes, and the judge calls that pay it.

``RunJudging`` plans the judgements that sessions (rebuilt from the trace store) still owe and
makes them, one client per judges' endpoint for the run. ``judge_run`` (pipeline.py) makes them all
at once; ``judge_as_completed`` makes them while the run is simulated, each session's as soon as it
is committed, so the judges' model works in the time the simulation leaves it and judging ends soon
after the last session instead of starting then.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Optional, Sequence

import httpx2
from phoenix.evals import LLM
from tqdm import tqdm

from ..matrix import Matrix
from ..models.endpoints import Endpoint, http_client
from ..records import CallRecord, Judgement, SimulatedSession, Transcript
from ..reports.summary import JUDGE_SAMPLES_SETTING, JUDGE_TEMPERATURE_SETTING
from ..store import RunStore
from ..tracing.local import spans_dataframe
from .judges import JudgeInput, judge_llm, judge_sessions, persona_text
from .sessions import rebuild_sessions
from .turns import aggregate_turns

# (judges' model, per-turn or not, judge names, judgement sample indices) -> the sessions to judge so
Groups = dict[tuple[str, bool, tuple[str, ...], tuple[int, ...]], list[JudgeInput]]


def judge_input_for(matrix: Matrix, transcript: Transcript, session: dict) -> JudgeInput:
    """What the judges may read about a session besides its transcript: the topic's and persona's
    fields for a simulated session; for an imported one (docs/transcripts.md), its own reference and
    goal from its spans' metadata, keyed in the cache by its own id."""
    topic = matrix.topic(session["topic"])
    meta = transcript.metadata
    if meta.get("imported"):
        opening = next((m.content for m in transcript.messages if m.role == "student"), None)
        return JudgeInput(transcript, f"import:{meta.get('source_id')}", topic.name, opening,
                          meta.get("reference"), meta.get("goal"))
    persona = matrix.persona(session["persona"])
    return JudgeInput(transcript, session["sample_id"], topic.name, topic.opening, topic.reference, topic.goal,
                      subject=topic.subject, misconceptions="\n".join(topic.misconceptions) or None,
                      persona=persona_text(persona))


class RunJudging:
    """The judgements a run still owes and the calls that make them.

    Built-in and custom judges take the same path; judges are grouped by the model they run on.
    Each judge reads each session ``judge_samples`` times (a run setting). A resumed run asks only
    for the missing (session, judge, sample) judgements, even without the cache; ``retry_errors``:
    ``error`` verdicts are asked again. Every judgement is committed as it arrives.
    """

    def __init__(self, matrix: Matrix, store: RunStore, endpoints, cache, limiters, counters, *,
                 retry_errors: bool = False):
        self.matrix, self.store, self.endpoints, self.cache = matrix, store, endpoints, cache
        self.limiters, self.counters = limiters, counters
        self.samples = store.setting(JUDGE_SAMPLES_SETTING, 1)
        self.temperature = store.setting(JUDGE_TEMPERATURE_SETTING, matrix.judges.temperature)
        self.done = {(j.session_id, j.judge, j.judge_sample) for j in store.judgements()
                     if not (retry_errors and j.status == "error")}
        self.by_status = {"error": 0, "skipped": 0}
        self._clients: dict[str, tuple[httpx2.AsyncClient, LLM]] = {}

    def plan(self, transcripts: list[Transcript], sessions: dict[str, dict]) -> Groups:
        """The judgements owed by the ``transcripts`` of ``sessions`` (session id -> its row), grouped
        into calls of ``judge_sessions`` (per-turn judges read other rows than session judges)."""
        matrix = self.matrix
        definitions = matrix.judges.definitions()
        groups: Groups = {}
        for t in transcripts:
            owed = {d.name: tuple(i for i in range(self.samples) if (t.session_id, d.name, i) not in self.done)
                    for d in definitions}
            item = None
            for model in matrix.judge_model_names():
                for per_turn in (False, True):
                    by_indices: dict[tuple[int, ...], list[str]] = {}
                    for d in definitions:
                        if owed[d.name] and matrix.judges.model_of(d.name) == model and d.per_turn == per_turn:
                            by_indices.setdefault(owed[d.name], []).append(d.name)
                    for indices, names in by_indices.items():
                        item = item or judge_input_for(matrix, t, sessions[t.session_id])
                        groups.setdefault((model, per_turn, tuple(names), indices), []).append(item)
        return groups

    @staticmethod
    def count(groups: Groups) -> int:
        """Judgements in ``groups``: one per session, judge and sample (per-turn judges: per tutor turn)."""
        return sum(len(key[2]) * RunJudging.rows(key, inputs) for key, inputs in groups.items())

    @staticmethod
    def rows(key: tuple[str, bool, tuple[str, ...], tuple[int, ...]], inputs: list[JudgeInput]) -> int:
        """The rows ``judge_sessions`` makes of a group (each read by all its judges in turn): one per
        session and sample; for per-turn judges one per tutor turn and sample."""
        _, per_turn, _, indices = key
        turns = sum(max(1, sum(m.role == "tutor" for m in i.transcript.messages)) for i in inputs)
        return len(indices) * (turns if per_turn else len(inputs))

    @staticmethod
    def one_by_one(groups: Groups) -> list[Groups]:
        """``groups`` cut into single judgements (one session, judge and sample; a per-turn judge's
        turns of it stay together, for its session verdict), each made by one worker."""
        return [{(model, per_turn, (name,), (index,)): [item]}
                for (model, per_turn, names, indices), inputs in groups.items()
                for item in inputs for name in names for index in indices]

    async def judge(self, groups: Groups, bar: tqdm, workers: Optional[int] = None) -> None:
        """Make the judgements of ``groups`` with at most ``workers`` (default: the run's concurrency)
        calls at once, committing each one (and its calls) as it arrives."""
        turn_verdicts: dict[tuple[str, str, str, int], list[Judgement]] = {}

        def save(judgement: Judgement, calls: list[CallRecord]) -> None:
            self.store.add_judgements([judgement], {judgement.session_id: calls})
            if judgement.turn is not None:
                key = (judgement.session_id, judgement.judge, judgement.judge_model, judgement.judge_sample)
                turn_verdicts.setdefault(key, []).append(judgement)
            if judgement.status in self.by_status:
                self.by_status[judgement.status] += 1
            bar.set_postfix_str(f"error={self.by_status['error']} skipped={self.by_status['skipped']} "
                                f"retries={self.counters.retries} 429s={self.counters.rate_limited}", refresh=False)

        judges = self.matrix.judges
        for (model, per_turn, names, indices), inputs in groups.items():
            endpoint = self.endpoints[f"judge:{model}"]
            await judge_sessions(inputs, [judges.definition(n) for n in names], endpoint, self.cache,
                                 self.limiters[endpoint.name], save,
                                 concurrency=workers or self.matrix.concurrency, max_tokens=judges.max_tokens,
                                 temperature=self.temperature, judge_samples=self.samples, progress=bar,
                                 sample_indices=indices, on_unjudged_calls=self.store.add_calls,
                                 llm=self._llm(endpoint))
            if per_turn:
                _save_turn_aggregates(self.store, inputs, names, endpoint.name, turn_verdicts, indices)

    def _llm(self, endpoint: Endpoint) -> LLM:
        """One client and phoenix LLM per judges' endpoint for the whole run (closed on leaving ``async with``)."""
        if endpoint.name not in self._clients:
            client = http_client(endpoint, self.cache, self.limiters[endpoint.name])
            self._clients[endpoint.name] = (client, judge_llm(client, endpoint, self.matrix.concurrency))
        return self._clients[endpoint.name][1]

    async def __aenter__(self) -> "RunJudging":
        return self

    async def __aexit__(self, *exc) -> None:
        for client, _ in self._clients.values():
            await client.aclose()
        self._clients.clear()


def _save_turn_aggregates(store: RunStore, inputs: list[JudgeInput], names: tuple[str, ...], model: str,
                          turn_verdicts: dict[tuple[str, str, str, int], list[Judgement]],
                          indices: Sequence[int] = (0,)) -> None:
    """One session verdict per per-turn judge and judgement sample (``indices``), from the turn
    verdicts just stored (see evaluators/turns.py)."""
    aggregates = [
        aggregate_turns(item.transcript.session_id, name, model, sample,
                        turn_verdicts.get((item.transcript.session_id, name, model, sample), []))
        for item in inputs for name in names for sample in indices
    ]
    store.add_judgements(aggregates, {})


class CompletedSessions:
    """The sessions a simulation has committed and judging has not taken yet; ``close`` once the
    simulation has ended (or stopped), so judging ends with the last of them."""

    def __init__(self, sessions: Sequence[dict] = ()):
        self._waiting: list[dict] = list(sessions)
        self._more = asyncio.Event()
        self._closed = False

    def add(self, session: SimulatedSession) -> None:
        sample = session.sample
        self._waiting.append({"session_id": session.session_id, "sample_id": sample.sample_id,
                              "topic": sample.topic, "persona": sample.persona})
        self._more.set()

    def close(self) -> None:
        self._closed = True
        self._more.set()

    async def take(self) -> list[dict]:
        """Every session committed since the last call, waiting for one; [] once closed and empty."""
        while not self._waiting and not self._closed:
            self._more.clear()
            await self._more.wait()
        taken, self._waiting = self._waiting, []
        return taken


class JudgingInterrupted(Exception):
    """Judging stopped by Ctrl-C while the simulation ran beside it: an ordinary exception, so the
    simulation is cancelled (and records its calls) before the interrupt goes on up."""


async def judge_as_completed(judging: RunJudging, completed: CompletedSessions, bar: tqdm) -> None:
    """Judge the sessions ``completed`` hands over until it is closed and empty.

    Each judgement is its own task, and at most the run's concurrency of them run at once, so one
    pool of workers serves every session as it comes (a fixed share per batch would leave a late,
    large batch to the few workers free when it came). Judges read the transcripts from the run's
    file, where the simulator flushes a session's spans before it commits the session.
    """
    slots = asyncio.Semaphore(judging.matrix.concurrency)

    async def judge_one(group: Groups) -> None:
        async with slots:
            try:
                await judging.judge(group, bar, workers=1)
            except KeyboardInterrupt as exc:  # phoenix's executor stopped on Ctrl-C with rows not run
                raise JudgingInterrupted(str(exc)) from None

    try:
        async with asyncio.TaskGroup() as running:
            while batch := await completed.take():
                sessions = {s["session_id"]: s for s in batch}
                groups = judging.plan(rebuild_sessions(spans_dataframe(judging.store, session_ids=sessions)), sessions)
                if groups:
                    bar.total = (bar.total or 0) + RunJudging.count(groups)
                    bar.refresh()
                for group in RunJudging.one_by_one(groups):
                    running.create_task(judge_one(group))
    except BaseExceptionGroup as group:  # a judgement's error, as it would be raised without the others
        raise group.exceptions[0] from None


def judgement_bar(progress: bool, total: Optional[int] = None) -> tqdm:
    """The run's one judgements bar (``total`` None: it grows as sessions are handed to the judges)."""
    return tqdm(total=total or 0, desc="judgements", unit="judgement", disable=not progress or total == 0,
                file=sys.stderr, dynamic_ncols=True)
