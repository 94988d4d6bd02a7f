"""Judge sessions that already exist, without simulating: one path for a transcripts file, a run's
sessions and a trace store's.

Every source gives ``ImportedSession`` records (records.py): ``load_transcripts`` parses a JSONL file
(docs/transcripts.md); ``sessions_from_spans`` rebuilds a span dataframe (``spans_from_run``,
``spans_from_store``). ``judge_imported`` writes them into a new run directory (locked; removed again
if the run never started), judges them with the code that judges a simulated run, reports, and logs
the judgements back to a trace store when one is given. ``push_run`` logs a finished run's
judgements to a store later.

The run's matrix (``import_matrix``) says what the run was: a tutor of kind ``imported`` whose
variants are the sessions' variants, no student, and the judges that ran. Sessions from spans keep
their source's ids (and their spans), so judgements logged back land on the right sessions; their
sample (variant, topic, persona, repeat) comes from the metadata simbench puts on every span, and a
production session without it is ``production`` / ``unknown`` / its user id. A transcripts line is
written as the spans the tracer would have recorded for it (``conversation_spans``).
"""

from __future__ import annotations

import time
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from .aio import run_async
from .evaluators.logback import PushResult, push_judgements
from .evaluators.sessions import rebuild_sessions
from .evaluators.transcripts import TranscriptError, load_transcripts
from .matrix import LOCAL_MAX_CONTEXT, JudgesSpec, Matrix, Persona, Topic, TutorSpec, judge_prompt_tokens
from .models.cache import ResponseCache
from .pipeline import (RunError, RunOutcome, _log, check_gate_names, embedded_server, judge_settings,
                       judge_stored_sessions, log_back, open_remote, raise_if_nothing_done,
                       reachable_endpoints, store_settings, stored_matrix, summarize_and_report, writing_run)
from .records import ImportedSession, Sample, SimulatedSession, session_id_for
from .store import RunStore, dumps
from .tracing.local import add_span_frame, spans_dataframe
from .tracing.setup import SESSION_END_SPAN
from .tracing.stores import SpanSelection, StoreConfig, TraceStore, TraceStoreError

PRODUCTION_VARIANT = "production"  # a traced session that names no variant
TRANSCRIPTS_VARIANT = "imported"  # a transcripts line that names none (docs/transcripts.md)
UNKNOWN = "unknown"


# -- sources --------------------------------------------------------------------------------------


def spans_from_run(run_dir: Path) -> tuple[pd.DataFrame, Matrix]:
    """A local run's spans (its counted sessions only) and the matrix it ran."""
    store = RunStore.open_existing(run_dir)
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


def sessions_from_spans(spans: pd.DataFrame) -> list[ImportedSession]:
    """One session per rebuilt conversation that has messages, named from its spans' metadata."""
    times = _session_times(spans)
    out = []
    for transcript in rebuild_sessions(spans):
        if not transcript.messages:
            continue
        meta = transcript.metadata
        start, end = times.get(transcript.session_id, (None, None))
        out.append(ImportedSession(
            source_id=transcript.session_id,
            messages=list(transcript.messages),
            topic=str(meta.get("topic") or UNKNOWN),
            persona=str(meta.get("persona") or _user_of(spans, transcript.session_id) or UNKNOWN),
            variant=str(meta.get("variant") or PRODUCTION_VARIANT),
            repeat=_int(meta.get("repeat")),
            reference=meta.get("reference"), goal=meta.get("goal"),
            session_id=transcript.session_id, span_id=transcript.span_id, started_at=start, ended_at=end,
        ))
    return out


# -- judging --------------------------------------------------------------------------------------


def judge_transcripts(path: Path, matrix: Optional[Matrix] = None, run_dir: Optional[Path] = None, *,
                      sessions: Optional[list[ImportedSession]] = None, judges: Optional[JudgesSpec] = None,
                      **options: Any) -> RunOutcome:
    """Judge the conversations of a transcripts file (docs/transcripts.md) into a new run directory.

    ``matrix`` supplies the judges, their models and the gates (default: the built-in judges on the
    embedded model); ``judges``: these judges instead of the matrix's, and none of its gates;
    ``sessions``: the file already parsed; ``options``: those of ``judge_imported``. Raises
    ``TranscriptError`` for an invalid file (before any model call) and ``RunError`` as
    ``run_matrix`` does.
    """
    sessions = load_transcripts(path) if sessions is None else sessions
    return judge_imported(sessions, matrix, run_dir, name=Path(path).stem, source=str(path),
                          matrix_gates=judges is None, judges=judges, **options)


