"""The matrix: its YAML schema, validation (with file and line in every error), expansion into samples.

Validation runs before any model call. Library code downstream trusts a ``Matrix``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import jinja2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .evaluators.builtin import BUILTIN as _BUILTIN_JUDGES
from .personas import builtin_personas
from .records import Sample
from .scenarios import builtin_topics

IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")
BUILTIN_JUDGES = tuple(_BUILTIN_JUDGES)
DEFAULT_MODEL = "local"

# SmolLM2-135M-Instruct was trained with 8,192 tokens of context; a slot cannot hold more.
LOCAL_MAX_CONTEXT = 8192


class MatrixError(Exception):
    """An invalid matrix. ``problems`` are lines like ``file:line: field: message``."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Price(_Strict):
    """US dollars per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class ModelSpec(_Strict):
    """A named model endpoint. ``provider: local`` is the embedded llama.cpp server."""

    provider: Literal["local", "openai"] = "openai"
    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: Optional[str] = None
    concurrency: Optional[int] = Field(default=None, gt=0)
    rpm: Optional[int] = Field(default=None, gt=0)
    tpm: Optional[int] = Field(default=None, gt=0)
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0)
    price: Optional[Price] = None

    @model_validator(mode="after")
    def _remote_needs_url_and_model(self) -> "ModelSpec":
        if self.provider == "openai":
            missing = [f for f in ("base_url", "model") if not getattr(self, f)]
            if missing:
                raise ValueError(f"an openai-compatible model needs {' and '.join(missing)}")
        return self


class TutorSpec(_Strict):
    """The assistant under test: one system prompt per variant (jinja2 over ``topic``)."""

    model: str = DEFAULT_MODEL
    baseline: Optional[str] = None
    variants: dict[str, str] = Field(min_length=1)
    max_tokens: int = Field(default=256, gt=0)
    temperature: float = Field(default=0.7, ge=0)

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if "/" in name:
                raise ValueError(f"variant name {name!r} must not contain '/'")
        return v

    @model_validator(mode="after")
    def _baseline_is_a_variant(self) -> "TutorSpec":
        if self.baseline is None:
            self.baseline = next(iter(self.variants))
        elif self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not one of the variants {sorted(self.variants)}")
        return self


class StudentSpec(_Strict):
    """The simulated user (never traced)."""

    model: str = DEFAULT_MODEL
    max_tokens: int = Field(default=256, gt=0)
    temperature: float = Field(default=0.8, ge=0)


class JudgesSpec(_Strict):
    """Session judges: which built-ins to use and the model they run on."""

    model: str = DEFAULT_MODEL
    use: list[str] = Field(default_factory=lambda: list(BUILTIN_JUDGES), min_length=1)
    max_tokens: int = Field(default=256, gt=0)
    temperature: float = Field(default=0.0, ge=0)

    @field_validator("use")
    @classmethod
    def _known_identifiers(cls, v: list[str]) -> list[str]:
        for name in v:
            if not IDENTIFIER.match(name):
                raise ValueError(
                    f"judge name {name!r} must be an identifier ([a-z][a-z0-9_]*): "
                    "trace stores such as Arize AX drop evaluation names with '-' or '.'"
                )
            if name not in BUILTIN_JUDGES:
                raise ValueError(f"unknown judge {name!r}; built-in judges: {', '.join(BUILTIN_JUDGES)}")
        if len(set(v)) != len(v):
            raise ValueError("a judge is listed twice")
        return v


class Topic(_Strict):
    """What a session is about: the student's opening question and, optionally, what success is."""

    name: str = Field(min_length=1)
    opening: str = Field(min_length=1)
    reference: Optional[str] = None
    goal: Optional[str] = None


class Persona(_Strict):
    """A simulated student. ``extends`` starts from a built-in persona and overrides its fields."""

    name: str = Field(min_length=1)
    extends: Optional[str] = None
    description: str = Field(min_length=1)
    traits: list[str] = Field(default_factory=list)
    reacts_to_good: str = "engages with the next step"
    reacts_to_bad: str = "says it still does not make sense"
    stop_when: str = "you understand, or you give up"
    reply_length: str = "one to three sentences"


class TraceStoreSpec(_Strict):
    """Where tutor spans go. Only ``local`` (the run's SQLite file) exists so far."""

    kind: Literal["local"] = "local"


