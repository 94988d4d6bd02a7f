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


class ResponseCache:
    """Successful HTTP response bodies by cache key, in one SQLite file (WAL, safe across processes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            " key TEXT PRIMARY KEY, model TEXT, content_type TEXT, body BLOB, created_at REAL)"
        )

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
