"""Judge sessions that already exist, without simulating: download, evaluate, upload.

``simbench judge`` takes its sessions from one source, each a function returning the span dataframe
(``spans_from_run``, ``spans_from_store``); ``judge_spans`` judges them into a new run directory with
the same report as ``run`` and logs the judgements back to a trace store if one is given.
``push_run`` logs a finished run's judgements to a store later.

Sessions keep the ids they have in their source, so judgements land on the right sessions when they
are logged back. Their sample (variant, topic, persona, repeat) comes from the metadata simbench puts
on every span; a production session without it is ``production`` / ``unknown`` / its user id.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from . import __version__
from .evaluators.logback import PushResult, push_judgements
from .evaluators.sessions import rebuild_sessions
from .matrix import Matrix, Persona, Topic, TutorSpec
from .models.cache import ResponseCache
from .pipeline import (RunError, RunOutcome, embedded_server, judge_settings, judge_stored_sessions, log_back,
                       new_run_id, open_remote, raise_if_nothing_done, reachable_endpoints, store_settings,
                       stored_matrix, summarize_and_report)
from .records import Sample, SimulatedSession, Transcript
from .store import RUN_FILE, RunStore
from .tracing.local import add_span_frame, spans_dataframe
from .tracing.stores import SpanSelection, StoreConfig, TraceStore, TraceStoreError

IMPORTED_VARIANT = "production"
UNKNOWN = "unknown"


# -- sources: each returns the span dataframe ------------------------------------------------------


def spans_from_run(run_dir: Path) -> tuple[pd.DataFrame, Matrix]:
    """A local run's spans (its counted sessions only) and the matrix it ran."""
    store = _open_existing(run_dir)
    try:
        matrix = stored_matrix(store)
        counted = {s["session_id"] for s in store.latest_sessions() if s["status"] == "completed"}
        spans = spans_dataframe(store)
        return spans[spans["attributes.session.id"].isin(counted)].reset_index(drop=True), matrix
    finally:
        store.close()


def spans_from_store(trace_store: TraceStore, start: datetime, end: datetime, where: Optional[str] = None) -> pd.DataFrame:
    """Every session with spans in [start, end) in a remote store (``where``: the store's own filter)."""
    try:
        return trace_store.spans(SpanSelection(start=start, end=end, where=where))
    except TraceStoreError as exc:
        raise RunError(f"trace store: {exc}", exc.exit_code) from None


# -- judging --------------------------------------------------------------------------------------


@dataclass
class ImportedSession:
    transcript: Transcript
    sample: Sample
    started_at: float
    ended_at: float


def judge_spans(
    spans: pd.DataFrame,
    judge_matrix: Matrix,
    run_dir: Path,
    *,
    name: str,
    source: str,
    log_to: Optional[TraceStore] = None,
    cache_path: Optional[Path] = None,
    progress: bool = True,
    judge_samples: Optional[int] = None,
    judge_temperature: Optional[float] = None,
) -> RunOutcome:
    """Judge every session in ``spans`` with ``judge_matrix``'s judges into a new run in ``run_dir``."""
    sessions = imported_sessions(spans)
    if not sessions:
        raise RunError(f"no sessions to judge in {source}", 2)
    matrix = matrix_for(sessions, judge_matrix, name, source)
    run_dir = Path(run_dir)
    if (run_dir / RUN_FILE).exists():
        raise RunError(f"{run_dir} already holds a run; choose another --out", 2)
    run_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore.open_run_dir(run_dir)
    cache = ResponseCache(cache_path) if cache_path else None
    try:
        run_id = new_run_id()
        store.create_run(run_id, matrix.name, source, matrix.fingerprint, matrix.model_dump_json(), __version__)
        store_settings(store, judge_settings(matrix, judge_samples, judge_temperature))
        _store_sessions(store, sessions, spans)
        with embedded_server(matrix, run_dir, matrix.uses_local()) as local_url:
            endpoints = reachable_endpoints(matrix, local_url)
            asyncio.run(judge_stored_sessions(matrix, store, endpoints, cache, progress, spans_dataframe(store)))
        store.finish_run("finished")
        if log_to is not None:
            log_back(log_to, store, run_dir)
        outcome = summarize_and_report(matrix, store, run_dir, None)
        raise_if_nothing_done(store, outcome)
        return outcome
    finally:
        store.close()
        if cache is not None:
            cache.close()