class Matrix(_Strict):
    """A validated matrix. Build it with ``load_matrix``."""

    name: str = Field(min_length=1)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    tutor: TutorSpec
    student: StudentSpec = Field(default_factory=StudentSpec)
    judges: JudgesSpec = Field(default_factory=JudgesSpec)
    topics: list[Topic] = Field(min_length=1)
    personas: list[Persona] = Field(min_length=1)
    repeats: int = Field(default=1, gt=0)
    max_turns: int = Field(default=4, gt=0)
    concurrency: int = Field(default=8, gt=0)
    trace_store: TraceStoreSpec = Field(default_factory=TraceStoreSpec)
    gates: dict[str, float] = Field(default_factory=dict)

    # Set by load_matrix: where the matrix came from and a hash of its meaning, for resume checks.
    source: str = Field(default="<matrix>", exclude=True)
    fingerprint: str = Field(default="", exclude=True)

    @field_validator("gates")
    @classmethod
    def _gate_rates(cls, v: dict[str, float]) -> dict[str, float]:
        for dim, rate in v.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"gate {dim!r}: a pass rate between 0 and 1, got {rate}")
        return v

    def samples(self) -> list[Sample]:
        """Every planned session: variant x topic x persona x repeat, in matrix order."""
        return [
            Sample(variant, topic.name, persona.name, repeat)
            for variant in self.tutor.variants
            for topic in self.topics
            for persona in self.personas
            for repeat in range(1, self.repeats + 1)
        ]

    def topic(self, name: str) -> Topic:
        return next(t for t in self.topics if t.name == name)

    def persona(self, name: str) -> Persona:
        return next(p for p in self.personas if p.name == name)

    def model_for(self, role: str) -> tuple[str, ModelSpec]:
        """The (name, spec) a role uses; a missing ``local`` entry means the embedded default."""
        name = {"tutor": self.tutor.model, "student": self.student.model, "judge": self.judges.model}[role]
        return name, self.models.get(name) or ModelSpec(provider="local")

    def local_model_names(self) -> set[str]:
        """Names of the models the roles use that are the embedded model."""
        roles = ("tutor", "student", "judge")
        return {self.model_for(r)[0] for r in roles if self.model_for(r)[1].provider == "local"}

    def uses_local(self) -> bool:
        return bool(self.local_model_names())

    def render_tutor_prompt(self, variant: str, topic: Topic) -> str:
        return _render(self.tutor.variants[variant], topic)

    def local_context_needed(self) -> int:
        """Tokens one llama-server slot needs for the longest prompt this matrix can produce."""
        return context_needed(self)


# -- the context budget of the embedded model -------------------------------------------------

# The judge template is fixed text plus the transcript and topic fields; 4 characters per token
# is typical English, 3 leaves room for code and numbers.
_CHARS_PER_TOKEN = 3
_PER_MESSAGE_OVERHEAD = 8
_JUDGE_TEMPLATE_TOKENS = 700
_STUDENT_PROMPT_TOKENS = 400


def _tokens(text: Optional[str]) -> int:
    return len(text or "") // _CHARS_PER_TOKEN + 1


def context_needed(matrix: Matrix) -> int:
    """An upper bound on the tokens of the longest request the matrix can make to one model slot.

    A transcript holds the opening, ``max_turns`` tutor replies and as many student replies, each
    at most its role's ``max_tokens``. The longest request is the judge's (template + transcript +
    topic fields + its answer) or the tutor's last turn (system prompt + history + reply).
    """
    longest = 0
    for topic in matrix.topics:
        history = (
            _tokens(topic.opening)
            + matrix.max_turns * (matrix.tutor.max_tokens + matrix.student.max_tokens)
            + (2 * matrix.max_turns + 1) * _PER_MESSAGE_OVERHEAD
        )
        judge = (
            _JUDGE_TEMPLATE_TOKENS
            + history
            + _tokens(topic.reference)
            + _tokens(topic.goal)
            + _tokens(topic.name)
            + matrix.judges.max_tokens
        )
        tutor_system = max(_tokens(matrix.render_tutor_prompt(v, topic)) for v in matrix.tutor.variants)
        tutor = tutor_system + history
        student = _STUDENT_PROMPT_TOKENS + history
        longest = max(longest, judge, tutor, student)
    return longest


# -- loading ----------------------------------------------------------------------------------

_JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)


@functools.lru_cache(maxsize=256)
def _compiled(template: str) -> jinja2.Template:
    """Compiling a template costs more than a model call's client work: compile each variant once."""
    return _JINJA.from_string(template)


def _render(template: str, topic: Topic) -> str:
    return _compiled(template).render(topic=topic.model_dump())


def load_matrix(path: Union[str, Path]) -> Matrix:
    """Read, resolve and validate a matrix file. Raises ``MatrixError`` naming file, line and field."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MatrixError([f"{source}: cannot read the matrix: {exc.strerror or exc}"]) from None
    return parse_matrix(text, source)


def parse_matrix(text: str, source: str = "<matrix>") -> Matrix:
    """Validate matrix YAML text; ``source`` names it in errors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise MatrixError([f"{where}: YAML syntax error: {problem}"]) from None
    if not isinstance(data, dict):
        raise MatrixError([f"{source}: the matrix must be a YAML mapping (name:, tutor:, topics:, ...)"])

    lines = _LineIndex(node)
    problems: list[str] = []
    data = dict(data)
    if "personas" in data:
        data["personas"] = _resolve_personas(data["personas"], lines, source, problems)
    if "topics" in data:
        data["topics"] = _resolve_topics(data["topics"], lines, source, problems)
    if problems:
        raise MatrixError(problems)

    try:
        matrix = Matrix.model_validate(data)
    except ValidationError as exc:
        raise MatrixError([_describe(err, lines, source) for err in exc.errors()]) from None

    problems = _check_references(matrix, lines, source)
    if problems:
        raise MatrixError(problems)
    matrix.source = source
    matrix.fingerprint = hashlib.sha256(
        matrix.model_dump_json(exclude={"concurrency"}).encode()
    ).hexdigest()
    return matrix


