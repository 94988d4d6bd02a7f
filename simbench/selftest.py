"""``simbench selftest``: can this judge model do the job? Five hand-written sessions tell in a minute.

Each built-in case (``evaluators/data/selftest.jsonl``, in the transcripts format) is built so that
every turn looks fine while one session property fails: a clean session, a tutor that contradicts
itself, a session that drifts onto tangents and misses its goal, a student who grows impatient, a
tutor that confirms a wrong answer. The cases' ``labels`` say what each judge must answer on its
target dimension (the clean case: every dimension); nothing else is checked (a contradiction may
also read as incorrect). The judging is ``simbench judge --transcripts`` on that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

from .evaluators.builtin import BUILTIN
from .evaluators.transcripts import load_transcripts
from .matrix import DEFAULT_MODEL, JudgesSpec, Matrix
from .offline import judge_transcripts
from .pipeline import RunOutcome
from .reports.calibration import label_pairs
from .store import RunStore

EMBEDDED_WARNING = (
    "The embedded SmolLM2-135M model is expected to fail this self-test: it is far too small to judge "
    "conversations, so its misses say nothing about simbench or about your judge. Run "
    "`simbench selftest --matrix M --model NAME` with the model you mean to judge with."
)


class SelftestError(Exception):
    """Invalid selftest options (exit 2)."""


@dataclass
class SelftestCheck:
    """One case's target dimension: what the judge had to answer and what it did."""

    case: str
    description: str
    dimension: str
    expected: str
    actual: str  # the label, or the status (error, skipped, missing) when the judge gave none
    explanation: Optional[str]

    @property
    def hit(self) -> bool:
        return self.actual == self.expected


@dataclass
class SelftestResult:
    checks: list[SelftestCheck]
    outcome: RunOutcome
    judge_model: str
    embedded: bool

    @property
    def missed(self) -> list[SelftestCheck]:
        return [c for c in self.checks if not c.hit]


def selftest_cases() -> resources.abc.Traversable:
    """The built-in cases, a transcripts file inside the package."""
    return resources.files("simbench.evaluators").joinpath("data", "selftest.jsonl")


def selftest_judges(matrix: Optional[Matrix], model: Optional[str]) -> JudgesSpec:
    """The judges to run: ``matrix``'s judges settings, every built-in judge, on ``model`` (one of
    ``matrix``'s models, or the embedded one)."""
    known = set(matrix.models) if matrix else set()
    name = model or (matrix.judges.model if matrix else DEFAULT_MODEL)
    if name not in known and name != DEFAULT_MODEL:
        hint = f"models in the matrix: {', '.join(sorted(known))}" if known else "pass --matrix M that declares it under models:"
        raise SelftestError(f"--model {name}: no such model ({hint}; {DEFAULT_MODEL!r} is the embedded model)")
    base = matrix.judges if matrix else JudgesSpec()
    return base.model_copy(update={"model": name, "use": list(BUILTIN)})


def run_selftest(matrix: Optional[Matrix] = None, model: Optional[str] = None, run_dir: Optional[Path] = None, *,
                 cache_path: Optional[Path] = None, progress: bool = True) -> SelftestResult:
    """Judge the built-in cases and compare each case's target dimensions with what it expects."""
    judges = selftest_judges(matrix, model)
    with resources.as_file(selftest_cases()) as path:
        sessions = load_transcripts(path)
        outcome = judge_transcripts(path, matrix, run_dir, judges=judges, cache_path=cache_path, progress=progress,
                                    sessions=sessions)
    described = {s.source_id: str(s.extra.get("case", "")) for s in sessions}
    store = RunStore.open_run_dir(outcome.run_dir)
    try:
        pairs = label_pairs(store, {})
    finally:
        store.close()
    checks = [SelftestCheck(p.source_id, described.get(p.source_id, ""), p.dimension, p.expected,
                            p.judged if p.status == "ok" else p.status, p.explanation) for p in pairs]
    on_embedded = matrix.model_spec(judges.model).provider == "local" if matrix else True  # no matrix: the embedded model
    return SelftestResult(checks, outcome, judges.model, on_embedded)
