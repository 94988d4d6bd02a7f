"""``run``: plan -> simulate -> trace store -> sessions -> judges -> results -> report, in one direction.

The CLI calls ``run_matrix``; so can a notebook or a test. It raises ``RunError`` with an exit code
for anything a user must fix (2) or that stopped the run (3); a gate miss is reported in the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from opentelemetry.sdk.trace import SpanProcessor, SynchronousMultiSpanProcessor
from tqdm import tqdm

from . import __version__
from .aio import run_async
from .evaluators.judges import judging_guard
from .evaluators.logback import push_judgements, run_selection
from .evaluators.run_judging import (CompletedSessions, JudgingInterrupted, RunJudging, judge_as_completed,
                                     judgement_bar)
from .evaluators.sessions import rebuild_sessions
from .matrix import Matrix, store_secret_env_names
from .models.cache import ResponseCache
from .models.embedded import EMBEDDED_LOG, EmbeddedModelError, EmbeddedServer, require_installed, slot_context
from .models.endpoints import Endpoint, EndpointError, check_reachable, endpoints_for, limiters_for, openai_client
from .models.limits import RunCounters
from .records import Sample
from .redact import redact, redacting_processor, register_env
from .reports.gates import check_gates, gate_failures  # noqa: F401  (gate_failures: the public name)
from .reports.html import write_report
from .reports.summary import JUDGE_SAMPLES_SETTING, JUDGE_TEMPERATURE_SETTING, build_summary, write_summary
from .simulator.agents import Agent
from .simulator.app import APP_LOG, AppError, running_app
from .simulator.runner import pending_samples, simulate
from .simulator.tutors import CallableTutor, HttpTutor, PromptTutor, Tutor
from .store import RUN_FILE, RunStore
from .tracing.local import local_span_processor, spans_dataframe
from .tracing.setup import route_spans_to
from .tracing.stores import StoreConfig, TraceStore, TraceStoreError, open_store


class RunError(Exception):
    """A run that cannot start or finish. ``exit_code`` 2: fix the input; 3: the run could not complete."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run. ``run_dir``: the run to resume (None: it had not started, nothing was kept)."""

    def __init__(self, run_dir: Optional[Path]):
        super().__init__(f"interrupted: {run_dir}" if run_dir else "interrupted before the run started")
        self.run_dir = run_dir


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
    tqdm.write(redact(message), file=sys.stderr)


def check_gate_names(matrix: Matrix, gates: Optional[dict[str, float]]) -> None:
    """Gates given on the command line must name judges that run: checked before any model call."""
    unknown = [dim for dim in gates or {} if dim not in matrix.judges.use]
    if unknown:
        raise RunError(f"--gate {', '.join(unknown)}: not a judge of this run; the judges are "
                       f"{', '.join(matrix.judges.use)}", 2)


def run_matrix(
    matrix: Matrix,
    run_dir: Optional[Union[str, Path]] = None,
    *,
    resume: bool = False,
    cache_path: Optional[Union[str, Path]] = None,
    gates: Optional[dict[str, float]] = None,
    progress: bool = True,
    judge: bool = True,
    judge_samples: Optional[int] = None,
    judge_temperature: Optional[float] = None,
    retry_errors: bool = False,
) -> RunOutcome:
    """Simulate, judge and report a matrix. ``cache_path`` None turns the response cache off;
    ``judge=False`` stops after simulation (sessions stay unjudged until a resumed run judges them).
    ``judge_samples``/``judge_temperature``: see ``judge_settings`` (a resumed run keeps its own).
    ``retry_errors``: errored sessions get a new attempt and ``error`` judgements are asked again.

    The run directory is locked for the whole call (another run into it gets ``RunError`` 2). A new
    run that fails before its first session (missing key, unreachable model) removes what it created.
    Ctrl-C raises ``RunInterrupted`` with the directory to resume.
    """
    check_gate_names(matrix, gates)
    cache = ResponseCache(cache_path) if cache_path else None  # a damaged cache fails before anything starts
    remote = None
    try:
        remote = open_remote_store(matrix)  # before the run directory and any model call
        with writing_run(matrix, run_dir, resume) as run:
            store, run_id, run_dir = run.store, run.run_id, run.run_dir
            if not resume:
                store_settings(store, judge_settings(matrix, judge_samples, judge_temperature))
            elif judge_samples is not None and judge_samples != store.setting(JUDGE_SAMPLES_SETTING, 1):
                raise RunError(f"{run_dir}: this run asks each judge {store.setting(JUDGE_SAMPLES_SETTING, 1)} "
                               f"time(s); resume it without --judge-samples, or start a new run", 2)
            uses_local = matrix.uses_local()
            with embedded_server(matrix, run_dir, uses_local) as local_url:
                endpoints = reachable_endpoints(matrix, local_url)
                if uses_local:
                    _log("Using the embedded SmolLM2-135M model: it checks that the pipeline works; "
                         "do not trust its answers or its judgements.")
                with tutor_app(matrix, run_dir, endpoints) as app:
                    run.started = True
                    with _fewer_gc_passes():
                        run_async(_simulate_and_judge(matrix, run_id, store, endpoints, cache, progress, judge,
                                                        remote, retry_errors, app))
            store.finish_run("finished")
            if remote is not None and judge:
                log_back(remote, store, run_dir)
            outcome = summarize_and_report(matrix, store, run_dir, gates)
            raise_if_nothing_done(store, outcome, judge)
            return outcome
    finally:
        for opened in (remote, cache):
            if opened is not None:
                opened.close()


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


