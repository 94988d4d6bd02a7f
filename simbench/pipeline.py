"""``run``: plan -> simulate -> trace store -> sessions -> judges -> results -> report, in one direction.

The CLI calls ``run_matrix``; so can a notebook or a test. It raises ``RunError`` with an exit code
for anything a user must fix (2) or that stopped the run (3); a gate miss is reported in the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from tqdm import tqdm

from . import __version__
from .evaluators.builtin import BUILTIN
from .evaluators.judges import JudgeInput, judge_sessions
from .evaluators.sessions import rebuild_sessions
from .matrix import Matrix
from .models.cache import ResponseCache
from .models.embedded import EmbeddedModelError, EmbeddedServer, slot_context
from .models.endpoints import Endpoint, EndpointError, check_reachable, endpoints_for, limiters_for, openai_client
from .models.limits import RunCounters
from .records import CallRecord, Judgement
from .reports.gates import check_gates, gate_failures  # noqa: F401  (gate_failures: the public name)
from .reports.html import write_report
from .reports.summary import build_summary, write_summary
from .simulator.agents import Agent
from .simulator.runner import pending_samples, simulate
from .store import RUN_FILE, RunStore
from .tracing.local import local_span_processor, spans_dataframe
from .tracing.setup import route_spans_to


class RunError(Exception):
    """A run that cannot start or finish. ``exit_code`` 2: fix the input; 3: the run could not complete."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunOutcome:
    run_dir: Path
    summary: dict[str, Any]
    gate_failures: list[str]
    report_path: Path
    summary_path: Path


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def default_run_dir(matrix: Matrix, run_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in matrix.name)
    return Path("runs") / f"{safe}-{run_id}"


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def run_matrix(
    matrix: Matrix,
    run_dir: Optional[Path] = None,
    *,
    resume: bool = False,
    cache_path: Optional[Path] = None,
    gates: Optional[dict[str, float]] = None,
    progress: bool = True,
    judge: bool = True,
) -> RunOutcome:
    """Simulate, judge and report a matrix. ``cache_path`` None turns the response cache off;
    ``judge=False`` stops after simulation (sessions stay unjudged until a resumed run judges them)."""
    store, run_id, run_dir = _open_run(matrix, run_dir, resume)
    cache = ResponseCache(cache_path) if cache_path else None
    try:
        uses_local = matrix.uses_local()
        with _embedded_server(matrix, run_dir, uses_local) as local_url:
            endpoints = _endpoints(matrix, local_url)
            if uses_local:
                _log("Using the embedded SmolLM2-135M model: it checks that the pipeline works; "
                     "do not trust its answers or its judgements.")
            with _fewer_gc_passes():
                asyncio.run(_simulate_and_judge(matrix, run_id, store, endpoints, cache, progress, judge))
        store.finish_run("finished")
        outcome = _report(matrix, store, run_dir, gates)
        if outcome.summary["sessions"]["planned"] and not outcome.summary["sessions"]["completed"]:
            raise RunError(f"every session errored (reasons in {outcome.report_path})", 3)
        return outcome
    finally:
        store.close()
        if cache is not None:
            cache.close()