def _resolve_personas(raw: Any, lines: "_LineIndex", source: str, problems: list[str]) -> Any:
    """Turn persona names into built-in persona dicts and apply ``extends``."""
    if not isinstance(raw, list):
        return raw
    library = builtin_personas()
    resolved = []
    for i, item in enumerate(raw):
        where = f"{source}:{lines.line(('personas', i))}: personas[{i}]"
        if isinstance(item, str):
            if item not in library:
                problems.append(f"{where}: unknown persona {item!r}; built-in personas: {', '.join(sorted(library))}")
                continue
            resolved.append({"name": item, **library[item]})
        elif isinstance(item, dict) and item.get("extends") is not None:
            base = library.get(item["extends"])
            if base is None:
                problems.append(
                    f"{where}.extends: unknown persona {item['extends']!r}; built-in personas: {', '.join(sorted(library))}"
                )
                continue
            resolved.append({**base, **item})
        else:
            resolved.append(item)
    return resolved


def _resolve_topics(raw: Any, lines: "_LineIndex", source: str, problems: list[str]) -> Any:
    """Turn topic keys into built-in topic dicts."""
    if not isinstance(raw, list):
        return raw
    library = builtin_topics()
    resolved = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            if item not in library:
                problems.append(
                    f"{source}:{lines.line(('topics', i))}: topics[{i}]: unknown topic {item!r}; "
                    f"built-in topics: {', '.join(sorted(library))}"
                )
                continue
            resolved.append(dict(library[item]))
        else:
            resolved.append(item)
    return resolved


def _check_references(matrix: Matrix, lines: "_LineIndex", source: str) -> list[str]:
    """Checks across fields: model names, unique names, templates, gates, the local context budget."""
    problems = []

    def at(loc: tuple, message: str) -> None:
        problems.append(f"{source}:{lines.line(loc)}: {_dotted(loc)}: {message}")

    for role_key, spec in (("tutor", matrix.tutor), ("student", matrix.student), ("judges", matrix.judges)):
        if spec.model not in matrix.models and spec.model != DEFAULT_MODEL:
            at((role_key, "model"), f"unknown model {spec.model!r}; declare it under models: (known: {sorted(matrix.models) or 'none'})")
    for kind, items in (("topics", matrix.topics), ("personas", matrix.personas)):
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                at((kind, i, "name"), f"duplicate name {item.name!r}")
            seen.add(item.name)
    for variant, template in matrix.tutor.variants.items():
        for topic in matrix.topics:
            try:
                _render(template, topic)
            except jinja2.UndefinedError as exc:
                at(("tutor", "variants", variant), f"{exc.message} (a variant can use topic.name, topic.opening, topic.reference, topic.goal)")
                break
            except jinja2.TemplateError as exc:
                at(("tutor", "variants", variant), f"template error: {exc}")
                break
    for dim in matrix.gates:
        if dim not in matrix.judges.use:
            at(("gates", dim), f"gate on {dim!r}, which is not a judge in judges.use {matrix.judges.use}")
    if problems:
        return problems

    if len(matrix.local_model_names()) > 1:
        at(("models",), f"several models use provider local ({sorted(matrix.local_model_names())}); "
           "there is one embedded model: declare it once and name it for every role that uses it")
    if matrix.uses_local():
        needed = matrix.local_context_needed()
        if needed > LOCAL_MAX_CONTEXT:
            at(
                ("max_turns",),
                f"the embedded model cannot fit this matrix: its longest prompt needs about {needed} tokens "
                f"(max_turns {matrix.max_turns} x (tutor.max_tokens {matrix.tutor.max_tokens} + "
                f"student.max_tokens {matrix.student.max_tokens}) + prompts) but the model holds {LOCAL_MAX_CONTEXT}; "
                "lower max_turns or max_tokens, or use a remote model",
            )
    return problems


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: dict, lines: "_LineIndex", source: str) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "model-"))))
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown field (check its spelling against docs/matrix.md)"
    elif err["type"] == "missing":
        message = "required field is missing"
    field = _dotted(loc) or "matrix"
    return f"{source}:{lines.line(loc)}: {field}: {message}"


class _LineIndex:
    """Maps a field path to the 1-based line of the nearest YAML node that exists."""

    def __init__(self, root: Optional[yaml.Node]):
        self.root = root

    def line(self, loc: tuple) -> int:
        node = self.root
        best = node.start_mark.line + 1 if node is not None else 1
        for part in loc:
            child = self._child(node, part)
            if child is None:
                break
            node = child
            best = node.start_mark.line + 1
        return best

    @staticmethod
    def _child(node: Optional[yaml.Node], part: Any) -> Optional[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    # Point at the key: that is where a user looks for the field.
                    return value if isinstance(value, (yaml.MappingNode, yaml.SequenceNode)) else key
            return None
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            return node.value[part]
        return None
