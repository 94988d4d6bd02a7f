"""A small tutor application of our own: course notes, a calculator and two model calls per turn.

The same logic serves two ways of plugging it into simbench:

- ``tutor: {kind: callable, callable: "tutor:reply"}`` calls :func:`reply` in simbench's process
  (a sync function: simbench runs it in a worker thread; its OpenAI calls are traced under the turn);
- ``tutor: {kind: http}`` talks to ``server.py``, which wraps :class:`TutorApp` in an
  OpenAI-compatible HTTP endpoint.

One turn:

1. model call 1 (*focus*): "in one short line, what does the student need help with?";
2. ``search_notes``: keyword overlap between that line plus the student's message and the paragraphs
   of ``notes.md`` (``settings.top_k`` of them; 0 turns retrieval off);
3. ``calculator``: if the student's last message holds an arithmetic expression (``1/2 + 1/3``,
   ``3/4 divided by 1/2``) and ``settings.calculator`` is on, evaluate it exactly with fractions
   (an ``ast`` walk over numbers and + - * / **, never ``eval``);
4. model call 2 (*answer*): the tutor's system prompt with the focus, the notes and the calculator's
   result, then the conversation.

It returns a dict in the shape of ``simbench.agent.TutorReply`` (text, tool_calls, metadata, usage),
so this file needs nothing from simbench.
"""

from __future__ import annotations

import ast
import operator
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

import openai

NOTES_PATH = Path(__file__).with_name("notes.md")
DEFAULT_MAX_TOKENS = 96
FOCUS_MAX_TOKENS = 24
DEFAULT_SETTINGS = {"top_k": 2, "calculator": True}

DEFAULT_PROMPT = (
    "You are a patient tutor for fractions. Answer the student's last message in two or three short "
    "sentences. Use the course notes and the calculator result below when they help; do not just give "
    "the final answer away, end with one short question that checks understanding."
)
FOCUS_PROMPT = (
    "You help a tutor look things up. In one short line, say which fraction skill the student's message "
    "is about (for example: adding fractions with a common denominator). Write only that line."
)


# -- course notes and retrieval -------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    """One retrievable paragraph of the course notes."""

    id: str
    title: str
    text: str


def load_notes(path: Path = NOTES_PATH) -> list[Note]:
    """The ``## id: title`` sections of a markdown file, each followed by one paragraph."""
    notes: list[Note] = []
    for block in re.split(r"^## ", path.read_text(encoding="utf-8"), flags=re.M)[1:]:
        heading, _, body = block.partition("\n")
        note_id, _, title = heading.partition(":")
        notes.append(Note(note_id.strip(), title.strip(), " ".join(body.split())))
    return notes


NOTES = load_notes()

_STOPWORDS = set(
    "a an and are as at be by can do does for from get got how i if in is isn it its me my of on or so "
    "that the their them then there this to we what when why with you your not no yes".split()
)


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "e"):
        if len(word) > 4 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def terms(text: str) -> set[str]:
    """Lower-case word stems of ``text`` without stop words (numbers are kept: ``1/2`` gives 1 and 2)."""
    words = re.findall(r"[a-z]+|\d+", text.lower())
    return {_stem(w) for w in words if w not in _STOPWORDS}


def retrieve(query: str, top_k: int, notes: Optional[list[Note]] = None) -> list[Note]:
    """The ``top_k`` notes sharing the most terms with ``query`` (title terms count twice); notes with
    nothing in common are never returned. Ties keep the notes' order."""
    if top_k <= 0:
        return []
    wanted = terms(query)
    scored = []
    for index, note in enumerate(NOTES if notes is None else notes):
        score = 2 * len(wanted & terms(note.title)) + len(wanted & terms(note.text))
        if score > 0:
            scored.append((-score, index, note))
    return [note for _, _, note in sorted(scored)[:top_k]]


# -- the calculator ----------------------------------------------------------------------------------