@contextlib.contextmanager
def _fewer_gc_passes(young_threshold: int = 10_000) -> Iterator[None]:
    """Spend less of the run's CPU in the cyclic garbage collector; restore its settings afterwards.

    Every model call allocates thousands of short-lived objects, so the default threshold (700)
    runs a young collection every few calls, and each full collection walks every object the
    imports created (openai, pandas, scipy, phoenix). Measured at 256 sessions in flight: ~8% of the
    harness CPU went to the collector, ~2% with the import-time objects frozen and a larger young
    generation. Reference counting frees almost everything anyway; cycles are still collected.
    """
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(young_threshold, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _open_run(matrix: Matrix, run_dir: Optional[Path], resume: bool) -> tuple[RunStore, str, Path]:
    if resume:
        if run_dir is None:
            raise RunError("--resume needs --out RUN_DIR (the run to finish)", 2)
        if not (Path(run_dir) / RUN_FILE).exists():
            raise RunError(f"{run_dir}: no run to resume ({RUN_FILE} is missing)", 2)
        store = RunStore.open_run_dir(run_dir)
        run = store.run()
        if run is None or run["matrix_fingerprint"] != matrix.fingerprint:
            store.close()
            raise RunError(f"{run_dir}: the matrix changed since this run started; start a new run instead of resuming", 2)
        return store, run["run_id"], Path(run_dir)
    run_id = new_run_id()
    run_dir = Path(run_dir) if run_dir else default_run_dir(matrix, run_id)
    if (run_dir / RUN_FILE).exists():
        raise RunError(f"{run_dir} already holds a run; pass --resume to finish it, or another --out", 2)
    run_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore.open_run_dir(run_dir)
    store.create_run(run_id, matrix.name, matrix.source, matrix.fingerprint, matrix.model_dump_json(), __version__)
    store.add_samples(matrix.samples())
    return store, run_id, run_dir


@contextlib.contextmanager
def _embedded_server(matrix: Matrix, run_dir: Path, needed: bool) -> Iterator[Optional[str]]:
    if not needed:
        yield None
        return
    names = matrix.local_model_names()
    slot = slot_context(matrix.local_context_needed())
    _log(f"Starting the embedded model (llama-server, {slot} tokens per slot)...")
    try:
        with EmbeddedServer(names.pop(), slot, log_path=run_dir / "llama-server.log") as server:
            yield server.base_url
    except EmbeddedModelError as exc:
        raise RunError(str(exc), 3) from None


def _endpoints(matrix: Matrix, local_url: Optional[str]) -> dict[str, Endpoint]:
    try:
        endpoints = endpoints_for(matrix, local_url)
    except EndpointError as exc:
        raise RunError(str(exc), 2) from None

    async def check_all() -> None:
        await asyncio.gather(*(check_reachable(e) for e in {e.name: e for e in endpoints.values()}.values()))

    try:
        asyncio.run(check_all())
    except EndpointError as exc:
        raise RunError(str(exc), 3) from None
    return endpoints


async def _simulate_and_judge(matrix, run_id, store, endpoints, cache, progress, judge=True) -> None:
    counters = RunCounters()
    limiters = limiters_for(matrix, counters)
    tutor = Agent(openai_client(endpoints["tutor"], cache, limiters[endpoints["tutor"].name]), endpoints["tutor"],
                  matrix.tutor.max_tokens, matrix.tutor.temperature)
    student = Agent(openai_client(endpoints["student"], cache, limiters[endpoints["student"].name]), endpoints["student"],
                    matrix.student.max_tokens, matrix.student.temperature)
    todo = pending_samples(store, matrix.samples())
    try:
        with route_spans_to(local_span_processor(store)):
            with tqdm(total=len(matrix.samples()), initial=len(matrix.samples()) - len(todo), desc="sessions",
                      unit="session", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
                await simulate(matrix, run_id, todo, tutor, student, store, bar, counters)
    finally:
        await tutor.client.close()
        await student.client.close()
    if judge:
        await _judge_run(matrix, run_id, store, endpoints["judge"], cache, limiters[endpoints["judge"].name], progress, counters)


async def _judge_run(matrix, run_id, store, endpoint, cache, limiter, progress, counters) -> None:
    """Judge every completed session that has no verdict yet, reading transcripts from the trace store."""
    latest = {s["session_id"]: s for s in store.latest_sessions() if s["status"] == "completed"}
    done = {(j.session_id, j.judge) for j in store.judgements()}
    transcripts = [t for t in rebuild_sessions(spans_dataframe(store, f"{run_id}/")) if t.session_id in latest]
    definitions = [BUILTIN[name] for name in matrix.judges.use]
    # A resumed run may have some judges done for a session: ask only for the missing ones.
    groups: dict[tuple[str, ...], list[JudgeInput]] = {}
    for t in transcripts:
        missing = tuple(d.name for d in definitions if (t.session_id, d.name) not in done)
        if missing:
            session = latest[t.session_id]
            topic = matrix.topic(session["topic"])
            groups.setdefault(missing, []).append(
                JudgeInput(t, session["sample_id"], topic.name, topic.opening, topic.reference, topic.goal))

    by_status = {"error": 0, "skipped": 0}

    def save(judgement: Judgement, calls: list[CallRecord]) -> None:
        store.add_judgements([judgement], {judgement.session_id: calls})
        if judgement.status in by_status:
            by_status[judgement.status] += 1
        bar.set_postfix_str(f"error={by_status['error']} skipped={by_status['skipped']} "
                            f"retries={counters.retries} 429s={counters.rate_limited}", refresh=False)

    total = sum(len(inputs) * len(names) for names, inputs in groups.items())
    with tqdm(total=total, desc="judgements", unit="judgement", disable=not progress or not total,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for names, inputs in groups.items():
            await judge_sessions(inputs, [BUILTIN[n] for n in names], endpoint, cache, limiter, save,
                                 concurrency=matrix.concurrency, max_tokens=matrix.judges.max_tokens,
                                 temperature=matrix.judges.temperature, progress=bar)


def _report(matrix: Matrix, store: RunStore, run_dir: Path, gates: Optional[dict[str, float]]) -> RunOutcome:
    summary = build_summary(store)
    thresholds = {**matrix.gates, **(gates or {})}
    checks = check_gates(summary, thresholds)
    failures = [c.message for c in checks if not c.passed]
    summary["gates"] = {"failures": failures, "thresholds": thresholds, "checks": [c.as_dict() for c in checks]}
    summary_path = write_summary(summary, run_dir)
    report_path = write_report(store, summary, run_dir, matrix.uses_local())
    return RunOutcome(run_dir, summary, failures, report_path, summary_path)


def rebuild_report(run_dir: Path) -> RunOutcome:
    """Regenerate summary.json and report.html from a run's SQLite file (no model calls)."""
    if not (Path(run_dir) / RUN_FILE).exists():
        raise RunError(f"{run_dir}: not a run directory ({RUN_FILE} is missing)", 2)
    store = RunStore.open_run_dir(run_dir)
    try:
        matrix = Matrix.model_validate_json(store.run()["matrix_json"])
        return _report(matrix, store, Path(run_dir), None)
    finally:
        store.close()