LOCK_FILE = "run.lock"
# The embedded server's and an http tutor's app's logs: a start that fails names them, so they stay.
START_LOGS = (EMBEDDED_LOG, APP_LOG)


class RunDirHold:
    """A run directory this command writes: an exclusive lock on ``RUN_DIR/run.lock`` (``flock``,
    released when the process ends, even by SIGKILL) held for the whole command, and what the
    command created there, so a run that never started can remove exactly that (``discard``).
    Readers (``judge RUN_DIR``, ``report``) take no lock."""

    def __init__(self, run_dir: Path, created_dirs: list[Path], existing: set[str]):
        self.run_dir, self.created_dirs, self.existing = run_dir, created_dirs, existing
        self._handle = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._handle.seek(0)
            holder = self._handle.read().strip()
            self._handle.close()
            raise RunError(f"{run_dir} is in use by another simbench run{f' (pid {holder})' if holder else ''}; "
                           "wait for it to end, or choose another --out", 2) from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(str(os.getpid()))
        self._handle.flush()

    def release(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def discard(self) -> None:
        """Remove the files and directories this command created (nothing that was there before),
        but the logs a failed start's error points to (``START_LOGS``)."""
        for name in sorted(set(os.listdir(self.run_dir)) - self.existing - set(START_LOGS)):
            path = self.run_dir / name
            if path.is_file() or path.is_symlink():
                path.unlink()
        self.release()
        for directory in self.created_dirs:  # deepest first
            with contextlib.suppress(OSError):  # not empty: something else wrote there
                directory.rmdir()


@dataclass
class WritingRun:
    """A run this command writes: its file, id and directory, locked. ``started``: set once the
    run's work may begin (the models are up); a run left before that is removed again."""

    store: RunStore
    run_id: str
    run_dir: Path
    started: bool


@contextlib.contextmanager
def writing_run(matrix: Matrix, run_dir: Optional[Path], resume: bool = False,
                samples: Optional[list[Sample]] = None) -> Iterator[WritingRun]:
    """Open (``resume``) or create a run for the block (see ``_open_run``). On the way out the file
    is closed and the lock released; a new run that never started is removed (``RunDirHold.discard``);
    Ctrl-C becomes ``RunInterrupted``, naming the directory to resume once the run has started."""
    store, run_id, run_dir, hold = _open_run(matrix, run_dir, resume, samples)
    run = WritingRun(store, run_id, run_dir, started=resume)  # a resumed run's directory is never removed
    try:
        yield run
    except KeyboardInterrupt:
        raise RunInterrupted(run.run_dir if run.started else None) from None
    finally:
        store.close()
        if run.started:
            hold.release()
        else:
            hold.discard()


def _open_run(matrix: Matrix, run_dir: Optional[Path], resume: bool,
              samples: Optional[list[Sample]] = None) -> tuple[RunStore, str, Path, RunDirHold]:
    """Open (``resume``) or create a run, locked; ``samples`` (default: the matrix's) are its plan.
    The caller releases the hold when done (or discards it: see ``RunDirHold``)."""
    if resume:
        if run_dir is None:
            raise RunError("--resume needs --out RUN_DIR (the run to finish)", 2)
        if not (Path(run_dir) / RUN_FILE).exists():
            raise RunError(f"{run_dir}: no run to resume ({RUN_FILE} is missing)", 2)
        hold = RunDirHold(Path(run_dir), [], set(os.listdir(run_dir)))
        try:
            store = RunStore.open_run_dir(run_dir)
            run = store.run()
            if run is None or run["matrix_fingerprint"] != matrix.fingerprint:
                store.close()
                raise RunError(f"{run_dir}: the matrix changed since this run started; start a new run instead of resuming", 2)
        except BaseException:
            hold.release()
            raise
        return store, run["run_id"], Path(run_dir), hold
    run_id = new_run_id()
    run_dir = Path(run_dir) if run_dir else default_run_dir(matrix, run_id)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    existing = set(os.listdir(run_dir)) if run_dir.is_dir() else set()
    run_dir.mkdir(parents=True, exist_ok=True)
    hold = RunDirHold(run_dir, created, existing)  # a run going on in it: "in use"
    try:
        if (run_dir / RUN_FILE).exists():
            raise RunError(f"{run_dir} already holds a run; pass --resume to finish it, or another --out", 2)
        store = RunStore.open_run_dir(run_dir)
        store.create_run(run_id, matrix.name, matrix.source, matrix.fingerprint, matrix.model_dump_json(), __version__)
        store.add_samples(matrix.samples() if samples is None else samples)
    except BaseException:
        hold.discard()
        raise
    return store, run_id, run_dir, hold


@contextlib.contextmanager
def embedded_server(matrix: Matrix, run_dir: Path, needed: bool,
                     context: Optional[int] = None) -> Iterator[Optional[str]]:
    """The embedded model while the block runs; ``context``: tokens a slot needs (default: the matrix's)."""
    if not needed:
        yield None
        return
    try:
        require_installed()
    except EmbeddedModelError as exc:
        raise RunError(str(exc), 2) from None
    names = matrix.local_model_names()
    slot = slot_context(context or matrix.local_context_needed())
    _log(f"Starting the embedded model ({slot} tokens per slot)...")
    try:
        with EmbeddedServer(names.pop(), slot, log_path=run_dir / EMBEDDED_LOG) as server:
            yield server.base_url
    except EmbeddedModelError as exc:
        raise RunError(str(exc), 3) from None


def reachable_endpoints(matrix: Matrix, local_url: Optional[str]) -> dict[str, Endpoint]:
    register_env(matrix.secret_env_names())  # masked in every error stored or printed from now on
    try:
        endpoints = endpoints_for(matrix, local_url)
    except EndpointError as exc:
        raise RunError(str(exc), 2) from None

    async def check_all() -> None:
        await asyncio.gather(*(check_reachable(e) for e in {e.name: e for e in endpoints.values()}.values()))

    try:
        run_async(check_all())
    except EndpointError as exc:
        raise RunError(str(exc), exc.exit_code) from None
    return endpoints


def open_remote(config: StoreConfig) -> TraceStore:
    """A remote trace store, checked reachable before any model call (``RunError`` with its exit code if not)."""
    register_env(store_secret_env_names(config.space_id_env, config.api_key_env))
    try:
        remote = open_store(config)
        remote.check()
    except TraceStoreError as exc:
        raise RunError(f"trace store: {exc}", exc.exit_code) from None
    return remote


def open_remote_store(matrix: Matrix) -> Optional[TraceStore]:
    """The matrix's remote trace store, checked reachable; None for ``local`` (the run's file only)."""
    spec = matrix.trace_store
    if spec.kind == "local":
        return None
    remote = open_remote(StoreConfig(spec.kind, spec.endpoint, spec.project, spec.space_id_env, spec.api_key_env))
    _log(f"Tracing to {remote.describe()}.")
    return remote


def _span_processor(store: RunStore, remote: Optional[TraceStore]) -> SpanProcessor:
    """The run's own file always gets the spans (the report reads them, and nothing is lost if a
    remote store fails); a remote store gets them too."""
    local = local_span_processor(store)
    if remote is None:
        return local
    both = SynchronousMultiSpanProcessor()
    both.add_span_processor(local)
    both.add_span_processor(redacting_processor(remote.span_processor()))  # the run's file redacts its own
    return both


def _session_spans(store: RunStore, run_id: str, remote: Optional[TraceStore]):
    """The run's spans as the trace store holds them: judges read the store, not the simulator.

    If a remote store cannot give them all back, the run's own copy is judged instead (said on
    stderr), so a store outage costs no judgements.
    """
    local = spans_dataframe(store, f"{run_id}/")
    if remote is None:
        return local
    # Wait for the spans of the sessions to judge; a killed attempt's may never have left the process.
    counted = {s["session_id"] for s in store.latest_sessions() if s["status"] == "completed"}
    try:
        return remote.spans(run_selection(store, run_id, local[local["attributes.session.id"].isin(counted)]))
    except TraceStoreError as exc:
        _log(f"warning: {exc}; judging the run's own copy of the spans instead")
        return local


def log_back(remote: TraceStore, store: RunStore, run_dir: Path) -> None:
    try:
        result = push_judgements(remote, store)
    except TraceStoreError as exc:
        _log(f"warning: judgements were not logged to {remote.describe()}: {exc}. They are saved in "
             f"{run_dir / RUN_FILE}; log them later with: simbench push {run_dir} --store {remote.kind} ...")
        return
    _log(f"Logged {result.logged} judgement(s) of {result.sessions} session(s){result.turns_note()} "
         f"to {remote.describe()}.")


@dataclass(frozen=True)
class RunningApp:
    """An http tutor's app, up for the run: where it answers and the headers every request carries."""

    base_url: str
    headers: dict[str, str]


@contextlib.contextmanager
def tutor_app(matrix: Matrix, run_dir: Path, endpoints: dict[str, Endpoint]) -> Iterator[Optional[RunningApp]]:
    """An http tutor's app for the run (started by its ``start`` command, if any, and checked
    reachable before any session); None for the other kinds."""
    spec = matrix.tutor.http
    if matrix.tutor.kind != "http" or spec is None:
        yield None
        return
    try:
        headers = spec.headers_from(os.environ)
    except KeyError as exc:
        raise RunError(f"tutor.http.headers: environment variable {exc.args[0]} is not set", 2) from None
    env: dict[str, str] = {}
    if matrix.tutor.model is not None:  # the model the app may call, as a callable gets it in TurnContext.model
        endpoint = endpoints[f"tutor:{matrix.tutor.model}"]
        env.update(SIMBENCH_MODEL_BASE_URL=endpoint.base_url, SIMBENCH_MODEL=endpoint.model,
                   SIMBENCH_MODEL_API_KEY=endpoint.api_key)
    if matrix.trace_store.kind == "phoenix":  # an instrumented app traces into the run's project
        env.update(PHOENIX_COLLECTOR_ENDPOINT=matrix.trace_store.endpoint or "",
                   PHOENIX_PROJECT_NAME=matrix.trace_store.project or "")
    folder = Path(matrix.base_dir) if matrix.base_dir else None
    try:
        with running_app(spec, folder, run_dir, headers, env) as base_url:
            yield RunningApp(base_url, headers)
    except AppError as exc:
        raise RunError(str(exc), exc.exit_code) from None


def tutor_for(matrix: Matrix, endpoints: dict[str, Endpoint], cache, limiters, app: Optional[RunningApp]) -> Tutor:
    """The tutor of the matrix's kind, on the run's one call path."""
    if matrix.tutor.kind == "callable":
        return CallableTutor(matrix, endpoints, cache, limiters)
    if matrix.tutor.kind == "http":
        return HttpTutor(matrix, endpoints, app.base_url, app.headers, cache, limiters)
    return PromptTutor(matrix, endpoints, cache, limiters)


async def _simulate_and_judge(matrix, run_id, store, endpoints, cache, progress, judge=True, remote=None,
                              retry_errors=False, app: Optional["RunningApp"] = None) -> None:
    """Simulate the sessions still to do and judge every completed session still owing judgements.

    With the run's own file as the trace store, each session is judged as soon as it is committed,
    beside the simulation (unless the embedded server would serve both: ``judges_alongside``); a
    remote store is read once the simulation has sent it every span.
    """
    counters = RunCounters()
    limiters = limiters_for(matrix, counters)
    tutor = tutor_for(matrix, endpoints, cache, limiters, app)
    student = Agent(openai_client(endpoints["student"], cache, limiters[endpoints["student"].name]), endpoints["student"],
                    matrix.student.max_tokens, matrix.student.temperature)
    todo = pending_samples(store, matrix.samples(), retry_errors)
    alongside = judge and remote is None and judges_alongside(matrix)
    try:
        with route_spans_to(_span_processor(store, remote)):
            with tqdm(total=len(matrix.samples()), initial=len(matrix.samples()) - len(todo), desc="sessions",
                      unit="session", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
                if alongside:
                    async with RunJudging(matrix, store, endpoints, cache, limiters, counters,
                                          retry_errors=retry_errors) as judging:
                        with judgement_bar(progress) as judged:
                            await _simulate_judging_alongside(matrix, run_id, todo, tutor, student, store, bar,
                                                              counters, judging, judged)
                else:
                    await simulate(matrix, run_id, todo, tutor, student, store, bar, counters)
    finally:
        await tutor.aclose()
        await student.client.close()
    if judge and not alongside:
        await judge_run(matrix, run_id, store, endpoints, cache, limiters, progress, counters,
                        _session_spans(store, run_id, remote), retry_errors=retry_errors)


def judges_alongside(matrix: Matrix) -> bool:
    """Whether sessions are judged as they are committed, beside the simulation: not when the
    judges and the simulation both run on the embedded server. Its 4 slots are full while 4
    sessions run, and judges there only slowed the simulation: the example's run took 210-220 s
    instead of 170 s (benchmarks/README.md)."""
    def local(names: list[str]) -> bool:
        return any(matrix.model_spec(name).provider == "local" for name in names)

    return not (local(matrix.judge_model_names()) and local(matrix.tutor.model_names() + [matrix.model_for("student")[0]]))


async def _simulate_judging_alongside(matrix, run_id, todo, tutor, student, store, bar, counters,
                                      judging: RunJudging, judged: tqdm) -> None:
    """Simulate ``todo`` while judging each session once committed (and first those a resumed run
    completed before); either side failing or interrupted stops the other."""
    completed = CompletedSessions([s for s in store.latest_sessions() if s["status"] == "completed"])

    async def simulation() -> None:
        try:
            await simulate(matrix, run_id, todo, tutor, student, store, bar, counters, on_completed=completed.add)
        finally:
            completed.close()

    try:
        async with judging_guard(), asyncio.TaskGroup() as both:
            both.create_task(simulation())
            both.create_task(judge_as_completed(judging, completed, judged))
    except BaseExceptionGroup as group:  # one side's error, as it would be raised without the other
        first = group.exceptions[0]
        if isinstance(first, JudgingInterrupted):
            raise KeyboardInterrupt(str(first)) from None
        raise first from None


# --judge-samples N > 1 without --judge-temperature: at temperature 0 the samples would agree trivially.
DEFAULT_SAMPLE_TEMPERATURE = 0.7


def judge_settings(matrix: Matrix, samples: Optional[int], temperature: Optional[float]) -> dict[str, Any]:
    """How many times each judge reads each session, and at which temperature.

    One sample: the matrix's ``judges.temperature``. Several: ``temperature``, by default
    ``DEFAULT_SAMPLE_TEMPERATURE`` (a matrix temperature above 0 is kept).
    """
    samples = samples or 1
    if temperature is not None:
        reasoning = [name for name in matrix.judge_model_names() if matrix.model_spec(name).is_reasoning()]
        if reasoning:
            raise RunError(f"--judge-temperature: the judges' model {reasoning[0]!r} is a reasoning model, which "
                           "takes no temperature (its answers vary by themselves); leave the option out", 2)
    else:
        temperature = matrix.judges.temperature
        if samples > 1 and temperature == 0:
            temperature = DEFAULT_SAMPLE_TEMPERATURE
    return {JUDGE_SAMPLES_SETTING: samples, JUDGE_TEMPERATURE_SETTING: temperature}


def store_settings(store: RunStore, settings: dict[str, Any]) -> None:
    for key, value in settings.items():
        store.set_setting(key, value)


async def judge_run(matrix, run_id, store, endpoints, cache, limiters, progress, counters, spans=None, *,
                    retry_errors: bool = False) -> None:
    """Judge every completed session that owes judgements, reading transcripts from the trace store
    (``spans``; default: the run's own file). See ``RunJudging``."""
    latest = {s["session_id"]: s for s in store.latest_sessions() if s["status"] == "completed"}
    if spans is None:
        spans = spans_dataframe(store, f"{run_id}/")
    transcripts = [t for t in rebuild_sessions(spans) if t.session_id in latest]
    async with RunJudging(matrix, store, endpoints, cache, limiters, counters, retry_errors=retry_errors) as judging:
        groups = judging.plan(transcripts, latest)
        with judgement_bar(progress, RunJudging.count(groups)) as bar:
            async with judging_guard():
                await judging.judge(groups, bar)


def raise_if_nothing_done(store: RunStore, outcome: RunOutcome, judged: bool = True) -> None:
    """``RunError`` 3 when the run produced nothing to rate: every session errored, or (``judged``)
    every judgement did. The message gives the most common reason; the report is written already."""
    sessions = outcome.summary["sessions"]
    if sessions["planned"] and not sessions["completed"]:
        reasons = Counter(s["error"] or "no reason recorded" for s in store.latest_sessions() if s["status"] == "errored")
        if reasons:
            reason, n = reasons.most_common(1)[0]
            raise RunError(f"every session errored; the most common reason ({n} of {sessions['errored']}): {reason} "
                           f"(all of them in {outcome.report_path})", 3)
        raise RunError(f"no session completed (see {outcome.report_path})", 3)
    if not judged:
        return
    counted = {s["session_id"] for s in store.latest_sessions() if s["status"] == "completed"}
    judgements = [j for j in store.judgements() if j.session_id in counted]
    errors = [j for j in judgements if j.status == "error"]
    if errors and not any(j.status == "ok" for j in judgements):
        first = errors[0]
        raise RunError(f"every judgement errored ({len(errors)}); the first, {first.judge} on {first.session_id}: "
                       f"{first.error} (all of them in {outcome.report_path})", 3)


def summarize_and_report(matrix: Matrix, store: RunStore, run_dir: Path, gates: Optional[dict[str, float]]) -> RunOutcome:
    summary = build_summary(store)
    thresholds = {**matrix.gates, **(gates or {})}
    checks = check_gates(summary, thresholds)
    failures = [c.message for c in checks if not c.passed]
    summary["gates"] = {"failures": failures, "thresholds": thresholds, "checks": [c.as_dict() for c in checks]}
    summary_path = write_summary(summary, run_dir)
    report_path = write_report(store, summary, run_dir, matrix.uses_local())
    return RunOutcome(run_dir, summary, failures, report_path, summary_path)


def stored_matrix(store: RunStore) -> Matrix:
    """The matrix a run file recorded; ``RunError`` (exit 2) when the file holds no run or an unreadable one."""
    from pydantic import ValidationError

    run = store.run()
    if run is None:
        raise RunError(f"{store.path}: holds no run (an empty or foreign SQLite file)", 2)
    try:
        return Matrix.model_validate_json(run["matrix_json"])
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RunError(f"{store.path}: the run's matrix cannot be read ({'.'.join(map(str, first['loc']))}: "
                       f"{first['msg']}); was it written by another simbench?", 2) from None


def rebuild_report(run_dir: Path) -> RunOutcome:
    """Regenerate summary.json and report.html from a run's SQLite file (no model calls)."""
    store = RunStore.open_existing(run_dir)
    try:
        matrix = stored_matrix(store)
        return summarize_and_report(matrix, store, Path(run_dir), None)
    finally:
        store.close()


# -- judging sessions already in a run's file ----------------------------------------------------


async def judge_stored_sessions(matrix: Matrix, store: RunStore, endpoints, cache, progress: bool,
                                spans=None) -> None:
    """Judge the sessions already in a run's file (imported ones: nothing to simulate) with fresh limits."""
    counters = RunCounters()
    limiters = limiters_for(matrix, counters)
    await judge_run(matrix, store.run()["run_id"], store, endpoints, cache, limiters, progress, counters, spans)
