"""Run session judges over rebuilt transcripts with phoenix.evals, storing each judgement as it completes.

Every judge is a ``ClassificationEvaluator`` run by ``async_evaluate_dataframe`` under
``suppress_tracing()``. One row per (session, judgement sample); the row carries the sample key so
the response cache keys each judgement apart. A judge whose required input is missing records
``skipped``; a failed or unparseable answer records ``error`` with the reason. Neither is a pass or a fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import sys
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Sequence

import httpx2
import pandas as pd
from openinference.instrumentation import suppress_tracing
from phoenix.evals import LLM, ClassificationEvaluator, async_evaluate_dataframe
from phoenix.evals.llm.wrapper import generate_classification_schema
from tqdm import tqdm

from ..models.cache import ResponseCache
from ..models.endpoints import Endpoint, http_client, sampling_params
from ..models.limits import ModelLimiter
from ..models.transport import CallScope, call_scope
from ..records import CallRecord, Judgement, Transcript
from .builtin import JudgeDefinition
from .judge_client import JUDGE_CLIENT

# phoenix.evals gives every task a hard 60 s and then requeues it (its retries come at once, with no
# back-off; ours happen in the transport). A requeued row waits on the same in-flight request
# (``SessionJudge._shared``), so its retries only extend the patience to cover our own timeout.
PHOENIX_TASK_TIMEOUT_S = 60


@dataclass
class JudgeInput:
    """A transcript and what the judges may use besides it."""

    transcript: Transcript
    sample_key: str
    topic: str = ""
    opening: Optional[str] = None
    reference: Optional[str] = None
    goal: Optional[str] = None
    subject: Optional[str] = None
    misconceptions: Optional[str] = None  # one per line
    persona: Optional[str] = None  # name, description and traits, as ``persona_text`` writes them


def persona_text(persona: Any) -> str:
    """A persona as a judge reads it (the ``{persona}`` column): name, description, traits."""
    traits = "".join(f"\n- {t}" for t in getattr(persona, "traits", []) or [])
    return f"{persona.name}: {persona.description}" + (f"\nTraits:{traits}" if traits else "")


OnJudgement = Callable[[Judgement, list[CallRecord]], None]


class SessionJudge(ClassificationEvaluator):
    """A ClassificationEvaluator that knows which session it reads (for the cache and accounting),
    skips sessions that lack its required inputs, and reports each verdict as it arrives."""

    def __init__(self, definition: JudgeDefinition, llm: LLM, judge_model: str, on_judgement: OnJudgement, **kwargs: Any):
        super().__init__(
            name=definition.name,
            llm=llm,
            prompt_template=definition.template,
            choices=definition.choices,
            direction=definition.direction,
            **kwargs,
        )
        self.definition = definition
        self.judge_model = judge_model
        self.on_judgement = on_judgement
        self.calls: dict[tuple, list[CallRecord]] = {}
        self.reported: set[tuple] = set()
        self.in_flight: dict[tuple, asyncio.Task] = {}

    async def async_evaluate(self, eval_input: dict, input_mapping: Any = None) -> list:
        """What phoenix.evals calls per row. Its timeout cancels only the wait, never the request:
        a requeued row picks up the request already in flight instead of sending another."""
        key = _row_key(eval_input)
        task = self.in_flight.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.ensure_future(self._evaluate_row(eval_input, input_mapping))
            self.in_flight[key] = task
        return await asyncio.shield(task)

    async def stop_in_flight(self) -> None:
        """Cancel the requests still running and wait until they have stopped."""
        for task in self.in_flight.values():
            task.cancel()
        await asyncio.gather(*self.in_flight.values(), return_exceptions=True)

    def _verdict(self, row: dict, status: str, **fields: Any) -> Judgement:
        """A Judgement for a row: a session's, or (per-turn judges) one tutor turn's."""
        turn = row.get("turn") if self.definition.per_turn else None
        return Judgement(row["session_id"], self.name, self.judge_model, int(row["judge_sample"]), status,
                         turn=None if turn is None else int(turn),
                         span_id=row.get("span_id") if turn is not None else None, **fields)

    async def _evaluate_row(self, eval_input: dict, input_mapping: Any) -> list:
        judge_sample = int(eval_input["judge_sample"])
        key = _row_key(eval_input)
        missing = [f for f in self.definition.requires if not eval_input.get(f)]
        if missing:
            self._report(key, self._verdict(eval_input, "skipped", error=f"no {', '.join(missing)} for this session"))
            return []
        not_selected = self.definition.prefilter.reason_to_skip(eval_input) if self.definition.prefilter else None
        if not_selected:
            self._report(key, self._verdict(eval_input, "skipped", error=not_selected))
            return []
        scope = CallScope("judge", eval_input["sample_key"], judge_sample)
        try:
            with call_scope(scope):
                scores = await super().async_evaluate(eval_input=eval_input, input_mapping=input_mapping)
        except asyncio.CancelledError:
            self.calls.setdefault(key, []).extend(scope.calls)  # interrupted: no verdict, but the calls were made
            raise
        except Exception as exc:
            # The transport has already retried what a retry can fix; an answer that does not parse
            # would come back the same (at temperature 0, or from the cache). Recording the error here
            # keeps it from phoenix's executor, whose requeues and concurrency cuts add nothing.
            self.calls.setdefault(key, []).extend(scope.calls)
            self._report(key, self._verdict(eval_input, "error", error=f"{type(exc).__name__}: {exc}"[:1000]))
            return []
        self.calls.setdefault(key, []).extend(scope.calls)
        score = scores[0]
        passed = score.label in self.definition.pass_labels()
        self._report(key, self._verdict(eval_input, "ok", label=score.label, score=score.score, passed=passed,
                                        explanation=score.explanation))
        return scores

    def _report(self, key: tuple, judgement: Judgement) -> None:
        self.reported.add(key)
        self.on_judgement(judgement, self.calls.pop(key, []))

    def report_failures(self, rows: list[dict], details: list[Any]) -> int:
        """After the executor gave up on a row: record ``error`` with its reason (never a verdict).

        Rows the executor never ran (it was interrupted) are left unrecorded, for a resumed run;
        returns how many there were.
        """
        not_run = 0
        for row, detail in zip(rows, details):
            key = _row_key(row)
            if key in self.reported:
                continue
            if _status(detail) == "DID NOT RUN":
                not_run += 1
                continue
            self._report(key, self._verdict(row, "error", error=_failure_reason(detail)))
        return not_run


def _row_key(row: dict) -> tuple[str, int, int]:
    """(session, judgement sample, turn): a session judge's rows have turn 0."""
    return (row["session_id"], int(row["judge_sample"]), int(row.get("turn") or 0))