def judge_spans(spans: pd.DataFrame, judge_matrix: Matrix, run_dir: Path, *, name: str, source: str,
                log_to: Optional[TraceStore] = None, cache_path: Optional[Path] = None, progress: bool = True,
                judge_samples: Optional[int] = None, judge_temperature: Optional[float] = None) -> RunOutcome:
    """Judge every session in ``spans`` with ``judge_matrix``'s judges into a new run in ``run_dir``,
    logging the judgements back to ``log_to`` if given."""
    sessions = sessions_from_spans(spans)
    if not sessions:
        raise RunError(f"no sessions to judge in {source}", 2)
    return judge_imported(sessions, judge_matrix, run_dir, name=name, source=source, spans=spans, log_to=log_to,
                          cache_path=cache_path, progress=progress, judge_samples=judge_samples,
                          judge_temperature=judge_temperature, require_verdicts=True)


def judge_imported(
    sessions: list[ImportedSession],
    base: Optional[Matrix],
    run_dir: Optional[Path],
    *,
    name: str,
    source: str,
    spans: Optional[pd.DataFrame] = None,
    log_to: Optional[TraceStore] = None,
    cache_path: Optional[Path] = None,
    gates: Optional[dict[str, float]] = None,
    matrix_gates: bool = False,
    progress: bool = True,
    settings: Optional[dict[str, Any]] = None,
    judge_samples: Optional[int] = None,
    judge_temperature: Optional[float] = None,
    require_verdicts: bool = False,
    judges: Optional[JudgesSpec] = None,
) -> RunOutcome:
    """Write ``sessions`` into a new run, judge them with ``judges`` (default: ``base``'s, else the
    built-in judges on the embedded model) on ``base``'s models, report, and log back to ``log_to``.

    ``spans``: the sessions' own spans, copied into the run (sessions from a trace store); without
    them each session is written as the spans the tracer would have recorded. ``gates``: from the
    command line; ``matrix_gates``: also apply ``base``'s. ``settings``: run settings the report
    reads, stored before judging; ``require_verdicts``: ``RunError`` when every judgement errored
    (calibrate and selftest report that themselves). Ctrl-C raises ``RunInterrupted``.
    """
    samples = samples_for(sessions)
    spec = import_matrix(sessions, samples, name, base, source, matrix_gates, judges)
    check_gate_names(spec, gates)
    context = _judge_context(spec, sessions, source)
    cache = ResponseCache(cache_path) if cache_path else None
    try:
        with writing_run(spec, run_dir, samples=samples) as run:
            store, run_dir = run.store, run.run_dir
            store_settings(store, {**judge_settings(spec, judge_samples, judge_temperature), **(settings or {})})
            write_sessions(store, run.run_id, sessions, samples, source, spans)
            with embedded_server(spec, run_dir, spec.uses_local(), context) as local_url:
                endpoints = reachable_endpoints(spec, local_url)
                if spec.uses_local():
                    _log("Judging with the embedded SmolLM2-135M model: it checks that the pipeline works; "
                         "do not trust its judgements.")
                run.started = True
                run_async(judge_stored_sessions(spec, store, endpoints, cache, progress, spans_dataframe(store)))
            store.finish_run("finished")
            if log_to is not None:
                log_back(log_to, store, run_dir)
            outcome = summarize_and_report(spec, store, run_dir, gates)
            if require_verdicts:
                raise_if_nothing_done(store, outcome)
            return outcome
    finally:
        if cache is not None:
            cache.close()


# -- the run of imported sessions -----------------------------------------------------------------