class CalculatorError(ValueError):
    """An expression the calculator will not evaluate (not plain arithmetic, or too big)."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64


def calculate(expression: str) -> Fraction:
    """Evaluate arithmetic on integers, decimals and fractions exactly: ``calculate("1/2 + 1/3") == Fraction(5, 6)``.

    Only numbers, parentheses, + - * / and ** (exponent at most 64 in size) are allowed; anything else
    (names, calls, attributes, strings) raises :class:`CalculatorError`. Decimals are exact
    (``0.1`` is 1/10).
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from exc
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))  # via str: 0.1 is 1/10, not the float's binary value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise CalculatorError("division by zero")
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                raise CalculatorError(f"exponents must be whole numbers up to {MAX_EXPONENT}")
            if left == 0 and right < 0:
                raise CalculatorError("division by zero")
            return left ** int(right)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise CalculatorError(f"not allowed in a calculation: {ast.dump(node)[:60]}")


_WORDS = [
    (r"\bdivided\s+by\b", "/"), (r"\bover\b", "/"), (r"\b(?:times|multiplied\s+by)\b", "*"),
    (r"\bplus\b", "+"), (r"\bminus\b", "-"), ("÷", "/"), ("[×·]", "*"), ("[−–]", "-"),
    (r"(?<=\d)\s*x\s*(?=\d)", " * "), (r"\^", "**"),
]
_NUMBER = r"\d+(?:\.\d+)?(?:/\d+)?"
_EXPRESSION = re.compile(rf"\(?\s*{_NUMBER}\s*\)?(?:\s*(?:\*\*|[-+*/])\s*\(?\s*{_NUMBER}\s*\)?)+")


def find_expression(text: str) -> Optional[str]:
    """The longest arithmetic expression in a message, ready for :func:`calculate`, or None.

    Words become operators ("3/4 divided by 1/2" is ``(3/4) / (1/2)``), and a fraction written without
    spaces (``3/4``) is one number, so it is bracketed. A lone number or fraction is not an expression.
    """
    normal = text.lower()
    for pattern, replacement in _WORDS:
        normal = re.sub(pattern, replacement, normal)
    candidates = sorted((m.group().strip() for m in _EXPRESSION.finditer(normal)), key=len, reverse=True)
    for candidate in candidates:
        expression = re.sub(r"(?<![\d.])(\d+(?:\.\d+)?/\d+)(?![\d.])", r"(\1)", candidate)
        if not re.search(r"\*\*|[-+*/]", re.sub(r"\(\d+(?:\.\d+)?/\d+\)", "1", expression)):
            continue  # one fraction on its own ("I got 3/8") is a number, not a calculation
        try:
            calculate(expression)
        except CalculatorError as exc:
            if "division by zero" in str(exc) or "exponents" in str(exc):
                return expression  # a real expression; the calculator's answer is the error
            continue
        return expression
    return None


def format_number(value: Fraction) -> str:
    """``5/6``, ``3``, or ``-7/2``: the exact value as a student writes it."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


# -- one tutor turn ----------------------------------------------------------------------------------

ToolSpan = Callable[[str, dict], ContextManager[Callable[[Any], None]]]
"""``tool_span(name, arguments)``: a context manager around one tool's work, yielding a function
that records its result (server.py makes it an OpenInference TOOL span)."""


@contextmanager
def no_span(name: str, arguments: dict) -> Iterator[Callable[[Any], None]]:
    yield lambda result: None


def read_settings(settings: Optional[dict]) -> dict:
    """The variant's settings over the defaults; a wrong type raises ValueError naming the field."""
    merged = {**DEFAULT_SETTINGS, **(settings or {})}
    top_k, calculator = merged["top_k"], merged["calculator"]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"own tutor: settings.top_k must be a whole number >= 0, got {top_k!r}")
    if not isinstance(calculator, bool):
        raise ValueError(f"own tutor: settings.calculator must be true or false, got {calculator!r}")
    return merged