def session_row(item: JudgeInput, judge_sample: int) -> dict:
    """One dataframe row: a session and everything a judge template may read, as columns."""
    messages = item.transcript.messages
    return {
        "session_id": item.transcript.session_id,
        "sample_key": item.sample_key,
        "judge_sample": judge_sample,
        "transcript": item.transcript.render(),
        "topic": item.topic,
        "opening": item.opening or "",
        "reference": item.reference or "",
        "goal": item.goal or "",
        "subject": item.subject or "",
        "misconceptions": item.misconceptions or "",
        "persona": item.persona or "",
        "tool_calls": item.transcript.render_tool_calls(),
        # for pre-filters (multi-stage judging): each side's messages alone
        "tutor_text": "\n\n".join(m.content for m in messages if m.role == "tutor"),
        "student_text": "\n\n".join(m.content for m in messages if m.role == "student"),
    }


def turn_rows(item: JudgeInput, judge_sample: int) -> list[dict]:
    """One row per tutor turn for a per-turn judge: the session's columns plus ``turn`` (1-based),
    ``reply`` (that tutor message), ``context`` (the conversation before it) and ``span_id``."""
    base = session_row(item, judge_sample)
    messages = item.transcript.messages
    span_ids = item.transcript.turn_span_ids
    rows = []
    for index, message in enumerate(messages):
        if message.role != "tutor":
            continue
        turn = len(rows) + 1
        before = Transcript(item.transcript.session_id, "", messages[:index])
        # a pre-filter with ``text: tutor`` reads this turn's reply only
        rows.append({**base, "turn": turn, "reply": message.content, "context": before.render(),
                     "tool_calls": item.transcript.render_tool_calls(turn),
                     "tutor_text": message.content, "span_id": span_ids[turn - 1] if turn <= len(span_ids) else ""})
    return rows