def samples_for(sessions: list[ImportedSession]) -> list[Sample]:
    """One sample per session: its recorded repeat, else the n-th session of its (variant, topic,
    persona) cell; numbered on where two would share an id, so sample ids stay unique."""
    counts: dict[tuple[str, str, str], int] = {}
    taken: set[str] = set()
    out = []
    for s in sessions:
        cell = (s.variant, s.topic, s.persona)
        repeat = s.repeat or counts.get(cell, 0) + 1
        sample = Sample(*cell, repeat)
        while sample.sample_id in taken:
            repeat += 1
            sample = Sample(*cell, repeat)
        counts[cell] = max(counts.get(cell, 0), repeat)
        taken.add(sample.sample_id)
        out.append(sample)
    return out


def import_matrix(sessions: list[ImportedSession], samples: list[Sample], name: str, base: Optional[Matrix] = None,
                  source: str = "<transcripts>", matrix_gates: bool = True,
                  judges: Optional[JudgesSpec] = None) -> Matrix:
    """The matrix recorded with a run of imported sessions.

    Judges, models and concurrency come from ``base`` (default: the built-in judges on the embedded
    model), and its gates with ``matrix_gates``; variants, topics and personas are the names the
    sessions carry (``base``'s own topic and persona, with their fields, where the names match), so
    the summary and the report break results down by them. The tutor is ``kind: imported`` and
    there is no student: nothing is simulated, and only the judges' models are started.
    """
    judges = judges or (base.judges if base else JudgesSpec())
    known_topics = {t.name: t for t in base.topics} if base else {}
    known_personas = {p.name: p for p in base.personas} if base else {}
    known_variants = base.tutor.variants if base else {}
    variants: dict[str, Any] = {}
    topics: dict[str, Topic] = {}
    personas: dict[str, Persona] = {}
    for s in sessions:
        variants.setdefault(s.variant, _prompt_of(base, s.variant) if s.variant in known_variants else "")
        topics.setdefault(s.topic, known_topics.get(s.topic) or Topic(name=s.topic, opening=s.opening or s.topic))
        personas.setdefault(s.persona, known_personas.get(s.persona)
                            or Persona(name=s.persona, description=f"(imported from {source})"))
    baseline = base.tutor.baseline if base and base.tutor.baseline in variants else next(iter(variants))
    return Matrix(
        name=name or "imported",
        models=dict(base.models) if base else {},
        tutor=TutorSpec(kind="imported", variants=variants, baseline=baseline),
        student=None,
        judges=judges,
        topics=list(topics.values()),
        personas=list(personas.values()),
        # Only sessions a simbench run numbered are repeats of one configuration (pass^k); two lines
        # of a transcripts file in one cell are different conversations.
        repeats=max((s.repeat for s in sessions if s.repeat), default=1),
        max_turns=max((sum(1 for m in s.messages if m.role == "tutor") for s in sessions), default=1),
        concurrency=base.concurrency if base else 8,
        gates=dict(base.gates) if base and matrix_gates else {},
        source=source,
    )


def _prompt_of(base: Matrix, variant: str) -> str:
    return base.tutor.variant(variant).prompt or ""


def write_sessions(store: RunStore, run_id: str, sessions: list[ImportedSession], samples: list[Sample], source: str,
                   spans: Optional[pd.DataFrame] = None) -> list[str]:
    """The sessions as completed sessions of the run, with their spans, origins (transcripts lines)
    and human labels. Returns the session ids, in order."""
    now = time.time()
    base_ns = time.time_ns()
    ids, origins, labels = [], [], []
    for n, (session, sample) in enumerate(zip(sessions, samples)):
        if session.session_id is None:
            session_id = session_id_for(run_id, sample.sample_id, 1)
            rows = conversation_spans(session, session_id, base_ns + n * 1_000_000)
            store.add_spans(rows)
            root = rows[0][0]
        else:
            session_id, root = session.session_id, session.span_id
        record = SimulatedSession(sample, session_id, 1, "completed", list(session.messages), stop_reason="imported",
                                  started_at=session.started_at or now, ended_at=session.ended_at or now)
        store.start_session(record)
        store.finish_session(record, root, [])
        ids.append(session_id)
        if session.line is not None:
            origins.append((session_id, source, session.source_id, session.line))
        labels.extend((session_id, dim, label) for dim, label in session.labels.items())
    if spans is not None:
        add_span_frame(store, spans[spans["attributes.session.id"].isin(set(ids))])
    store.add_imported(origins, labels)
    return ids


