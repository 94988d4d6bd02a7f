"""What every sample came to, per dimension: the one table the summary, comparisons and JUnit read.

An outcome is ``pass`` or ``fail`` (a judge's verdict), ``error`` or ``skipped`` (the judge gave no
verdict), ``errored`` (the session itself failed, so nothing was judged), ``not_run`` or ``missing``
(no judgement stored), or ``simulator_error`` (a simulator judge flagged the *student*, so the
session says nothing about the tutor). Only ``pass`` and ``fail`` enter a rate or a comparison;
everything else is counted apart. Each sample counts once, by its latest attempt.

A session asked ``--judge-samples N`` times per judge has one *verdict* per dimension: the majority
label of its samples that gave one (a tie goes to the lower-scored label, the conservative reading);
it is *unstable* when those samples disagree. Only when no sample gave a label is the verdict the
first sample's ``error`` or ``skipped``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..evaluators.builtin import SIMULATOR_JUDGES
from ..records import Judgement, Sample
from ..store import RunStore
from .stats import PairedComparison, apply_holm, compare_paired

Outcome = Literal["pass", "fail", "error", "skipped", "errored", "not_run", "missing", "simulator_error"]


@dataclass
class SampleOutcome:
    """One sample's latest attempt and its outcome on each dimension."""

    sample: Sample
    session_id: Optional[str]
    status: str  # completed, errored, running, or not_run when no attempt exists
    turns: int = 0
    results: dict[str, Outcome] = field(default_factory=dict)

    def outcome(self, dimension: str) -> Outcome:
        if self.status == "errored":
            return "errored"
        if self.status != "completed":
            return "not_run"
        if dimension not in SIMULATOR_JUDGES and self.simulator_error:
            return "simulator_error"
        return self.results.get(dimension, "missing")

    @property
    def simulator_error(self) -> bool:
        """A simulator judge failed this session's student: no tutor judgement of it counts."""
        return any(self.results.get(name) == "fail" for name in SIMULATOR_JUDGES)

    def passed(self, dimension: str) -> Optional[bool]:
        """True or False for a verdict; None for anything that must drop out of a rate or a pair."""
        o = self.outcome(dimension)
        return True if o == "pass" else False if o == "fail" else None


@dataclass
class Verdict(Judgement):
    """A session's verdict on one dimension: its judgement samples' majority (the fields of the sample
    it comes from), with the votes of every sample that gave a label."""

    votes: dict[str, int] = field(default_factory=dict)
    samples: int = 1  # judgements asked: ok, error or skipped

    @property
    def unstable(self) -> bool:
        """The samples gave different labels."""
        return len(self.votes) > 1


def verdict_of(judgements: list[Judgement]) -> Verdict:
    """The verdict of one session and judge from its samples (see the module's docstring)."""
    ordered = sorted(judgements, key=lambda j: j.judge_sample)
    ok = [j for j in ordered if j.status == "ok" and j.label is not None]
    votes = Counter(j.label for j in ok)
    if ok:
        score = {j.label: (j.score if j.score is not None else 0.0) for j in ok}
        label = min(votes, key=lambda l: (-votes[l], score[l]))
        chosen = next(j for j in ok if j.label == label)
    else:
        chosen = ordered[0]
    return Verdict(**{k: getattr(chosen, k) for k in Judgement.__dataclass_fields__},
                   votes=dict(votes), samples=len(ordered))


def verdicts(store: RunStore) -> dict[tuple[str, str], Verdict]:
    """Every (session id, judge) of the run with its verdict."""
    grouped: dict[tuple[str, str], list[Judgement]] = {}
    for j in store.judgements():
        grouped.setdefault((j.session_id, j.judge), []).append(j)
    return {key: verdict_of(js) for key, js in grouped.items()}


def load_outcomes(store: RunStore) -> list[SampleOutcome]:
    """Every planned sample of the run, in plan order, with its latest attempt's outcomes."""
    latest = {s["sample_id"]: s for s in store.latest_sessions()}
    by_session: dict[str, dict[str, Outcome]] = {}
    for j in verdicts(store).values():
        if j.status == "ok":
            result: Outcome = "pass" if j.passed else "fail"
        else:
            result = j.status  # error or skipped
        by_session.setdefault(j.session_id, {})[j.judge] = result
    out = []
    for sample in store.samples():
        s = latest.get(sample.sample_id)
        if s is None:
            out.append(SampleOutcome(sample, None, "not_run"))
            continue
        out.append(SampleOutcome(sample, s["session_id"], s["status"], s["turns"] or 0,
                                 by_session.get(s["session_id"], {})))
    return out


PairKey = tuple[str, str, int]


def by_pair_key(outcomes: list[SampleOutcome], variant: str) -> dict[PairKey, SampleOutcome]:
    """One variant's samples keyed by pair key (topic, persona, repeat)."""
    return {o.sample.pair_key: o for o in outcomes if o.sample.variant == variant}


def compare_matchups(
    matchups: dict[str, tuple[dict[PairKey, SampleOutcome], dict[PairKey, SampleOutcome]]],
    dimensions: list[str],
) -> dict[str, dict[str, PairedComparison]]:
    """Paired comparisons for every (matchup, dimension), Holm-corrected together as one family.

    A matchup is (baseline side, variant side), each keyed by pair key; only keys on both sides pair.
    A pair whose either side has no pass/fail on a dimension drops out of that dimension on both sides.
    """
    result: dict[str, dict[str, PairedComparison]] = {}
    for name, (left, right) in matchups.items():
        shared = [k for k in left if k in right]
        result[name] = {
            dim: compare_paired((left[k].passed(dim), right[k].passed(dim)) for k in shared) for dim in dimensions
        }
    apply_holm([c for per_dim in result.values() for c in per_dim.values()])
    return result