def judge_llm(client: httpx2.AsyncClient, endpoint: Endpoint, concurrency: int) -> LLM:
    """phoenix.evals' LLM on our transport (cache, limits, retries, accounting), without its slow default rate,
    through the client that posts phoenix's request body without openai's transform (``judge_client``)."""
    # phoenix.evals' own limiter starts at 5 requests/s and would throttle the run; ours governs.
    requests_per_second = max(100.0, 10.0 * concurrency)
    return LLM(
        provider="openai",
        client=JUDGE_CLIENT,
        model=endpoint.model,
        base_url=endpoint.base_url,
        api_key=endpoint.api_key,
        initial_per_second_request_rate=requests_per_second,
        async_client_kwargs={"http_client": client, "timeout": endpoint.timeout},
    )


@contextlib.asynccontextmanager
async def judging_guard() -> AsyncIterator[None]:
    """Around all the judging of a command: Ctrl-C cancels the task running the block (and every
    ``judge_sessions`` under it) and the block ends in ``KeyboardInterrupt``; phoenix.evals' output
    goes to stderr.

    Each phoenix executor swaps in a SIGINT handler that stops only itself, and concurrent ones can
    restore a stale one: Ctrl-C stopped one shard while the others went on spending. The event
    loop's own handler sees every SIGINT whichever Python handler is installed; the handler there
    before the block is put back after it. (Only in the main thread: a notebook's run has a thread
    of its own, aio.py, and is stopped by cancelling it.)
    """
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    before = signal.getsignal(signal.SIGINT)
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        watching = True
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no signals here
        watching = False
    try:
        # phoenix.evals reports requeues with tqdm.write on stdout; keep stdout for our results.
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except asyncio.CancelledError:
        if not interrupted:
            raise
        task.uncancel()
        raise KeyboardInterrupt("judging interrupted") from None
    finally:
        if watching:
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, before)