@dataclass
class TutorApp:
    """The tutor: an OpenAI-compatible ``client`` and ``model`` for its two calls per turn."""

    client: openai.OpenAI
    model: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: Optional[float] = None
    notes: list[Note] = field(default_factory=lambda: NOTES)
    tool_span: ToolSpan = no_span

    def turn(self, messages: list[dict], settings: Optional[dict] = None, prompt: Optional[str] = None) -> dict:
        """One reply to ``messages`` (OpenAI-style, user = student); a dict shaped like TutorReply."""
        config = read_settings(settings)
        conversation = [{"role": m["role"], "content": str(m.get("content") or "")}
                        for m in messages if m.get("role") in ("user", "assistant")]
        if not conversation or conversation[-1]["role"] != "user":
            raise ValueError("own tutor: the last message must be the student's (role user)")
        last = conversation[-1]["content"]
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        tool_calls: list[dict] = []

        focus = self._complete([{"role": "system", "content": FOCUS_PROMPT}, {"role": "user", "content": last}],
                               FOCUS_MAX_TOKENS, 0.0, usage).strip().splitlines()
        focus_line = focus[0].strip() if focus else ""

        found: list[Note] = []
        if config["top_k"] > 0:
            arguments = {"query": f"{focus_line} {last}".strip(), "top_k": config["top_k"]}
            with self.tool_span("search_notes", arguments) as record:
                found = retrieve(arguments["query"], config["top_k"], self.notes)
                result = [n.id for n in found]
                record(result)
            tool_calls.append({"name": "search_notes", "arguments": arguments, "result": result})

        calculation = None
        expression = find_expression(last) if config["calculator"] else None
        if expression is not None:
            with self.tool_span("calculator", {"expression": expression}) as record:
                try:
                    calculation = format_number(calculate(expression))
                except CalculatorError as exc:
                    calculation = f"error: {exc}"
                record(calculation)
            tool_calls.append({"name": "calculator", "arguments": {"expression": expression}, "result": calculation})

        system = [prompt or DEFAULT_PROMPT]
        if focus_line:
            system.append(f"The student needs help with: {focus_line}")
        if found:
            system.append("Course notes:\n" + "\n".join(f"- {n.title}: {n.text}" for n in found))
        if calculation is not None:
            system.append(f"Calculator: {expression} = {calculation}")
        text = self._complete([{"role": "system", "content": "\n\n".join(system)}, *conversation],
                              self.max_tokens, self.temperature, usage)
        return {
            "text": text.strip(),
            "tool_calls": tool_calls,
            "metadata": {"focus": focus_line, "notes": [n.id for n in found], "model_calls": 2},
            "usage": usage,
        }

    def _complete(self, messages: list[dict], max_tokens: int, temperature: Optional[float], usage: dict) -> str:
        extra = {} if temperature is None else {"temperature": temperature}
        response = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                       **extra)
        if response.usage is not None:
            usage["prompt_tokens"] += response.usage.prompt_tokens or 0
            usage["completion_tokens"] += response.usage.completion_tokens or 0
        return response.choices[0].message.content or ""


# -- the callable simbench calls ---------------------------------------------------------------------

_clients: dict[tuple[str, str], openai.OpenAI] = {}
_clients_lock = threading.Lock()


def client_for(base_url: str, api_key: str) -> openai.OpenAI:
    """One client per endpoint for the whole process (a client per turn would redo its connection pool).

    ``max_retries=0``: simbench retries the whole turn (``tutor.max_retries``), so the client does not
    retry underneath it as well.
    """
    with _clients_lock:
        client = _clients.get((base_url, api_key))
        if client is None:
            client = _clients[(base_url, api_key)] = openai.OpenAI(base_url=base_url, api_key=api_key or "none",
                                                                   max_retries=0, timeout=60)
        return client


def reply(messages: list[dict], context: Any) -> dict:
    """simbench's ``tutor: {kind: callable, callable: "tutor:reply"}``: one tutor turn.

    ``context`` is a ``simbench.agent.TurnContext``: its ``model`` is the endpoint to call, its
    ``settings`` the variant's (``top_k``, ``calculator``), its ``prompt`` an optional system prompt.
    """
    if context.model is None:
        raise ValueError("own tutor: the matrix's tutor needs `model:` (the model this tutor calls)")
    app = TutorApp(client=client_for(context.model.base_url, context.model.api_key), model=context.model.model,
                   max_tokens=context.max_tokens or DEFAULT_MAX_TOKENS, temperature=context.temperature)
    return app.turn(messages, context.settings, prompt=context.prompt)
