"""The run's SQLite file (``RUN_DIR/run.sqlite``): run, samples, sessions, spans, evaluations, calls.

One helper for every read and write of a run. WAL mode; every finished session and judgement is
committed as it completes. The schema is versioned; ``MIGRATIONS`` upgrade older files in order.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from .records import CallRecord, Judgement, Sample, SimulatedSession
from .redact import redact_row

RUN_FILE = "run.sqlite"


def _migration_1() -> str:
    """The first schema: run, samples, sessions, spans, evaluations, calls."""
    return (
        """
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY, matrix_name TEXT NOT NULL, matrix_source TEXT,
            matrix_fingerprint TEXT NOT NULL, matrix_json TEXT NOT NULL,
            simbench_version TEXT, created_at REAL NOT NULL, finished_at REAL, status TEXT NOT NULL
        );
        CREATE TABLE samples (
            sample_id TEXT PRIMARY KEY, variant TEXT NOT NULL, topic TEXT NOT NULL,
            persona TEXT NOT NULL, repeat INTEGER NOT NULL
        );
        CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY, sample_id TEXT NOT NULL REFERENCES samples(sample_id),
            attempt INTEGER NOT NULL, status TEXT NOT NULL, stop_reason TEXT, error TEXT,
            turns INTEGER NOT NULL DEFAULT 0, span_id TEXT, started_at REAL, ended_at REAL
        );
        CREATE INDEX sessions_by_sample ON sessions(sample_id, attempt);
        CREATE TABLE spans (
            span_id TEXT PRIMARY KEY, trace_id TEXT NOT NULL, parent_id TEXT, name TEXT NOT NULL,
            span_kind TEXT, start_time INTEGER NOT NULL, end_time INTEGER NOT NULL,
            status_code TEXT NOT NULL, session_id TEXT, attributes TEXT NOT NULL
        );
        CREATE INDEX spans_by_session ON spans(session_id, start_time);
        CREATE TABLE evaluations (
            session_id TEXT NOT NULL, judge TEXT NOT NULL, judge_model TEXT NOT NULL,
            judge_sample INTEGER NOT NULL, status TEXT NOT NULL, label TEXT, score REAL,
            passed INTEGER, explanation TEXT, error TEXT, created_at REAL NOT NULL,
            PRIMARY KEY (session_id, judge, judge_model, judge_sample)
        );
        CREATE TABLE calls (
            session_id TEXT NOT NULL, role TEXT NOT NULL, model TEXT NOT NULL, status INTEGER NOT NULL,
            cached INTEGER NOT NULL, latency_s REAL NOT NULL, prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL, error TEXT, attempt INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX calls_by_session ON calls(session_id);
        """
    )


def _migration_2() -> str:
    """Per-turn judgements: one verdict per tutor turn (its span), besides the session's aggregate."""
    return """
        CREATE TABLE turn_evaluations (
            session_id TEXT NOT NULL, judge TEXT NOT NULL, judge_model TEXT NOT NULL,
            judge_sample INTEGER NOT NULL, turn INTEGER NOT NULL, span_id TEXT, status TEXT NOT NULL,
            label TEXT, score REAL, passed INTEGER, explanation TEXT, error TEXT, created_at REAL NOT NULL,
            PRIMARY KEY (session_id, judge, judge_model, judge_sample, turn)
        );
        """


def _migration_3() -> str:
    """Imported sessions: where each came from (file line, its own id), human labels, run settings."""
    return (
        """
        CREATE TABLE imported_sessions (
            session_id TEXT PRIMARY KEY, source TEXT NOT NULL, source_id TEXT NOT NULL, line INTEGER NOT NULL
        );
        CREATE TABLE human_labels (
            session_id TEXT NOT NULL, dimension TEXT NOT NULL, label TEXT NOT NULL,
            PRIMARY KEY (session_id, dimension)
        );
        CREATE TABLE run_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """
    )


# Each returns the SQL that upgrades a file by one version; applied in order, once each, in one
# transaction with the version bump. The count applied is the file's schema version.
MIGRATIONS = [_migration_1, _migration_2, _migration_3]
SCHEMA_VERSION = len(MIGRATIONS)


class RunFileError(Exception):
    """A run file that cannot be used: damaged, not a run file, or from a newer simbench.

    ``exit_code`` 2: the file given is the problem; 3: it could not be opened (e.g. locked).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _unusable(path: Path, exc: sqlite3.Error) -> RunFileError:
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return RunFileError(f"{path}: cannot open the run file: {exc}", 3)
    return RunFileError(f"{path}: damaged or not a simbench run file ({exc})", 2)


class RunStore:
    """A run's SQLite file. Safe to share between the event loop and exporter threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise _unusable(self.path, exc) from None
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise _unusable(self.path, exc) from None
        except RunFileError:
            self._db.close()
            raise

    @classmethod
    def open_run_dir(cls, run_dir: Path) -> "RunStore":
        return cls(Path(run_dir) / RUN_FILE)

    @classmethod
    def open_existing(cls, run_dir: Path) -> "RunStore":
        """An existing run's file, to read (no lock: readers never write); ``RunFileError`` 2 if there is none."""
        if not (Path(run_dir) / RUN_FILE).exists():
            raise RunFileError(f"{run_dir}: not a run directory ({RUN_FILE} is missing)", 2)
        return cls.open_run_dir(run_dir)

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RunFileError(
                    f"{self.path} was written by a newer simbench (schema {version} > {SCHEMA_VERSION}); upgrade simbench", 2
                )
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                self._db.executescript(f"BEGIN;\n{migration()}\nPRAGMA user_version = {number};\nCOMMIT;")

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _write(self, sql: str, rows: Iterable[tuple] | tuple = ()) -> None:
        """Run one statement (or one per row) in a single committed transaction."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                if isinstance(rows, list):
                    self._db.executemany(sql, [redact_row(r) for r in rows])
                else:
                    self._db.execute(sql, redact_row(rows))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise _unusable(self.path, exc) from None

    # -- run and plan -------------------------------------------------------------------------

    def create_run(self, run_id: str, matrix_name: str, source: str, fingerprint: str, matrix_json: str, version: str) -> None:
        self._write(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, NULL, 'running')",
            (run_id, matrix_name, source, fingerprint, matrix_json, version, time.time()),
        )

    def run(self) -> Optional[dict]:
        rows = self._read("SELECT * FROM runs LIMIT 1")
        return dict(rows[0]) if rows else None

    def finish_run(self, status: str) -> None:
        self._write("UPDATE runs SET finished_at = ?, status = ?", (time.time(), status))

    def add_samples(self, samples: list[Sample]) -> None:
        self._write(
            "INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?)",
            [(s.sample_id, s.variant, s.topic, s.persona, s.repeat) for s in samples],
        )

    def samples(self) -> list[Sample]:
        rows = self._read("SELECT variant, topic, persona, repeat FROM samples ORDER BY rowid")
        return [Sample(r["variant"], r["topic"], r["persona"], r["repeat"]) for r in rows]

    # -- sessions -----------------------------------------------------------------------------

    def start_session(self, session: SimulatedSession) -> None:
        self._write(
            "INSERT INTO sessions (session_id, sample_id, attempt, status, started_at) VALUES (?, ?, ?, 'running', ?)",
            (session.session_id, session.sample.sample_id, session.attempt, session.started_at),
        )

    def finish_session(self, session: SimulatedSession, span_id: Optional[str], calls: list[CallRecord]) -> None:
        """Commit a finished session and its calls together (call only after its spans are flushed)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "UPDATE sessions SET status = ?, stop_reason = ?, error = ?, turns = ?, span_id = ?, ended_at = ?"
                    " WHERE session_id = ?",
                    redact_row((session.status, session.stop_reason, session.error, session.tutor_turns, span_id,
                            session.ended_at, session.session_id)),
                )
                self._insert_calls(session.session_id, calls)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def add_calls(self, session_id: str, calls: list[CallRecord]) -> None:
        """Commit calls on their own: those of work interrupted before its commit (they were paid for)."""
        if calls:
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    self._insert_calls(session_id, calls)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def _insert_calls(self, session_id: str, calls: list[CallRecord]) -> None:
        self._db.executemany(
            "INSERT INTO calls VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [redact_row((session_id, c.role, c.model, c.status, int(c.cached), c.latency_s, c.prompt_tokens,
                     c.completion_tokens, c.error, c.attempt)) for c in calls],
        )

    def next_attempt(self, sample_id: str) -> int:
        row = self._read("SELECT MAX(attempt) AS a FROM sessions WHERE sample_id = ?", (sample_id,))
        return (row[0]["a"] or 0) + 1

    def latest_sessions(self) -> list[dict]:
        """Each sample's latest attempt joined with its sample's names: what counts."""
        rows = self._read(
            """
            SELECT s.*, p.variant, p.topic, p.persona, p.repeat FROM sessions s
            JOIN samples p ON p.sample_id = s.sample_id
            WHERE s.attempt = (SELECT MAX(attempt) FROM sessions t WHERE t.sample_id = s.sample_id)
            ORDER BY p.rowid
            """
        )
        return [dict(r) for r in rows]

    def superseded_sessions(self) -> list[dict]:
        rows = self._read(
            "SELECT s.* FROM sessions s WHERE s.attempt < (SELECT MAX(attempt) FROM sessions t WHERE t.sample_id = s.sample_id)"
        )
        return [dict(r) for r in rows]

    # -- spans (the local trace store) ---------------------------------------------------------

    def add_spans(self, rows: list[tuple]) -> None:
        self._write("INSERT OR REPLACE INTO spans VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def span_rows(self, session_prefix: Optional[str] = None,
                  session_ids: Optional[Iterable[str]] = None) -> list[sqlite3.Row]:
        """Stored spans by start time: all, one run's (``session_prefix``) or these sessions' (``session_ids``)."""
        if session_ids is not None:
            ids = sorted(set(session_ids))
            rows: list[sqlite3.Row] = []
            for i in range(0, len(ids), 500):  # SQLite caps the parameters of one statement
                chunk = ids[i:i + 500]
                rows += self._read(f"SELECT * FROM spans WHERE session_id IN ({','.join('?' * len(chunk))})", tuple(chunk))
            return sorted(rows, key=lambda r: r["start_time"])
        if session_prefix is None:
            return self._read("SELECT * FROM spans ORDER BY start_time")
        return self._read(
            "SELECT * FROM spans WHERE session_id >= ? AND session_id < ? ORDER BY start_time",
            (session_prefix, session_prefix + "\U0010ffff"),
        )

    # -- evaluations and calls ------------------------------------------------------------------

    def add_judgements(self, judgements: list[Judgement], calls: dict[str, list[CallRecord]]) -> None:
        """Commit judgements of a session (with the judge calls they cost) in one transaction."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [redact_row((j.session_id, j.judge, j.judge_model, j.judge_sample, j.status, j.label, j.score,
                             None if j.passed is None else int(j.passed), j.explanation, j.error, now))
                     for j in judgements if j.turn is None],
                )
                self._db.executemany(
                    "INSERT OR REPLACE INTO turn_evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [redact_row((j.session_id, j.judge, j.judge_model, j.judge_sample, j.turn, j.span_id, j.status,
                             j.label, j.score, None if j.passed is None else int(j.passed), j.explanation, j.error,
                             now))
                     for j in judgements if j.turn is not None],
                )
                for session_id, records in calls.items():
                    self._insert_calls(session_id, records)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def judgements(self) -> list[Judgement]:
        rows = self._read("SELECT * FROM evaluations ORDER BY rowid")
        return [
            Judgement(r["session_id"], r["judge"], r["judge_model"], r["judge_sample"], r["status"], r["label"],
                      r["score"], None if r["passed"] is None else bool(r["passed"]), r["explanation"], r["error"])
            for r in rows
        ]

    def turn_judgements(self) -> list[Judgement]:
        """Per-turn verdicts (``turn`` and ``span_id`` set), in session, judge and turn order."""
        rows = self._read("SELECT * FROM turn_evaluations ORDER BY session_id, judge, judge_sample, turn")
        return [
            Judgement(r["session_id"], r["judge"], r["judge_model"], r["judge_sample"], r["status"], r["label"],
                      r["score"], None if r["passed"] is None else bool(r["passed"]), r["explanation"], r["error"],
                      r["turn"], r["span_id"])
            for r in rows
        ]

    def usage_by_session(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{session_id: {role: {calls, retries, cached, errors, prompt_tokens, completion_tokens, latency_s}}}.

        ``calls`` counts first tries, ``retries`` the attempts after them, ``errors`` attempts that failed.
        """
        rows = self._read(
            "SELECT session_id, role, SUM(attempt = 0) AS calls, SUM(attempt > 0) AS retries,"
            " SUM(cached) AS cached, SUM(error IS NOT NULL) AS errors,"
            " SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,"
            " SUM(latency_s) AS latency_s FROM calls GROUP BY session_id, role"
        )
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for r in rows:
            out.setdefault(r["session_id"], {})[r["role"]] = {
                k: r[k] for k in ("calls", "retries", "cached", "errors", "prompt_tokens", "completion_tokens", "latency_s")
            }
        return out

    def usage_by_model(self) -> list[dict[str, Any]]:
        """Tokens per (role, model, cached): what cost accounting needs (cached calls cost nothing)."""
        rows = self._read(
            "SELECT role, model, cached, SUM(prompt_tokens) AS prompt_tokens,"
            " SUM(completion_tokens) AS completion_tokens FROM calls GROUP BY role, model, cached"
        )
        return [dict(r) for r in rows]

    # -- imported sessions, human labels, run settings -----------------------------------------

    def add_imported(self, rows: list[tuple[str, str, str, int]], labels: list[tuple[str, str, str]]) -> None:
        """Record where imported sessions came from: (session_id, source file, source id, line), and
        their human labels: (session_id, dimension, label)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO imported_sessions VALUES (?, ?, ?, ?)", map(redact_row, rows))
                self._db.executemany("INSERT OR REPLACE INTO human_labels VALUES (?, ?, ?)", map(redact_row, labels))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def imported_sessions(self) -> dict[str, dict[str, Any]]:
        """{session_id: {source, source_id, line}} for the run's imported sessions (empty for a simulated run)."""
        rows = self._read("SELECT * FROM imported_sessions ORDER BY line")
        return {r["session_id"]: {"source": r["source"], "source_id": r["source_id"], "line": r["line"]} for r in rows}

    def human_labels(self) -> dict[str, dict[str, str]]:
        """{session_id: {dimension: label}}: the labels people gave imported sessions."""
        out: dict[str, dict[str, str]] = {}
        for r in self._read("SELECT * FROM human_labels ORDER BY rowid"):
            out.setdefault(r["session_id"], {})[r["dimension"]] = r["label"]
        return out

    def set_setting(self, key: str, value: Any) -> None:
        """Store a run setting (JSON) that the report needs again, e.g. the calibration map."""
        self._write("INSERT OR REPLACE INTO run_settings VALUES (?, ?)", (key, dumps(value)))

    def setting(self, key: str, default: Any = None) -> Any:
        rows = self._read("SELECT value FROM run_settings WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def close(self) -> None:
        with self._lock:
            self._db.close()


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