async def judge_sessions(
    inputs: list[JudgeInput],
    definitions: list[JudgeDefinition],
    endpoint: Endpoint,
    cache: Optional[ResponseCache],
    limiter: ModelLimiter,
    on_judgement: OnJudgement,
    *,
    concurrency: int,
    max_tokens: int,
    temperature: float,
    judge_samples: int = 1,
    progress: Optional[tqdm] = None,
    sample_indices: Optional[Sequence[int]] = None,
    on_unjudged_calls: Optional[Callable[[str, list[CallRecord]], None]] = None,
    llm: Optional[LLM] = None,
) -> None:
    """Judge every input with every definition ``judge_samples`` times; ``on_judgement`` gets each result.

    ``sample_indices``: only these judgement samples (default: ``range(judge_samples)``). ``llm``:
    the endpoint's ``judge_llm``, shared by calls that run side by side (made here if not given: it
    costs tens of milliseconds of CPU).
    ``on_unjudged_calls(session_id, calls)`` gets the calls of judgements cut off by Ctrl-C. Run it
    inside ``judging_guard``: Ctrl-C cancels it, which stops every request at once (the verdicts so
    far are reported). Several may run at once on one event loop.
    """
    if not inputs or not definitions:
        return
    if len({d.per_turn for d in definitions}) != 1:
        raise ValueError("session judges and per-turn judges run in separate calls")
    make_rows = turn_rows if definitions[0].per_turn else (lambda item, index: [session_row(item, index)])
    indices = range(judge_samples) if sample_indices is None else sample_indices
    rows = [row for item in inputs for index in indices for row in make_rows(item, index)]
    if not rows:
        return

    def report(judgement: Judgement, calls: list[CallRecord]) -> None:
        on_judgement(judgement, calls)
        if progress is not None:
            progress.update(1)

    client = None
    if llm is None:
        client = http_client(endpoint, cache, limiter)
        llm = judge_llm(client, endpoint, concurrency)
    # More workers than the model's limiter admits would only sit out phoenix's timeout in our queue.
    workers = max(1, min(concurrency, limiter.limit.maximum, len(rows)))
    # Enough requeues to outwait one request's own timeout (the in-flight request is shared).
    phoenix_retries = max(3, math.ceil((endpoint.timeout + 60) / PHOENIX_TASK_TIMEOUT_S))
    judges = [
        SessionJudge(d, llm, endpoint.name, report, **sampling_params(endpoint, max_tokens, temperature),
                     **(_bounded_explanation(d, max_tokens) if endpoint.local else {}))
        for d in definitions
    ]
    # One single-worker executor per shard of rows, not one executor with many workers: phoenix's
    # executor lowers its target worker count after timeouts, and a worker above the target idles
    # while the row it requeued waits in the queue for ever (seen here: a run stalled on its last
    # row). A target can never drop below one worker.
    shards = [rows[i::workers] for i in range(workers)]
    results = None
    try:
        with suppress_tracing():
            results = await asyncio.gather(*(
                async_evaluate_dataframe(
                    dataframe=pd.DataFrame(shard),
                    evaluators=judges,
                    concurrency=1,
                    hide_tqdm_bar=True,
                    exit_on_error=False,
                    max_retries=phoenix_retries,
                )
                for shard in shards
            ))
    finally:  # also when cancelled (Ctrl-C, see judging_guard): stop what is in flight, keep what was paid
        for judge in judges:
            await judge.stop_in_flight()
        if client is not None:
            await client.aclose()
        if results is None:
            _save_unjudged_calls(judges, on_unjudged_calls)
    not_run = 0
    for shard, result in zip(shards, results):
        for judge in judges:
            not_run += judge.report_failures(shard, result[f"{judge.name}_execution_details"].tolist())
    _save_unjudged_calls(judges, on_unjudged_calls)
    if not_run:
        # phoenix's executor stops on Ctrl-C and returns: leave those rows for a resumed run
        raise KeyboardInterrupt(f"judging interrupted with {not_run} judgement(s) not run")


def _save_unjudged_calls(judges: list[SessionJudge], on_unjudged_calls) -> None:
    """Hand on the calls of rows that got no verdict (interrupted): they were made and paid for."""
    for judge in judges:
        for key, calls in judge.calls.items():
            if calls and on_unjudged_calls is not None:
                on_unjudged_calls(key[0], calls)
        judge.calls.clear()


def _bounded_explanation(definition: JudgeDefinition, max_tokens: int) -> dict[str, Any]:
    """Request options that cap the explanation's length in the JSON schema itself.

    A small model (the embedded one) can ramble in its explanation until ``max_tokens`` cuts the JSON
    mid-string, and at temperature 0 every retry rambles the same way. llama.cpp turns ``maxLength``
    into its grammar, so the answer always closes. The schema is phoenix.evals' own, plus the cap;
    it replaces phoenix's ``response_format`` through ``extra_body`` (OpenAI's strict mode rejects
    ``maxLength``, so this is for the embedded model only). A token is at least one character, so
    the answer fits in ``max_tokens``.
    """
    schema = generate_classification_schema(list(definition.choices), include_explanation=True)
    schema["properties"]["explanation"]["maxLength"] = max(40, max_tokens - 48)
    schema["additionalProperties"] = False
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "extract_structured_data", "schema": schema, "strict": True}}
    return {"extra_body": {"response_format": response_format}}


def _status(detail: Any) -> Optional[str]:
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except ValueError:
            return None
    return detail.get("status") if isinstance(detail, dict) else None


def _failure_reason(detail: Any) -> str:
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except ValueError:
            return detail[:1000]
    if isinstance(detail, dict):
        exceptions = detail.get("exceptions") or []
        last = exceptions[-1] if exceptions else f"status {detail.get('status')}"
        return f"{len(exceptions)} failed attempt(s); last: {last}"[:1000]
    return "the judge gave no answer"
