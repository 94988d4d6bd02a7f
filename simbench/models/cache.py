"""The response cache: one SQLite file shared by all runs, keyed by what makes an answer the same.

Key: the logical model name (not the URL: the embedded server gets a new port every run), the
request body, the sample id (for imported sessions, the session id) and, for judges, the
judgement's sample index. Only successful responses are stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Optional


def default_cache_path() -> Path:
    """``$SIMBENCH_CACHE`` or ``~/.cache/simbench/responses.sqlite`` (XDG_CACHE_HOME honoured)."""
    if os.environ.get("SIMBENCH_CACHE"):
        return Path(os.environ["SIMBENCH_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "simbench" / "responses.sqlite"


def cache_key(model: str, body: bytes, sample_key: str, judge_sample: Optional[int]) -> str:
    """A digest of everything that makes two requests ask for the same answer."""
    h = hashlib.sha256()
    for part in (model, sample_key, "" if judge_sample is None else str(judge_sample)):
        h.update(part.encode())
        h.update(b"\0")
    h.update(_canonical(body))
    return h.hexdigest()


def _canonical(body: bytes) -> bytes:
    """The JSON body with sorted keys, so key order from the client does not split the cache."""
    try:
        return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, UnicodeDecodeError):
        return body


class CacheError(Exception):
    """A cache file that cannot be used (damaged, not a cache, unwritable): exit 2, fix the --cache path."""

    exit_code = 2


class ResponseCache:
    """Successful HTTP response bodies by cache key, in one SQLite file (WAL, safe across processes).

    Opening checks the file (``CacheError`` if it is not a usable cache), before any model call.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"{self.path}: cannot open the response cache: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " key TEXT PRIMARY KEY, model TEXT, content_type TEXT, body BLOB, created_at REAL)"
            )
            # Reads every page of the file's b-trees: a truncated or damaged file fails here, not mid-run.
            problem = self._db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(problem)
        except sqlite3.Error as exc:
            self._db.close()
            raise CacheError(f"{self.path}: damaged or not a simbench response cache ({exc}); "
                             "delete it, or pass another --cache (or --no-cache)") from None

    def get(self, key: str) -> Optional[tuple[str, bytes]]:
        """(content type, body) of a stored response, or None."""
        with self._lock:
            row = self._db.execute("SELECT content_type, body FROM responses WHERE key = ?", (key,)).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def put(self, key: str, model: str, content_type: str, body: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                (key, model, content_type, body, time.time()),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
