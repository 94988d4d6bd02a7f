"""The matrix: its YAML schema, validation (with file and line in every error), expansion into samples.

Validation runs before any model call. Library code downstream trusts a ``Matrix``.
"""

from __future__ import annotations

import functools
import hashlib
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Union

import jinja2
import jinja2.sandbox
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .evaluators.builtin import BUILTIN as _TUTOR_JUDGES
from .evaluators.builtin import SIMULATOR_JUDGES, JudgeDefinition, Prefilter
from .personas import builtin_personas
from .personas.prompt import student_system_prompt
from .records import Sample
from .scenarios import builtin_topics

IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")
# Every built-in judge a matrix may name; the default ``judges.use`` is the tutor's judges only.
_BUILTIN_JUDGES = {**_TUTOR_JUDGES, **SIMULATOR_JUDGES}
BUILTIN_JUDGES = tuple(_BUILTIN_JUDGES)
DEFAULT_JUDGES = tuple(_TUTOR_JUDGES)
DEFAULT_MODEL = "local"

# SmolLM2-135M-Instruct was trained with 8,192 tokens of context; a slot cannot hold more.
LOCAL_MAX_CONTEXT = 8192

# The largest plan a matrix may ask for (variants x topics x personas x repeats), checked before
# the plan is expanded: a typo like ``repeats: 1000000000`` is refused at once, not after minutes.
MAX_SESSIONS = 1_000_000

# Read by the phoenix trace store when set; a secret like the models' keys (see Matrix.secret_env_names).
PHOENIX_API_KEY_ENV = "PHOENIX_API_KEY"


class MatrixError(Exception):
    """An invalid matrix. ``problems`` are lines like ``file:line: field: message``."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    # strict: YAML's ``true`` is not the integer 1 and ``"3"`` is not a number; no inf or nan in a float.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Price(_Strict):
    """US dollars per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


def _http_url(value: str, example: str) -> str:
    """``value`` if it is an http(s) URL with a host; ValueError naming ``example`` otherwise."""
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"base_url {value!r} must be an http:// or https:// URL (e.g. {example})")
    return value


