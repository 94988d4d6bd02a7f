"""Shared fixtures: a fake OpenAI-compatible server, a matrix writer, and CLI/run-file helpers.

Every model call in these tests goes to ``tests/fake_openai.py`` on 127.0.0.1 (openai 3.x talks
through httpx2, so in-process HTTP mocking cannot intercept it). Nothing here replaces simbench's
own code: runs go through the real CLI, the real transport, tracer, trace store and judges.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai import FakeOpenAI, Fault  # noqa: E402

import simbench.cli  # noqa: E402

SIMBENCH_BIN = Path(sys.executable).parent / "simbench"
FAKE_MODEL = "fake-model"


# -- a fake server that also remembers its answers ----------------------------------------------


@dataclass
class RecordingFake(FakeOpenAI):
    """FakeOpenAI that records every (role, request, answer content) it served and can fail on cue.

    ``fail_when(request)`` True answers that request with HTTP 500 (a scripted outage of one
    conversation, where ``Fault`` can only draw failures at random).
    """

    fail_when: Optional[Callable[[dict], bool]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.exchanges: list[tuple[str, dict, str]] = []
        self._writers: set[asyncio.StreamWriter] = set()

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._loop.is_closed():
            return  # already stopped
        # Close kept-alive connections while the loop still runs, so no handler is left to be
        # garbage-collected on a closed loop (that only makes noise, but noise hides real warnings).
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close_connections(), self._loop).result(10)
        super().__exit__(*exc)
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()

    async def _close_connections(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()  # the handler reads EOF and returns
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if handlers:
            await asyncio.wait(handlers, timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await super()._handle(reader, writer)
        finally:
            self._writers.discard(writer)

    async def _route(self, method: str, path: str, body: bytes):
        if self.fail_when is not None and method == "POST" and path.endswith("/chat/completions"):
            request = json.loads(body)
            if self.fail_when(request):
                self.roles[self.role_of(request)] += 1
                self.requests.append(request)
                self.statuses[500] += 1
                return 500, b'{"error": {"message": "scripted outage"}}', {}
        return await super()._route(method, path, body)

    def _completion(self, role: str, request: dict) -> bytes:
        payload = super()._completion(role, request)
        content = json.loads(payload)["choices"][0]["message"]["content"]
        self.exchanges.append((role, request, content))
        return payload

    def requests_of(self, role: str) -> list[dict]:
        return [r for r in self.requests if self.role_of(r) == role]


@pytest.fixture
def fake():
    with RecordingFake(latency=0) as server:
        yield server


@pytest.fixture
def make_fake():
    """Start extra fake servers (with scripts or faults); all are stopped at the end of the test."""
    started: list[FakeOpenAI] = []

    def start(**kwargs: Any) -> RecordingFake:
        kwargs.setdefault("latency", 0)
        server = RecordingFake(**kwargs)
        server.__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


# -- isolation ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache: the default response cache of every test is in its tmp_path."""
    monkeypatch.setenv("SIMBENCH_CACHE", str(tmp_path / "default-cache" / "responses.sqlite"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# -- matrices -------------------------------------------------------------------------------------


OWN_TUTOR = Path(__file__).resolve().parent.parent / "examples" / "own_tutor"


def copy_own_tutor(tmp_path: Path, matrix_name: str, edit: Callable[[dict], None]) -> Path:
    """examples/own_tutor copied to ``tmp_path``, its matrix ``matrix_name`` changed by ``edit``;
    the path of that matrix."""
    import shutil

    folder = tmp_path / "own_tutor"
    shutil.copytree(OWN_TUTOR, folder, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    path = folder / matrix_name
    matrix = yaml.safe_load(path.read_text())
    edit(matrix)
    path.write_text(yaml.safe_dump(matrix, sort_keys=False))
    return path


def base_matrix(base_url: str, **overrides: Any) -> dict:
    """A tiny valid matrix whose every role uses the fake server at ``base_url``."""
    matrix: dict[str, Any] = {
        "name": "test-matrix",
        "models": {"fake": {"base_url": base_url, "model": FAKE_MODEL, "max_retries": 0, "timeout": 20}},
        "tutor": {
            "model": "fake",
            "baseline": "socratic",
            "max_tokens": 64,
            "variants": {
                "socratic": "You are a patient tutor teaching {{ topic.name }}. Ask guiding questions.",
                "direct": "You are a tutor for {{ topic.name }}. Explain clearly.",
            },
        },
        "student": {"model": "fake", "max_tokens": 64},
        "judges": {"model": "fake", "use": ["coherence", "correctness"], "max_tokens": 64},
        "topics": [
            {
                "name": "adding fractions",
                "opening": "Why isn't 1/2 + 1/3 equal to 2/5?",
                "reference": "Use a common denominator: 3/6 + 2/6 = 5/6.",
                "goal": "The student can add fractions with unlike denominators.",
            }
        ],
        "personas": ["impatient"],
        "repeats": 1,
        "max_turns": 2,
        "concurrency": 2,
    }
    matrix.update(overrides)
    return matrix


@pytest.fixture
def write_matrix(tmp_path):
    """write_matrix(dict_or_text, name="matrix.yaml") -> Path of the YAML file in tmp_path."""

    def write(content: Any, name: str = "matrix.yaml") -> Path:
        path = tmp_path / name
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return write


# -- running --------------------------------------------------------------------------------------


def invoke(*args: Any):
    """Run the real click CLI in-process; a crash (not a sys.exit) fails the test with its traceback."""
    result = CliRunner().invoke(simbench.cli.cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError(
            "simbench crashed:\n" + "".join(traceback.format_exception(*result.exc_info)) + "\noutput:\n" + result.output
        )
    return result


def run_cli(matrix_path: Path, out: Path, *extra: Any):
    """``simbench run MATRIX --out OUT -q [extra...]``."""
    return invoke("run", matrix_path, "--out", out, "-q", *extra)


@dataclass
class RunFiles:
    """Read access to a finished run directory (plain sqlite3 and json, independent of simbench)."""

    run_dir: Path
    _db: sqlite3.Connection = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._db = sqlite3.connect(self.run_dir / "run.sqlite")
        self._db.row_factory = sqlite3.Row

    def rows(self, sql: str, params: tuple = ()) -> list[dict]:
        return [dict(r) for r in self._db.execute(sql, params).fetchall()]

    @property
    def run_id(self) -> str:
        return self.rows("SELECT run_id FROM runs")[0]["run_id"]

    def sessions(self) -> list[dict]:
        return self.rows(
            "SELECT s.*, p.variant, p.topic, p.persona, p.repeat FROM sessions s JOIN samples p USING (sample_id)"
            " ORDER BY p.rowid, s.attempt"
        )

    def spans(self) -> list[dict]:
        out = self.rows("SELECT * FROM spans ORDER BY start_time")
        for span in out:
            span["attributes"] = json.loads(span["attributes"])
        return out

    def judgements(self) -> list[dict]:
        return self.rows("SELECT * FROM evaluations ORDER BY rowid")

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))

    def transcripts(self) -> dict[str, list[tuple[str, str]]]:
        """session_id -> [(role, content)], rebuilt from the trace store the way the judges read it."""
        from simbench.evaluators.sessions import rebuild_sessions
        from simbench.store import RunStore
        from simbench.tracing.local import spans_dataframe

        store = RunStore.open_run_dir(self.run_dir)
        try:
            rebuilt = rebuild_sessions(spans_dataframe(store))
        finally:
            store.close()
        return {t.session_id: [(m.role, m.content) for m in t.messages] for t in rebuilt}

    def close(self) -> None:
        self._db.close()


@pytest.fixture
def open_run():
    opened: list[RunFiles] = []

    def open_(run_dir: Path) -> RunFiles:
        files = RunFiles(Path(run_dir))
        opened.append(files)
        return files

    yield open_
    for files in opened:
        files.close()


def cache_entries(path: Path) -> int:
    """How many responses the cache file holds (0 when it does not exist)."""
    if not Path(path).exists():
        return 0
    db = sqlite3.connect(path)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] if "responses" in tables else 0
    finally:
        db.close()

