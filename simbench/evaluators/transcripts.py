"""The transcripts file (docs/transcripts.md): JSONL, one session per line, parsed into ``ImportedSession``s.

Parsing collects every problem, each naming the file, the line and the field; nothing is skipped
silently (blank lines carry no session and are the only lines passed over). ``offline.py`` judges
the sessions, as it judges sessions rebuilt from a trace store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..records import ImportedSession, Message

# Roles as an OpenAI-style export writes them, or as simbench names them.
STUDENT_ROLES = ("user", "student")
TUTOR_ROLES = ("assistant", "tutor")
IMPORTED_VARIANT = "imported"
UNNAMED = "(none)"
MAX_PROBLEMS = 50


class TranscriptError(Exception):
    """An invalid transcripts file. ``problems`` are lines like ``file:line: field: message``."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _MessageLine(_Strict):
    role: Literal["user", "assistant", "student", "tutor", "system"]
    content: str


class _Metadata(BaseModel):
    # Other keys are the user's own metadata: kept with the session, not checked.
    model_config = ConfigDict(extra="allow")
    topic: Optional[str] = Field(default=None, min_length=1)
    persona: Optional[str] = Field(default=None, min_length=1)
    variant: Optional[str] = Field(default=None, min_length=1, pattern=r"^[^/]+$")
    reference: Optional[str] = None
    goal: Optional[str] = None


class _SessionLine(_Strict):
    session_id: str = Field(min_length=1)
    messages: list[_MessageLine] = Field(min_length=1)
    metadata: _Metadata = Field(default_factory=_Metadata)
    labels: dict[str, str] = Field(default_factory=dict)


def load_transcripts(path: Union[str, Path]) -> list[ImportedSession]:
    """Read and validate a transcripts JSONL file. Raises ``TranscriptError`` naming file, line and field."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TranscriptError([f"{source}: cannot read the transcripts: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise TranscriptError([f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    return parse_transcripts(text.splitlines(), source)


def parse_transcripts(lines: Iterable[str], source: str = "<transcripts>") -> list[ImportedSession]:
    """Validate JSONL lines; every problem names ``source``, the 1-based line and the field."""
    sessions: list[ImportedSession] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            session = _parse_line(text, number, source)
        except TranscriptError as exc:
            problems.extend(exc.problems)
        else:
            if session.source_id in first_line:
                problems.append(f"{source}:{number}: session_id: {session.source_id!r} is already used on line "
                                f"{first_line[session.source_id]}")
            else:
                first_line[session.source_id] = number
                sessions.append(session)
        if len(problems) >= MAX_PROBLEMS:
            problems.append(f"{source}: stopped after {MAX_PROBLEMS} problems")
            break
    if not problems and not sessions:
        problems.append(f"{source}: no sessions (one JSON object per line; see docs/transcripts.md)")
    if problems:
        raise TranscriptError(problems)
    return sessions


class _DuplicateKey(Exception):
    """A key given twice in one JSON object (``json`` would keep the last one silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_line(text: str, number: int, source: str) -> ImportedSession:
    where = f"{source}:{number}"
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise TranscriptError([f"{where}: not valid JSON: {exc.msg} (column {exc.colno})"]) from None
    except _DuplicateKey as exc:
        raise TranscriptError([f"{where}: duplicate key {exc.args[0]!r} in one JSON object"]) from None
    except RecursionError:
        raise TranscriptError([f"{where}: the JSON is nested too deeply to read"]) from None
    if not isinstance(data, dict):
        raise TranscriptError([f"{where}: a session must be a JSON object with session_id and messages"])
    try:
        line = _SessionLine.model_validate(data)
    except ValidationError as exc:
        raise TranscriptError([f"{where}: {_field(err['loc'])}: {_message(err)}" for err in exc.errors()]) from None
    messages, system = _conversation(line.messages)
    problems = []
    if not any(m.role == "tutor" for m in messages):
        problems.append(f"{where}: messages: no assistant message, so there is nothing to judge")
    for dim, label in line.labels.items():
        if not label.strip():
            problems.append(f"{where}: labels.{dim}: empty label")
    if problems:
        raise TranscriptError(problems)
    meta = line.metadata
    return ImportedSession(
        line=number,
        source_id=line.session_id,
        messages=messages,
        topic=meta.topic or UNNAMED,
        persona=meta.persona or UNNAMED,
        variant=meta.variant or IMPORTED_VARIANT,
        reference=meta.reference or None,
        goal=meta.goal or None,
        labels=dict(line.labels),
        extra=dict(meta.model_extra or {}),
        system_messages=system,
    )


def _conversation(raw: list[_MessageLine]) -> tuple[list[Message], int]:
    """Student/tutor messages, consecutive ones of one role joined (the judges read turns); system dropped."""
    messages: list[Message] = []
    system = 0
    for m in raw:
        if m.role == "system":
            system += 1
            continue
        role = "student" if m.role in STUDENT_ROLES else "tutor"
        if messages and messages[-1].role == role:
            messages[-1] = Message(role, messages[-1].content + "\n\n" + m.content)
        else:
            messages.append(Message(role, m.content))
    return messages, system


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "session"


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field (fields: session_id, messages, metadata, labels; see docs/transcripts.md)"
    if err["type"] == "missing":
        return "required field is missing"
    return err["msg"]