# OpenAI's reasoning models, also behind a prefix (openai/gpt-5.4-mini); not their chat snapshots.
REASONING_MODEL_ID = re.compile(r"^(?:[\w.-]+/)?(?:o[1-9]|gpt-5)(?![\w.-]*-chat)", re.IGNORECASE)


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
    # A reasoning model (OpenAI's gpt-5 and o-series: by default, when the model id says so) takes
    # max_completion_tokens, not max_tokens, and no temperature; it reasons before it answers, within
    # that limit, so it gets reasoning_budget tokens on top of its role's max_tokens.
    reasoning: Optional[bool] = None
    reasoning_budget: int = Field(default=4096, ge=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else _http_url(v, "https://api.openai.com/v1")

    def is_reasoning(self) -> bool:
        if self.provider == "local":
            return False
        if self.reasoning is not None:
            return self.reasoning
        return bool(REASONING_MODEL_ID.match(self.model or ""))

    @model_validator(mode="after")
    def _remote_needs_url_and_model(self) -> "ModelSpec":
        if self.provider == "openai":
            missing = [f for f in ("base_url", "model") if not getattr(self, f)]
            if missing:
                raise ValueError(f"an openai-compatible model needs {' and '.join(missing)}")
        return self


# ``{port}`` in an http tutor's base_url and start command: a free port simbench picks at run start.
PORT_PLACEHOLDER = "{port}"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class VariantSpec(_Strict):
    """One configuration of the tutor. A variant given as a plain string is ``{prompt: <string>}``."""

    prompt: Optional[str] = None
    model: Optional[str] = None
    temperature: Optional[float] = Field(default=None, ge=0)
    max_tokens: Optional[int] = Field(default=None, gt=0)
    settings: dict[str, Any] = Field(default_factory=dict)


class HttpSpec(_Strict):
    """The user's running app (``tutor: {kind: http}``)."""

    protocol: Literal["openai", "json"] = "openai"
    base_url: str
    model: Optional[str] = None
    headers: dict[str, str] = Field(default_factory=dict)
    body: Optional[str] = None
    reply: Optional[str] = None
    tool_calls: Optional[str] = None
    start: Optional[str] = None
    startup_timeout: float = Field(default=60.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        return _http_url(v, "http://127.0.0.1:8000/v1")

    @model_validator(mode="after")
    def _json_needs_body_and_reply(self) -> "HttpSpec":
        if self.protocol == "json":
            missing = [f for f in ("body", "reply") if not getattr(self, f)]
            if missing:
                raise ValueError(f"protocol json needs {' and '.join(missing)} (the request body template and "
                                 "the selector of the reply in the answer, e.g. reply: \"$.answer\")")
        for selector in (self.reply, self.tool_calls):
            if selector is not None:
                parse_selector(selector)
        return self

    def env_names(self) -> list[str]:
        """The environment variables the headers read (``${NAME}``): secrets, masked everywhere."""
        return [name for value in self.headers.values() for name in _ENV_REFERENCE.findall(value)]

    def headers_from(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The headers with each ``${NAME}`` replaced by the variable's value; KeyError naming an unset one."""
        return {name: _ENV_REFERENCE.sub(lambda m: environ[m.group(1)], value) for name, value in self.headers.items()}


class TutorSpec(_Strict):
    """The assistant under test: a prompt sent to a model (``kind: prompt``, the default), the user's
    own Python function (``callable``) or running app (``http``), in one or more variants.

    ``imported`` is what simbench records for a run that judged sessions recorded elsewhere
    (``simbench judge``): variants only name the sessions' variants, and nothing is called. A
    matrix to run cannot use it."""

    kind: Literal["prompt", "callable", "http", "imported"] = "prompt"
    model: Optional[str] = None
    callable: Optional[str] = None
    http: Optional[HttpSpec] = None
    baseline: Optional[str] = None
    variants: dict[str, Union[str, VariantSpec]] = Field(min_length=1)
    max_tokens: int = Field(default=256, gt=0)
    temperature: float = Field(default=0.7, ge=0)
    # For callable and http tutors (a prompt tutor's calls follow its model's settings):
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=2, ge=0)
    concurrency: Optional[int] = Field(default=None, gt=0)
    cache: bool = True

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if "/" in name:
                raise ValueError(f"variant name {name!r} must not contain '/'")
        return v

    @field_validator("callable")
    @classmethod
    def _module_colon_function(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", v):
            raise ValueError(f"callable {v!r} must be 'module:function' (e.g. my_tutor:reply or pkg.app:Tutor.reply)")
        return v

    @model_validator(mode="after")
    def _kind_and_baseline(self) -> "TutorSpec":
        if self.kind == "prompt" and self.model is None:
            self.model = DEFAULT_MODEL
        if self.baseline is None:
            self.baseline = next(iter(self.variants))
        elif self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not one of the variants {sorted(self.variants)}")
        return self

    def variant(self, name: str) -> VariantSpec:
        """A variant as a record (a string variant is its prompt)."""
        value = self.variants[name]
        return VariantSpec(prompt=value) if isinstance(value, str) else value

    def model_of(self, variant: str) -> Optional[str]:
        """The model a variant's tutor calls (prompt) or is handed (callable, http): its own, else the tutor's."""
        return self.variant(variant).model or self.model

    def model_names(self) -> list[str]:
        """The models the tutor's variants use, in first-use order."""
        return list(dict.fromkeys(m for m in (self.model_of(v) for v in self.variants) if m is not None))

    def max_tokens_of(self, variant: str) -> int:
        own = self.variant(variant).max_tokens
        return self.max_tokens if own is None else own

    def temperature_of(self, variant: str) -> float:
        own = self.variant(variant).temperature
        return self.temperature if own is None else own

    def call_name(self) -> str:
        """The name a callable or http tutor's calls are counted and limited under (like a model's)."""
        if self.kind == "callable":
            return f"callable:{self.callable}"
        if self.kind == "http":
            return f"http:{self.http.base_url if self.http else ''}"
        return self.model or DEFAULT_MODEL


# A selector picks a value out of a JSON answer: ``$.choices[0].message.content``, ``$.answer``,
# ``$.data.tool_calls``: dotted keys and [index] only (a JSONPath subset; no filters or wildcards).
_SELECTOR_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]|\[[\"']([^\"']+)[\"']\]")


def parse_selector(selector: str) -> list[Union[str, int]]:
    """The path of a selector; ``ValueError`` naming what is wrong."""
    if not selector.startswith("$"):
        raise ValueError(f"selector {selector!r} must start with $ (e.g. $.answer or $.choices[0].message.content)")
    path: list[Union[str, int]] = []
    position = 1
    while position < len(selector):
        match = _SELECTOR_PART.match(selector, position)
        if match is None:
            raise ValueError(f"selector {selector!r}: cannot read {selector[position:]!r} (use .key, [0] or [\"key\"])")
        key, index, quoted = match.groups()
        path.append(int(index) if index is not None else (key if key is not None else quoted))
        position = match.end()
    return path


_MISSING = object()


def select(value: Any, selector: str) -> Any:
    """The value a selector points at in parsed JSON, or ``_MISSING``."""
    for part in parse_selector(selector):
        if isinstance(part, int) and isinstance(value, list) and -len(value) <= part < len(value):
            value = value[part]
        elif isinstance(part, str) and isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return _MISSING
    return value


def is_missing(value: Any) -> bool:
    return value is _MISSING


class StudentSpec(_Strict):
    """The simulated user (never traced)."""

    model: str = DEFAULT_MODEL
    max_tokens: int = Field(default=256, gt=0)
    temperature: float = Field(default=0.8, ge=0)


# What a custom judge's prompt may use: each is a dataframe column of the judge's input, never
# pre-rendered into the template. Optional inputs missing for a session make the judge record `skipped`.
JUDGE_VARIABLES = {
    "transcript": "the whole conversation, one 'Student:' or 'Tutor:' message per block",
    "topic": "the topic's name",
    "opening": "the student's first message",
    "reference": "the topic's reference answer (optional)",
    "goal": "the topic's learning goal (optional)",
    "subject": "the topic's subject (optional)",
    "misconceptions": "the topic's misconceptions, one per line (optional)",
    "persona": "the persona's name, description and traits (optional)",
    "tool_calls": "the tutor's tool calls, one 'Turn N: name(arguments) -> result' line each, or '(no tool calls)'"
                  " (per-turn judges: that turn's only)",
    "reply": "per-turn judges only: the tutor reply being judged",
    "context": "per-turn judges only: the conversation before that reply",
}
TURN_VARIABLES = ("reply", "context")
OPTIONAL_JUDGE_INPUTS = ("reference", "goal", "subject", "misconceptions", "persona")


def _check_identifier(name: str, what: str) -> None:
    if not IDENTIFIER.match(name):
        raise ValueError(
            f"{what} {name!r} must be an identifier ([a-z][a-z0-9_]*): "
            "trace stores such as Arize AX drop evaluation names with '-' or '.'"
        )


def template_variables(template: str) -> list[str]:
    """The ``{name}`` variables of a judge prompt, as phoenix.evals' f-string formatter reads them.

    ``{{ name }}`` is refused: phoenix.evals would switch the whole prompt to mustache, so the other
    variables would silently stay unfilled.
    """
    if "{{" in template or "}}" in template:
        raise ValueError("use {transcript}-style variables; double braces ({{ ... }}) are not allowed in a judge prompt")
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise ValueError(f"template error: {exc} (a literal brace cannot appear in a judge prompt)") from None


class PrefilterSpec(_Strict):
    """``when:`` of a custom judge: the cheap first stage of multi-stage judging."""

    text: Literal["transcript", "tutor", "student"] = "transcript"
    """Which text the rule reads: the whole transcript, the tutor's messages or the student's."""
    regex: Optional[str] = Field(default=None, min_length=1)
    min_chars: Optional[int] = Field(default=None, ge=0)
    max_chars: Optional[int] = Field(default=None, ge=0)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _some_rule(self) -> "PrefilterSpec":
        if self.regex is None and self.min_chars is None and self.max_chars is None:
            raise ValueError("when: needs at least one of regex, min_chars, max_chars")
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} is above max_chars {self.max_chars}: no session could pass")
        return self

    def prefilter(self) -> Prefilter:
        return Prefilter(self.text, self.regex, self.min_chars, self.max_chars)


MAX_LABEL_LENGTH = 100


class CustomJudgeSpec(_Strict):
    """A judge written in the matrix: it runs through the same judge path as the built-ins.

    ``scope: session`` (default) reads the whole session once; ``scope: turn`` reads each tutor turn
    in its context (``{reply}``, ``{context}``), stores a verdict per turn (on the turn's span) and
    one per session: fail if any turn failed.
    """

    scope: Literal["session", "turn"] = "session"  # declared before prompt: the prompt's check reads it
    prompt: str = Field(min_length=1)
    """phoenix.evals template: ``{transcript}`` (session scope) or ``{reply}`` (turn scope), and any of
    ``JUDGE_VARIABLES``."""
    choices: dict[str, float] = Field(min_length=2)
    """Label -> score; the judge answers with exactly one label."""
    passing: Optional[list[str]] = None
    """Labels that pass; default: the labels with the best score for ``direction``."""
    direction: Literal["maximize", "minimize"] = "maximize"
    model: Optional[str] = None
    """A name from ``models``; default: ``judges.model``."""
    when: Optional[PrefilterSpec] = None
    """A cheap rule deciding which sessions this judge reads; the others record ``skipped``."""

    @field_validator("prompt")
    @classmethod
    def _known_variables(cls, v: str, info: ValidationInfo) -> str:
        used = template_variables(v)
        per_turn = info.data.get("scope") == "turn"
        allowed = [k for k in JUDGE_VARIABLES if per_turn or k not in TURN_VARIABLES]
        unknown = [name for name in used if name not in allowed]
        if unknown:
            turn_only = [u for u in unknown if u in TURN_VARIABLES]
            hint = f" ({', '.join('{' + u + '}' for u in turn_only)}: only with scope: turn)" if turn_only else ""
            raise ValueError(f"unknown variable(s) {', '.join('{' + u + '}' for u in unknown)}{hint}; "
                             f"a judge prompt can use {', '.join('{' + k + '}' for k in allowed)}")
        if per_turn and "reply" not in used:
            raise ValueError("a per-turn judge prompt must contain {reply} (the tutor turn it judges)")
        if not per_turn and "transcript" not in used:
            raise ValueError("a judge prompt must contain {transcript} (the judge reads the whole session)")
        return v

    @field_validator("choices")
    @classmethod
    def _labels(cls, v: dict[str, float]) -> dict[str, float]:
        for label in v:
            if not label.strip():
                raise ValueError("a label must not be empty")
            if len(label) > MAX_LABEL_LENGTH:
                # Arize AX refuses the whole evaluation upload when one label is longer.
                raise ValueError(f"label {label[:20]!r}... is longer than {MAX_LABEL_LENGTH} characters")
        return v

    @model_validator(mode="after")
    def _passing_labels(self) -> "CustomJudgeSpec":
        if self.passing is not None:
            unknown = [label for label in self.passing if label not in self.choices]
            if unknown:
                raise ValueError(f"passing label(s) {unknown} are not among the choices {list(self.choices)}")
            if not self.passing:
                raise ValueError("passing is empty: the judge could never pass (omit it for the best-scored labels)")
            if set(self.passing) == set(self.choices):
                raise ValueError("every label passes: the judge could never fail")
        elif len(set(self.choices.values())) == 1:
            raise ValueError("every choice has the same score: say which labels pass with passing:")
        return self

    def definition(self, name: str) -> JudgeDefinition:
        """The judge as the judge runner takes it (the same record as a built-in's)."""
        used = template_variables(self.prompt)
        return JudgeDefinition(
            name=name,
            template=self.prompt,
            choices=dict(self.choices),
            requires=tuple(v for v in OPTIONAL_JUDGE_INPUTS if v in used),
            direction=self.direction,
            passing=frozenset(self.passing) if self.passing is not None else None,
            prefilter=self.when.prefilter() if self.when is not None else None,
            per_turn=self.scope == "turn",
        )


class JudgesSpec(_Strict):
    """Session judges: built-ins and custom ones, which of them run, and the model they run on."""

    model: str = DEFAULT_MODEL
    use: list[str] = Field(default_factory=lambda: list(DEFAULT_JUDGES), min_length=1)
    """Judges that run; default: the four built-in tutor judges and every custom judge."""
    custom: dict[str, CustomJudgeSpec] = Field(default_factory=dict)
    max_tokens: int = Field(default=256, gt=0)
    temperature: float = Field(default=0.0, ge=0)

    @field_validator("use")
    @classmethod
    def _identifiers(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_identifier(name, "judge name")
        if len(set(v)) != len(v):
            raise ValueError("a judge is listed twice")
        return v

    @field_validator("custom")
    @classmethod
    def _custom_names(cls, v: dict[str, CustomJudgeSpec]) -> dict[str, CustomJudgeSpec]:
        for name in v:
            _check_identifier(name, "custom judge name")
            if name in BUILTIN_JUDGES:
                raise ValueError(f"custom judge {name!r} has the name of a built-in judge; choose another name")
        return v

    @model_validator(mode="after")
    def _default_use_includes_custom(self) -> "JudgesSpec":
        if "use" not in self.model_fields_set:
            self.use = list(DEFAULT_JUDGES) + list(self.custom)
        return self

    def definitions(self) -> list[JudgeDefinition]:
        """Every judge in ``use``, built-in or custom, in ``use`` order."""
        return [self.definition(name) for name in self.use]

    def definition(self, name: str) -> JudgeDefinition:
        return self.custom[name].definition(name) if name in self.custom else _BUILTIN_JUDGES[name]

    def model_of(self, name: str) -> str:
        """The model a judge runs on: its own ``model`` or ``judges.model``."""
        custom = self.custom.get(name)
        return (custom.model if custom is not None else None) or self.model


class Topic(_Strict):
    """What a session is about: the student's opening question and, optionally, what success is."""

    name: str = Field(min_length=1)
    opening: str = Field(min_length=1)
    reference: Optional[str] = None
    goal: Optional[str] = None
    subject: Optional[str] = None
    """arithmetic, algebra, science, programming, writing, ... (for grouping; free text)."""
    misconceptions: list[str] = Field(default_factory=list)
    """Wrong beliefs students commonly hold here; a persona with ``misconception: topic`` takes the first."""


class Persona(_Strict):
    """A simulated student. ``extends`` starts from a built-in persona and overrides its fields."""

    name: str = Field(min_length=1)
    extends: Optional[str] = None
    description: str = Field(min_length=1)
    traits: list[str] = Field(default_factory=list)
    misconception: Optional[str] = None
    """``topic``: hold the topic's first misconception; other text: hold that belief; None: none."""
    writing_style: Optional[str] = None
    """How the student writes (spelling, grammar, language), when it is part of the persona."""
    patience: Optional[int] = Field(default=None, gt=0)
    """Unhelpful tutor replies the student takes before giving up; None: no limit."""
    reacts_to_good: str = "engages with the next step"
    reacts_to_bad: str = "says it still does not make sense"
    stop_when: str = "you understand, or you give up"
    reply_length: str = "one to three sentences"


class TraceStoreSpec(_Strict):
    """Where tutor spans go and where judgements are logged back.

    ``local``: the run's SQLite file only. ``phoenix``: an Arize Phoenix server at ``endpoint``
    (spans land in ``project``). ``arize``: Arize AX, with the space id and API key read from the
    environment variables named by ``space_id_env`` and ``api_key_env`` (never from the file).
    Every kind also keeps a copy of the spans in the run's file, for the report and for ``push``.
    """

    kind: Literal["local", "phoenix", "arize"] = "local"
    endpoint: Optional[str] = None
    project: Optional[str] = None
    space_id_env: str = "ARIZE_SPACE_ID"
    api_key_env: str = "ARIZE_API_KEY"

    @model_validator(mode="after")
    def _fields_of_the_kind(self) -> "TraceStoreSpec":
        if self.kind == "local":
            extra = [f for f in ("endpoint", "project") if getattr(self, f) is not None]
            if extra:
                raise ValueError(f"{' and '.join(extra)} apply to kind phoenix or arize, not local")
            return self
        if not self.project:
            raise ValueError(f"a {self.kind} trace store needs project: (the project the spans go to)")
        if self.kind == "phoenix":
            if not self.endpoint:
                raise ValueError("a phoenix trace store needs endpoint: (e.g. http://127.0.0.1:6006)")
            if not re.match(r"^https?://[^/\s]+", self.endpoint):
                raise ValueError(f"endpoint {self.endpoint!r} must be an http:// or https:// URL")
            self.endpoint = self.endpoint.rstrip("/")
        elif self.endpoint is not None:
            raise ValueError("an arize trace store takes no endpoint: (the arize SDK knows where AX is)")
        return self

    def secret_env_names(self) -> list[str]:
        """The environment variables whose values this store's clients send as secrets."""
        return store_secret_env_names(self.space_id_env, self.api_key_env)


def store_secret_env_names(space_id_env: str, api_key_env: str) -> list[str]:
    """A trace store's secret variables (also for a store named on the command line, with no matrix)."""
    return [api_key_env, space_id_env, PHOENIX_API_KEY_ENV]


class Matrix(_Strict):
    """A validated matrix. Build it with ``load_matrix``."""

    name: str = Field(min_length=1)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    tutor: TutorSpec
    student: Optional[StudentSpec] = Field(default_factory=StudentSpec)
    """None only in the matrix of a run of imported sessions (``tutor.kind: imported``): no student was simulated."""
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
    # Where a callable tutor's module and an http tutor's start command are found (the matrix's folder).
    base_dir: Optional[str] = Field(default=None, exclude=True)

    @field_validator("gates")
    @classmethod
    def _gate_rates(cls, v: dict[str, float]) -> dict[str, float]:
        for dim, rate in v.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"gate {dim!r}: a pass rate between 0 and 1, got {rate}")
        return v

    def planned_sessions(self) -> int:
        """How many sessions the plan holds, without expanding it."""
        return len(self.tutor.variants) * len(self.topics) * len(self.personas) * self.repeats

    def secret_env_names(self) -> list[str]:
        """Every environment variable whose value is a secret this matrix's clients send: each model's
        ``api_key_env`` and the trace store's keys. Their values are masked in everything stored or
        printed (simbench/redact.py). The one list of them: a new kind of secret is added here."""
        names = [spec.api_key_env for spec in self.models.values() if spec.api_key_env]
        if self.tutor.http is not None:
            names += self.tutor.http.env_names()
        return list(dict.fromkeys(names + self.trace_store.secret_env_names()))

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
        """The (name, spec) the student or the judges use (for the tutor: ``tutor.model_of(variant)``);
        a missing ``local`` entry means the embedded default."""
        name = self.judges.model if role == "judge" else self.student.model
        return name, self.models.get(name) or ModelSpec(provider="local")

    def model_spec(self, name: str) -> ModelSpec:
        """A named model's spec; a missing ``local`` entry means the embedded default."""
        return self.models.get(name) or ModelSpec(provider="local")

    def judge_model_names(self) -> list[str]:
        """The models the judges in ``judges.use`` run on, in first-use order."""
        return list(dict.fromkeys(self.judges.model_of(name) for name in self.judges.use))

    def simulates(self) -> bool:
        """Whether this matrix's sessions are simulated (False for a run of imported sessions)."""
        return self.tutor.kind != "imported"

    def model_names_in_use(self) -> list[str]:
        """Every model a role or a judge calls, each once."""
        roles = self.tutor.model_names() + [self.model_for(r)[0] for r in ("student", "judge")] if self.simulates() \
            else [self.judges.model]
        return list(dict.fromkeys(roles + self.judge_model_names()))

    def local_model_names(self) -> set[str]:
        """Names of the models in use that are the embedded model."""
        return {name for name in self.model_names_in_use() if self.model_spec(name).provider == "local"}

    def uses_local(self) -> bool:
        return bool(self.local_model_names())

    def render_tutor_prompt(self, variant: str, topic: Topic) -> Optional[str]:
        """The variant's system prompt for this topic (None when the variant has no prompt)."""
        template = self.tutor.variant(variant).prompt
        return None if template is None else _render(template, topic)

    def local_context_needed(self) -> int:
        """Tokens one embedded-server slot needs for the longest prompt this matrix can produce."""
        return context_needed(self)


# -- the context budget of the embedded model -------------------------------------------------

# The judge template is fixed text plus the transcript and topic fields; 4 characters per token
# is typical English, 3 leaves room for code and numbers.
_CHARS_PER_TOKEN = 3
_PER_MESSAGE_OVERHEAD = 8
_JUDGE_TEMPLATE_TOKENS = 700


# What a callable tutor may add to its own model call beyond the conversation (retrieved passages,
# tool results); a guess, so the embedded model's slot is sized with room to spare.
_CALLABLE_EXTRA_TOKENS = 512


def _tokens(text: Optional[str]) -> int:
    return len(text or "") // _CHARS_PER_TOKEN + 1


def context_needed(matrix: Matrix) -> int:
    """An upper bound on the tokens of the longest request the matrix can make to one model slot.

    A transcript holds the opening, ``max_turns`` tutor replies and as many student replies, each
    at most its role's ``max_tokens``. The longest request is the judge's (template + transcript +
    topic fields + its answer) or the tutor's last turn (system prompt + history + reply).
    """
    longest = 0
    # The built-in templates fit in _JUDGE_TEMPLATE_TOKENS with phoenix's wrapping; a longer custom
    # prompt (plus the persona and misconception columns it may read) needs its own length on top.
    built_in_length = max(len(d.template) for d in _BUILTIN_JUDGES.values())
    longest_persona = max(_tokens(p.description) + sum(_tokens(t) for t in p.traits) for p in matrix.personas)
    judge_template = _JUDGE_TEMPLATE_TOKENS + longest_persona + max(
        [0] + [_tokens(d.template) - built_in_length // _CHARS_PER_TOKEN for d in matrix.judges.definitions()]
    )
    for topic in matrix.topics:
        history = (
            _tokens(topic.opening)
            + matrix.max_turns * (max(matrix.tutor.max_tokens_of(v) for v in matrix.tutor.variants)
                                  + matrix.student.max_tokens)
            + (2 * matrix.max_turns + 1) * _PER_MESSAGE_OVERHEAD
        )
        judge = (
            judge_template
            + history
            + _tokens(topic.reference)
            + _tokens(topic.goal)
            + _tokens(topic.name)
            + sum(_tokens(m) for m in topic.misconceptions)
            + matrix.judges.max_tokens
        )
        tutor_system = max(_tokens(matrix.render_tutor_prompt(v, topic)) for v in matrix.tutor.variants)
        if matrix.tutor.kind != "prompt":  # the user's agent may add retrieved notes and tool output
            tutor_system += _CALLABLE_EXTRA_TOKENS
        tutor = tutor_system + history
        student = max(_tokens(student_system_prompt(p, topic)) for p in matrix.personas) + history
        longest = max(longest, judge, tutor, student)
    return longest


def judge_prompt_tokens(matrix: Matrix, transcript: str, topic: str, reference: Optional[str], goal: Optional[str]) -> int:
    """An upper bound on the tokens of one judge request (template, conversation, fields, answer)."""
    return (_JUDGE_TEMPLATE_TOKENS + _tokens(transcript) + _tokens(topic) + _tokens(reference) + _tokens(goal)
            + matrix.judges.max_tokens)


# -- loading ----------------------------------------------------------------------------------

# The longest string or list, and the largest power, a user template may build with * or **.
MAX_TEMPLATE_PRODUCT = 1_000_000


class _UserTemplates(jinja2.sandbox.SandboxedEnvironment):
    """Every template a user writes renders in jinja2's sandbox: a matrix is input, and
    ``{{ cycler.__init__.__globals__.os.popen(...) }}`` must not run a command (it raises
    SecurityError). ``'x' * 10**10`` must not take the machine's memory while validating either."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64 and \
                isinstance(left, (int, float)) and abs(left) > 1:
            raise jinja2.exceptions.SecurityError(f"the power {left!r} ** {right!r} is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_PRODUCT:
                    raise jinja2.exceptions.SecurityError(f"repeating a value {n} times builds more than "
                                                          f"{MAX_TEMPLATE_PRODUCT:,} items")
        return super().call_binop(context, operator, left, right)


_JINJA = _UserTemplates(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)


@functools.lru_cache(maxsize=256)
def _compiled(template: str) -> jinja2.Template:
    """Compiling a template costs more than a model call's client work: compile each variant once."""
    return _JINJA.from_string(template)


def render_user_template(template: str, **context: Any) -> str:
    """Render a user's jinja2 template (a variant, a request body) in the sandbox, undefined names
    being errors. Raises ``jinja2.TemplateError`` (``SecurityError`` for what the sandbox refuses)."""
    return _compiled(template).render(**context)


def _render(template: str, topic: Topic) -> str:
    return render_user_template(template, topic=topic.model_dump())


def load_matrix(path: Union[str, Path]) -> Matrix:
    """Read, resolve and validate a matrix file. Raises ``MatrixError`` naming file, line and field."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MatrixError([f"{source}: cannot read the matrix: {exc.strerror or exc}"]) from None
    return parse_matrix(text, source, base_dir=path.parent)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last value silently, so a second ``repeats:`` would quietly win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the constructor below reports it
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first on line {first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, source: str) -> tuple[Optional[yaml.Node], Any]:
    """(the node tree, for line numbers; the data) of YAML text, parsed once. Syntax errors, duplicate
    keys and nesting too deep to parse raise ``MatrixError`` naming ``source`` and the line."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        kind = "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise MatrixError([f"{where}: {kind}: {problem}"]) from None
    except RecursionError:
        raise MatrixError([f"{source}: the YAML is nested too deeply to read"]) from None
    finally:
        loader.dispose()
    return node, data


def parse_matrix(text: str, source: str = "<matrix>", base_dir: Optional[Path] = None) -> Matrix:
    """Validate matrix YAML text; ``source`` names it in errors; ``base_dir`` is where relative
    ``file:`` paths of persona and topic files are read from (the current folder when None)."""
    node, data = read_yaml(text, source)
    if not isinstance(data, dict):
        raise MatrixError([f"{source}: the matrix must be a YAML mapping (name:, tutor:, topics:, ...)"])

    lines = _LineIndex(node)
    problems: list[str] = []
    data = dict(data)
    if "personas" in data:
        data["personas"] = _resolve_personas(data["personas"], lines, source, problems, base_dir)
    if "topics" in data:
        data["topics"] = _resolve_topics(data["topics"], lines, source, problems, base_dir)
    if problems:
        raise MatrixError(problems)

    try:
        matrix = Matrix.model_validate(data)
    except ValidationError as exc:
        raise MatrixError([_describe(err, lines, source) for err in exc.errors()]) from None

    matrix.source = source
    folder = base_dir if base_dir is not None else matrix_folder(source)
    matrix.base_dir = str(Path(folder).resolve()) if folder is not None else None
    problems = _check_references(matrix, lines, source)
    if problems:
        raise MatrixError(problems)
    matrix.fingerprint = hashlib.sha256(
        matrix.model_dump_json(exclude={"concurrency"}).encode()
    ).hexdigest()
    return matrix


def _resolve_personas(raw: Any, lines: "_LineIndex", source: str, problems: list[str], base_dir: Optional[Path]) -> Any:
    """Turn persona names into built-in persona dicts, read ``{file: PATH}`` items, apply ``extends``."""
    if not isinstance(raw, list):
        return raw
    library = builtin_personas()
    resolved: list[Any] = []
    for i, item in enumerate(raw):
        where = f"{source}:{lines.line(('personas', i))}: personas[{i}]"
        if isinstance(item, str):
            if item not in library:
                problems.append(f"{where}: unknown persona {item!r}; built-in personas: {', '.join(sorted(library))}")
                continue
            resolved.append({"name": item, **library[item]})
        elif _is_file_item(item):
            for entry in _read_library_file(item["file"], "personas", base_dir, where, problems):
                fields = _extend_persona({"name": entry.key, **entry.fields}, library, f"{entry.where}.extends", problems)
                if fields is not None and entry.validate(Persona, fields, problems):
                    resolved.append(fields)
        elif isinstance(item, dict):
            fields = _extend_persona(item, library, f"{where}.extends", problems)
            if fields is not None:
                resolved.append(fields)
        else:
            resolved.append(item)
    return resolved


def _extend_persona(item: dict, library: dict[str, dict], where: str, problems: list[str]) -> Optional[dict]:
    """``extends: NAME`` starts from a built-in persona; the item's own fields override it."""
    if item.get("extends") is None:
        return item
    base = library.get(item["extends"]) if isinstance(item["extends"], str) else None
    if base is None:
        problems.append(f"{where}: unknown persona {item['extends']!r} to extend; "
                        f"built-in personas: {', '.join(sorted(library))}")
        return None
    return {**base, **item}


def _resolve_topics(raw: Any, lines: "_LineIndex", source: str, problems: list[str], base_dir: Optional[Path]) -> Any:
    """Turn topic keys into built-in topic dicts and read ``{file: PATH}`` items."""
    if not isinstance(raw, list):
        return raw
    library = builtin_topics()
    resolved: list[Any] = []
    for i, item in enumerate(raw):
        where = f"{source}:{lines.line(('topics', i))}: topics[{i}]"
        if isinstance(item, str):
            if item not in library:
                problems.append(f"{where}: unknown topic {item!r}; built-in topics: {', '.join(sorted(library))}")
                continue
            resolved.append(dict(library[item]))
        elif _is_file_item(item):
            for entry in _read_library_file(item["file"], "topics", base_dir, where, problems):
                if entry.validate(Topic, entry.fields, problems):
                    resolved.append(entry.fields)
        else:
            resolved.append(item)
    return resolved


def _is_file_item(item: Any) -> bool:
    return isinstance(item, dict) and set(item) == {"file"}


@dataclass
class _LibraryEntry:
    """One persona or topic read from a user's library file, with where it is in that file."""

    key: str
    fields: dict
    path: Path
    lines: "_LineIndex"

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lines.line((self.key,))}: {self.key}"

    def validate(self, model: type[BaseModel], fields: dict, problems: list[str]) -> bool:
        """Validate here, so a problem names the library file and its line, not the matrix."""
        try:
            model.model_validate(fields)
        except ValidationError as exc:
            problems.extend(_describe(err, self.lines, str(self.path), prefix=(self.key,)) for err in exc.errors())
            return False
        return True


def _read_library_file(name: Any, kind: str, base_dir: Optional[Path], where: str, problems: list[str]) -> list[_LibraryEntry]:
    """Entries of a persona or topic file: a YAML mapping of key -> fields, like the built-in libraries.

    A relative path is read from the matrix's folder.
    """
    if not isinstance(name, str) or not name:
        problems.append(f"{where}.file: expected the path of a YAML file of {kind}")
        return []
    path = Path(name) if Path(name).is_absolute() or base_dir is None else base_dir / name
    try:
        node, data = read_yaml(path.read_text(encoding="utf-8"), str(path))
    except OSError as exc:
        problems.append(f"{where}.file: cannot read {path}: {exc.strerror or exc}")
        return []
    except MatrixError as exc:
        problems.extend(exc.problems)
        return []
    if not isinstance(data, dict) or not data:
        problems.append(f"{path}:1: a file of {kind} is a YAML mapping of name -> fields (see docs/personas-and-judges.md)")
        return []
    file_lines = _LineIndex(node)
    entries = []
    for key, fields in data.items():
        entry = _LibraryEntry(str(key), fields if isinstance(fields, dict) else {}, path, file_lines)
        if not isinstance(fields, dict):
            problems.append(f"{entry.where}: expected a mapping of fields")
            continue
        entries.append(entry)
    return entries


def _check_tutor(matrix: Matrix, at: Callable[[tuple, str], None], check_model: Callable[[tuple, Optional[str]], None]) -> None:
    """The tutor's kind has what it needs; every variant's model exists and its prompt renders."""
    tutor = matrix.tutor
    if tutor.kind == "imported":
        at(("tutor", "kind"), "kind imported is what simbench records for sessions judged without simulating "
           "(simbench judge); a matrix to run needs kind prompt, callable or http")
        return
    for kind in ("callable", "http"):  # each kind's own field, named like it
        value = getattr(tutor, kind)
        if tutor.kind == kind and value is None:
            at(("tutor", "kind"), f"kind {kind} needs tutor.{kind}"
               + (" ('module:function', importable from the matrix's folder)" if kind == "callable" else
                  " ({protocol: openai, base_url: ...} or {protocol: json, base_url, body, reply})"))
        elif tutor.kind != kind and value is not None:
            at(("tutor", kind), f"tutor.{kind} is for kind {kind}; this tutor is kind {tutor.kind} "
               f"(set kind: {kind})")
    for variant, spec in tutor.variants.items():
        record = tutor.variant(variant)
        loc = ("tutor", "variants", variant)
        check_model(loc + ("model",) if isinstance(spec, VariantSpec) else loc, record.model)
        if tutor.kind == "prompt":
            if record.prompt is None:
                at(loc, "a prompt tutor's variant needs a prompt (a string, or {prompt: ...})")
            if record.settings:
                at(loc + ("settings",), "settings are handed to callable and http tutors; a prompt tutor has none")
        if tutor.kind == "http" and isinstance(spec, VariantSpec) and spec.model is not None:
            # The app is started once, with tutor.model's endpoint (SIMBENCH_MODEL_*), and reaches its models itself.
            at(loc + ("model",), "an http tutor's app calls its own models; hand it a variant's model in "
               "settings (e.g. settings: {model: ...}, which protocol openai sends as the request's model)")
        if record.prompt is None:
            continue
        for topic in matrix.topics:
            problem = _template_problem(record.prompt, topic)
            if problem:
                at(loc, problem)
                break
    if tutor.kind == "callable" and tutor.callable:
        problem = callable_problem(tutor.callable, Path(matrix.base_dir) if matrix.base_dir else None)
        if problem:
            at(("tutor", "callable"), problem)
    if tutor.kind == "http" and tutor.http is not None:
        _check_http(matrix, tutor.http, at)


def _template_problem(template: str, topic: Topic) -> Optional[str]:
    try:
        _render(template, topic)
    except jinja2.UndefinedError as exc:
        return (f"{exc.message} (a variant can use topic.name, topic.opening, topic.reference, topic.goal, "
                "topic.subject, topic.misconceptions)")
    except jinja2.exceptions.SecurityError as exc:
        return f"template refused by the sandbox: {exc} (a variant may read topic fields, not Python internals)"
    except Exception as exc:  # a TemplateError, or an error the template raised (e.g. 1/0)
        return f"template error: {exc}"
    return None


def matrix_folder(source: str) -> Optional[Path]:
    """The folder of the matrix file (where a callable's module and an app's start command live)."""
    path = Path(source)
    return path.parent.resolve() if source and not source.startswith("<") else None


def load_callable(target: str, folder: Optional[Path]) -> Callable[..., Any]:
    """Import ``module:function`` (``module:Class.method`` too), with ``folder`` first on sys.path.
    Raises ``ImportError``/``AttributeError``/``TypeError`` with a message to show."""
    import importlib
    import sys

    module_name, _, attribute = target.partition(":")
    if folder is not None and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    value: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    if not callable(value):
        raise TypeError(f"{target} is a {type(value).__name__}, not a function")
    return value


def callable_problem(target: str, folder: Optional[Path]) -> Optional[str]:
    """Why ``target`` cannot be called, or None (importing it runs the module, as running it would)."""
    try:
        load_callable(target, folder)
    except Exception as exc:
        where = f" (looked in {folder} and the Python path)" if folder else ""
        return f"cannot import {target!r}: {type(exc).__name__}: {exc}{where}"
    return None


# The names an http tutor's body template may read (see docs/matrix.md).
HTTP_BODY_VARIABLES = ("messages", "last_message", "session_id", "sample_id", "settings", "variant", "prompt",
                       "turn", "topic", "persona", "model", "max_tokens", "temperature")


def http_body_context(**values: Any) -> dict[str, Any]:
    """What a body template reads; ``tojson`` is jinja2's filter for embedding values as JSON."""
    return {name: values.get(name) for name in HTTP_BODY_VARIABLES}


def _check_http(matrix: Matrix, http: HttpSpec, at: Callable[[tuple, str], None]) -> None:
    if PORT_PLACEHOLDER in http.base_url and not http.start:
        at(("tutor", "http", "base_url"), f"base_url has {PORT_PLACEHOLDER} but there is no start command to "
           "serve on that port (add http.start, or write the app's real port)")
    if http.start and PORT_PLACEHOLDER in http.start and PORT_PLACEHOLDER not in http.base_url:
        at(("tutor", "http", "start"), f"the start command has {PORT_PLACEHOLDER}; base_url must have it too")
    if http.body is None:
        return
    import json

    topic = matrix.topics[0]
    for variant in matrix.tutor.variants:
        record = matrix.tutor.variant(variant)
        example = http_body_context(
            messages=[{"role": "user", "content": topic.opening}], last_message=topic.opening,
            session_id="run/sample/1", sample_id="sample", settings=record.settings, variant=variant,
            prompt=matrix.render_tutor_prompt(variant, topic), turn=1, topic=topic.model_dump(),
            persona=matrix.personas[0].name, model=http.model, max_tokens=matrix.tutor.max_tokens_of(variant),
            temperature=matrix.tutor.temperature_of(variant))
        try:
            json.loads(render_user_template(http.body, **example))
        except jinja2.exceptions.SecurityError as exc:
            at(("tutor", "http", "body"), f"template refused by the sandbox: {exc}")
            return
        except jinja2.TemplateError as exc:
            at(("tutor", "http", "body"), f"template error: {exc} (a body can use {', '.join(HTTP_BODY_VARIABLES)}; "
               "embed values with |tojson)")
            return
        except ValueError as exc:
            at(("tutor", "http", "body"), f"the body does not render to JSON for variant {variant!r}: {exc} "
               "(embed values with |tojson, e.g. {\"question\": {{ last_message|tojson }}})")
            return


def _check_reasoning_temperatures(matrix: Matrix, at: Callable[[tuple, str], None]) -> None:
    """A temperature the matrix sets for a reasoning model would not be sent (it refuses one): say so."""
    settings: list[tuple[tuple, Optional[str]]] = [
        ((role_key, "temperature"), spec.model) for role_key, spec in (("tutor", matrix.tutor), ("student", matrix.student))
        if "temperature" in spec.model_fields_set]
    if "temperature" in matrix.judges.model_fields_set:
        settings += [(("judges", "temperature"), name) for name in matrix.judge_model_names()]
    if matrix.tutor.kind == "prompt":  # a callable or app is handed its temperature; it calls its own models
        settings += [(("tutor", "variants", name, "temperature"), matrix.tutor.model_of(name))
                     for name, spec in matrix.tutor.variants.items()
                     if isinstance(spec, VariantSpec) and spec.temperature is not None]
    for loc, name in settings:
        model = name or DEFAULT_MODEL
        if matrix.model_spec(model).is_reasoning():
            at(loc, f"model {model!r} ({matrix.model_spec(model).model}) is a reasoning model, which takes no "
               f"temperature; remove this one, or set models.{model}.reasoning: false if it is not a reasoning model")


def _check_references(matrix: Matrix, lines: "_LineIndex", source: str) -> list[str]:
    """Checks across fields: model names, unique names, templates, gates, the local context budget."""
    problems = []

    def at(loc: tuple, message: str) -> None:
        problems.append(f"{source}:{lines.line(loc)}: {_dotted(loc)}: {message}")

    def check_model(loc: tuple, name: Optional[str]) -> None:
        if name is not None and name not in matrix.models and name != DEFAULT_MODEL:
            at(loc, f"unknown model {name!r}; declare it under models: (known: {sorted(matrix.models) or 'none'})")

    for role_key, spec in (("tutor", matrix.tutor), ("student", matrix.student), ("judges", matrix.judges)):
        if spec is None:
            at((role_key,), f"{role_key}: must be a mapping (omit it for the defaults)")
            continue
        check_model((role_key, "model"), spec.model)
    for kind, items in (("topics", matrix.topics), ("personas", matrix.personas)):
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                at((kind, i, "name"), f"duplicate name {item.name!r}")
            seen.add(item.name)
    _check_tutor(matrix, at, check_model)
    known = list(BUILTIN_JUDGES) + list(matrix.judges.custom)
    for i, name in enumerate(matrix.judges.use):
        if name not in known:
            at(("judges", "use", i), f"unknown judge {name!r}; built-in judges: {', '.join(BUILTIN_JUDGES)}; "
               f"custom judges: {', '.join(matrix.judges.custom) or 'none (define them under judges.custom)'}")
    for name, custom in matrix.judges.custom.items():
        if name not in matrix.judges.use:
            at(("judges", "custom", name), f"custom judge {name!r} is defined but not in judges.use; add it there")
        check_model(("judges", "custom", name, "model"), custom.model)
    for dim in matrix.gates:
        if dim not in matrix.judges.use:
            at(("gates", dim), f"gate on {dim!r}, which is not a judge in judges.use {matrix.judges.use}")
    if problems:
        return problems
    _check_reasoning_temperatures(matrix, at)

    planned = matrix.planned_sessions()
    if planned > MAX_SESSIONS:
        at(("repeats",), f"the plan has {planned:,} sessions ({len(matrix.tutor.variants)} variant(s) x "
           f"{len(matrix.topics)} topic(s) x {len(matrix.personas)} persona(s) x {matrix.repeats} repeat(s)); "
           f"the most one run takes is {MAX_SESSIONS:,}")
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


def _describe(err: dict, lines: "_LineIndex", source: str, prefix: tuple = ()) -> str:
    loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "model-"))))
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
            found = self._child(node, part)
            if found is None:
                break
            marker, node = found
            best = marker.start_mark.line + 1
        return best

    @staticmethod
    def _child(node: Optional[yaml.Node], part: Any) -> Optional[tuple[yaml.Node, yaml.Node]]:
        """(the node whose line names ``part``, the node to descend into)."""
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    # Point at the key: that is where a user looks for the field.
                    return key, value
            return None
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            return node.value[part], node.value[part]
        return None