def conversation_spans(session: ImportedSession, session_id: str, start_ns: int) -> list[tuple]:
    """The local store's span rows for one conversation, as the tracer would have written them.

    One LLM span per tutor message (input: the student message before it; output: the message) and,
    when the conversation ends with the student, a closing ``session.end`` span carrying it. The
    session's reference and goal travel in the spans' metadata, where the judges read them.
    """
    trace_id = secrets.token_hex(16)
    metadata = dumps({"imported": True, "source_id": session.source_id, "line": session.line,
                      "variant": session.variant, "topic": session.topic, "persona": session.persona,
                      "reference": session.reference, "goal": session.goal, **session.extra})
    common = {"session.id": session_id, "user.id": session.persona, "metadata": metadata}
    rows = []
    pending_student: Optional[str] = None
    tick = 0

    def row(name: str, kind: str, attributes: dict[str, Any]) -> tuple:
        nonlocal tick
        tick += 1
        # A millisecond apart: Phoenix keeps microseconds through a float, and spans a microsecond
        # apart came back with equal start times (the turn order of the rebuild then by chance).
        start = start_ns + tick * 1_000_000
        return (secrets.token_hex(8), trace_id, None, name, kind, start, start + 500_000, "OK", session_id,
                dumps({**common, "openinference.span.kind": kind, **attributes}))

    for message in session.messages:
        if message.role == "student":
            pending_student = message.content
            continue
        attributes: dict[str, Any] = {"llm.output_messages.0.message.role": "assistant",
                                      "llm.output_messages.0.message.content": message.content}
        if pending_student is not None:
            attributes["llm.input_messages.0.message.role"] = "user"
            attributes["llm.input_messages.0.message.content"] = pending_student
        rows.append(row("imported.turn", "LLM", attributes))
        pending_student = None
    rows.append(row(SESSION_END_SPAN, "CHAIN", {"output.value": "imported",
                                                **({"input.value": pending_student} if pending_student else {})}))
    return rows


def _judge_context(matrix: Matrix, sessions: list[ImportedSession], source: str) -> Optional[int]:
    """Tokens one embedded-model slot needs for the longest judge prompt; a conversation too long
    for the model is an input error naming its line or session (before any model call)."""
    if not matrix.uses_local():
        return None
    needed = [(s, judge_prompt_tokens(matrix, "\n\n".join(m.content for m in s.messages), s.topic,
                                      s.reference or matrix.topic(s.topic).reference, s.goal or matrix.topic(s.topic).goal))
              for s in sessions]
    too_long = [f"{source}:{s.line if s.line is not None else ' session ' + s.source_id}: the conversation needs "
                f"about {n} tokens with the judge's prompt; the embedded model holds {LOCAL_MAX_CONTEXT} "
                "(judge it with a remote model: --matrix with judges.model)"
                for s, n in needed if n > LOCAL_MAX_CONTEXT]
    if too_long:
        raise TranscriptError(too_long)
    return max(n for _, n in needed)


def _session_times(spans: pd.DataFrame) -> dict[str, tuple[float, float]]:
    if spans.empty:
        return {}
    grouped = spans.groupby("attributes.session.id")
    starts = grouped["start_time"].min()
    ends = grouped["end_time"].max()
    return {str(k): (_seconds(starts[k]), _seconds(ends[k])) for k in starts.index}


def _seconds(value: Any) -> Optional[float]:
    return None if value is None or pd.isna(value) else pd.Timestamp(value).value / 1e9


def _user_of(spans: pd.DataFrame, session_id: str) -> Optional[str]:
    users = spans.loc[spans["attributes.session.id"] == session_id, "attributes.user.id"].dropna()
    return str(users.iloc[0]) if len(users) else None


def _int(value: Any) -> Optional[int]:
    try:
        return int(value) if value is not None and int(value) > 0 else None
    except (TypeError, ValueError):
        return None


# -- push -----------------------------------------------------------------------------------------


def push_run(run_dir: Path, config: StoreConfig) -> PushResult:
    """Log a finished run's judgements to a store (the run's file is only read)."""
    store = RunStore.open_existing(run_dir)
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