def imported_sessions(spans: pd.DataFrame) -> list[ImportedSession]:
    """One sample per session, named from its metadata; repeats numbered so sample ids stay unique."""
    times = _session_times(spans)
    taken: set[str] = set()
    out = []
    for transcript in rebuild_sessions(spans):
        if not transcript.messages:
            continue
        meta = transcript.metadata
        variant = str(meta.get("variant") or IMPORTED_VARIANT)
        topic = str(meta.get("topic") or UNKNOWN)
        persona = str(meta.get("persona") or _user_of(spans, transcript.session_id) or UNKNOWN)
        repeat = _int(meta.get("repeat")) or 1
        sample = Sample(variant, topic, persona, repeat)
        while sample.sample_id in taken:
            repeat += 1
            sample = Sample(variant, topic, persona, repeat)
        taken.add(sample.sample_id)
        start, end = times.get(transcript.session_id, (0.0, 0.0))
        out.append(ImportedSession(transcript, sample, start, end))
    return out


def matrix_for(sessions: list[ImportedSession], judge_matrix: Matrix, name: str, source: str) -> Matrix:
    """The matrix recorded with the run: the judges and models of ``judge_matrix``; variants, topics
    and personas as the sessions name them (the judge matrix's own topic, with its reference and
    goal, where the names match)."""
    known_topics = {t.name: t for t in judge_matrix.topics}
    known_personas = {p.name: p for p in judge_matrix.personas}
    variants: dict[str, str] = {}
    topics: dict[str, Topic] = {}
    personas: dict[str, Persona] = {}
    for s in sessions:
        known = judge_matrix.tutor.variant(s.sample.variant).prompt if s.sample.variant in judge_matrix.tutor.variants else None
        variants.setdefault(s.sample.variant, known or f"(imported from {source})")
        opening = next((m.content for m in s.transcript.messages if m.role == "student"), "") or "(none)"
        topics.setdefault(s.sample.topic, known_topics.get(s.sample.topic) or Topic(name=s.sample.topic, opening=opening))
        personas.setdefault(s.sample.persona, known_personas.get(s.sample.persona)
                            or Persona(name=s.sample.persona, description=f"(imported from {source})"))
    baseline = judge_matrix.tutor.baseline if judge_matrix.tutor.baseline in variants else next(iter(variants))
    matrix = Matrix(
        name=name, models=judge_matrix.models, judges=judge_matrix.judges,
        # Nothing is simulated: the tutor names the judges' model, so no other model is started.
        tutor=TutorSpec(model=judge_matrix.judges.model, baseline=baseline, variants=variants),
        student=judge_matrix.student.model_copy(update={"model": judge_matrix.judges.model}),
        topics=list(topics.values()), personas=list(personas.values()),
        repeats=max(s.sample.repeat for s in sessions), max_turns=judge_matrix.max_turns,
        concurrency=judge_matrix.concurrency, gates={},
    )
    matrix.source = source
    matrix.fingerprint = "imported"
    return matrix


def _store_sessions(store: RunStore, sessions: list[ImportedSession], spans: pd.DataFrame) -> None:
    store.add_samples([s.sample for s in sessions])
    ids = {s.transcript.session_id for s in sessions}
    add_span_frame(store, spans[spans["attributes.session.id"].isin(ids)])
    for s in sessions:
        record = SimulatedSession(s.sample, s.transcript.session_id, 1, "completed", list(s.transcript.messages),
                                  stop_reason="imported", started_at=s.started_at, ended_at=s.ended_at)
        store.start_session(record)
        store.finish_session(record, s.transcript.span_id, [])


def _session_times(spans: pd.DataFrame) -> dict[str, tuple[float, float]]:
    if spans.empty:
        return {}
    grouped = spans.groupby("attributes.session.id")
    starts = grouped["start_time"].min()
    ends = grouped["end_time"].max()
    return {str(k): (_seconds(starts[k]), _seconds(ends[k])) for k in starts.index}


def _seconds(value: Any) -> float:
    return 0.0 if value is None or pd.isna(value) else pd.Timestamp(value).value / 1e9


def _user_of(spans: pd.DataFrame, session_id: str) -> Optional[str]:
    users = spans.loc[spans["attributes.session.id"] == session_id, "attributes.user.id"].dropna()
    return str(users.iloc[0]) if len(users) else None


def _int(value: Any) -> Optional[int]:
    try:
        return int(value) if value is not None and int(value) > 0 else None
    except (TypeError, ValueError):
        return None


def _open_existing(run_dir: Path) -> RunStore:
    if not (Path(run_dir) / RUN_FILE).exists():
        raise RunError(f"{run_dir}: not a run directory ({RUN_FILE} is missing)", 2)
    return RunStore.open_run_dir(run_dir)


# -- push -----------------------------------------------------------------------------------------


def push_run(run_dir: Path, config: StoreConfig) -> PushResult:
    """Log a finished run's judgements to a store (the run's file is only read)."""
    store = _open_existing(run_dir)
    try:
        trace_store = open_remote(config)
        try:
            result = push_judgements(trace_store, store)
        except TraceStoreError as exc:
            raise RunError(f"trace store: {exc}", exc.exit_code) from None
        finally:
            trace_store.close()
        return result
    finally:
        store.close()
