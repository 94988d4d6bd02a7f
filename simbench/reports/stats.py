"""The statistics of the report: intervals, paired comparisons, multiplicity, consistency.

Pure functions over counts, so each is testable against published values. Distributions come from
scipy (the Wilson interval and the exact binomial test); only arithmetic on top of them is here.

- A proportion gets a **Wilson score interval** (good coverage at small n and near 0 or 1).
- A variant is compared with the baseline on **paired** samples (the same pair key: topic, persona,
  repeat). Of n usable pairs, ``b`` passed on the baseline only and ``c`` on the variant only.
  The difference in pass rate is ``(c - b) / n`` with **Newcombe's hybrid score interval for paired
  data** (square-and-add of the two Wilson intervals, corrected for their correlation); the test is
  the **exact McNemar test**: a two-sided binomial test of ``c`` among the ``b + c`` discordant pairs.
- p values of all tests of a report are adjusted with **Holm's step-down method** (family-wise error).
- **pass^j** (tau-bench): per cell with n usable repeats and c passes, ``C(c, j) / C(n, j)`` is the
  chance that j repeats drawn without replacement all pass; it is averaged over cells.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal, Optional, Sequence

from scipy.stats import binomtest

CONFIDENCE = 0.95
ALPHA = 0.05

Verdict = Literal["better", "worse", "no detectable difference", "not compared"]


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Optional[tuple[float, float]]:
    """The Wilson score interval for ``successes / n``; None when n is 0."""
    if n <= 0:
        return None
    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (max(0.0, float(ci.low)), min(1.0, float(ci.high)))


def rate_fields(passes: int, fails: int, confidence: float = CONFIDENCE) -> dict:
    """``pass_rate``, ``pass_ci``, ``fail_rate``, ``fail_ci`` of judged outcomes (None when nothing was judged)."""
    n = passes + fails
    ci = wilson_interval(passes, n, confidence)
    if ci is None:
        return {"pass_rate": None, "pass_ci": None, "fail_rate": None, "fail_ci": None}
    return {
        "pass_rate": round(passes / n, 4),
        "pass_ci": [round(ci[0], 4), round(ci[1], 4)],
        "fail_rate": round(fails / n, 4),
        "fail_ci": [round(1 - ci[1], 4), round(1 - ci[0], 4)],
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p value: ``c`` successes in ``b + c`` trials at probability 1/2 (1.0 if none)."""
    if b + c == 0:
        return 1.0
    return float(binomtest(c, b + c, 0.5, alternative="two-sided").pvalue)


def paired_difference_interval(
    both_pass: int, b: int, c: int, both_fail: int, confidence: float = CONFIDENCE
) -> Optional[tuple[float, float]]:
    """Newcombe's hybrid score interval for the paired difference ``(c - b) / n`` (variant minus baseline).

    ``b``: pairs that passed on the baseline only; ``c``: on the variant only. Follows Newcombe (1998),
    method 10, with its correction of the correlation term (as in Fagerland, Lydersen and Laake, 2014).
    """
    n = both_pass + b + c + both_fail
    if n == 0:
        return None
    base_pass, var_pass = both_pass + b, both_pass + c
    p_base, p_var = base_pass / n, var_pass / n
    l_base, u_base = wilson_interval(base_pass, n, confidence)  # type: ignore[misc]
    l_var, u_var = wilson_interval(var_pass, n, confidence)  # type: ignore[misc]
    # Correlation of the two proportions in the 2x2 table (rows: baseline, columns: variant).
    margins = base_pass * (n - base_pass) * var_pass * (n - var_pass)
    phi = 0.0
    if margins > 0:
        cross = both_pass * both_fail - b * c
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    diff = p_var - p_base
    lower = diff - math.sqrt(max(0.0, (p_var - l_var) ** 2 - 2 * phi * (p_var - l_var) * (u_base - p_base) + (u_base - p_base) ** 2))
    upper = diff + math.sqrt(max(0.0, (u_var - p_var) ** 2 - 2 * phi * (u_var - p_var) * (p_base - l_base) + (p_base - l_base) ** 2))
    return (max(-1.0, lower), min(1.0, upper))


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm-adjusted p values, in the input's order; None entries are not tests and stay None."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tested)
    adjusted: list[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass
class PairedComparison:
    """A variant against a baseline on one dimension, over samples paired by pair key.

    Counts are pairs: ``both_pass`` and ``both_fail`` agree; ``b`` passed on the baseline only and
    ``c`` on the variant only (the discordant pairs the McNemar test reads). ``dropped`` pairs had no
    pass/fail on at least one side (an errored session, an ``error`` or ``skipped`` judgement, a
    session not run) and count on neither side.
    """

    n: int = 0
    both_pass: int = 0
    b: int = 0
    c: int = 0
    both_fail: int = 0
    dropped: int = 0
    baseline_pass_rate: Optional[float] = None
    variant_pass_rate: Optional[float] = None
    diff: Optional[float] = None  # variant pass rate minus baseline pass rate, on the n pairs
    ci: Optional[list[float]] = None  # confidence interval of ``diff``
    p: Optional[float] = None  # exact McNemar, two-sided, unadjusted
    p_holm: Optional[float] = None  # adjusted over every comparison of the same report
    verdict: Verdict = "not compared"
    statement: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


def compare_paired(pairs: Iterable[tuple[Optional[bool], Optional[bool]]], confidence: float = CONFIDENCE) -> PairedComparison:
    """Count (baseline passed, variant passed) pairs and test them; a None on either side drops the pair.

    The verdict waits for ``apply_holm``, which sees every comparison of the report.
    """
    out = PairedComparison()
    for base, var in pairs:
        if base is None or var is None:
            out.dropped += 1
        elif base and var:
            out.both_pass += 1
        elif base:
            out.b += 1
        elif var:
            out.c += 1
        else:
            out.both_fail += 1
    out.n = out.both_pass + out.b + out.c + out.both_fail
    if out.n:
        out.baseline_pass_rate = round((out.both_pass + out.b) / out.n, 4)
        out.variant_pass_rate = round((out.both_pass + out.c) / out.n, 4)
        out.diff = round((out.c - out.b) / out.n, 4)
        lo, hi = paired_difference_interval(out.both_pass, out.b, out.c, out.both_fail, confidence)  # type: ignore[misc]
        out.ci = [round(lo, 4), round(hi, 4)]
        out.p = mcnemar_exact(out.b, out.c)
    return out


def apply_holm(comparisons: Sequence[PairedComparison], alpha: float = ALPHA, confidence: float = CONFIDENCE) -> None:
    """Adjust the p values of a family of comparisons together, then give each its verdict."""
    for comparison, adjusted in zip(comparisons, holm([c.p for c in comparisons])):
        comparison.p_holm = None if adjusted is None else round(adjusted, 6)
        comparison.verdict, comparison.statement = verdict(comparison, alpha, confidence)


def verdict(c: PairedComparison, alpha: float = ALPHA, confidence: float = CONFIDENCE) -> tuple[Verdict, str]:
    """A plain-language verdict: better or worse only when the Holm-adjusted p is under ``alpha``."""
    if not c.n or c.p_holm is None or c.diff is None or c.ci is None:
        why = f" ({c.dropped} pair(s) dropped for errors or skips)" if c.dropped else ""
        return "not compared", f"not compared: no pair was judged on both sides{why}"
    level = f"{100 * confidence:.0f}% CI {_points(c.ci[0])} to {_points(c.ci[1])}"
    numbers = (f"pass rate {_pct(c.variant_pass_rate)} vs {_pct(c.baseline_pass_rate)}, "
               f"{_points(c.diff)} points ({level}); p {_p(c.p_holm)} after Holm correction")
    if c.p_holm < alpha and c.diff != 0:
        word: Verdict = "better" if c.diff > 0 else "worse"
        return word, f"{word}: {numbers}, n = {c.n} pairs"
    return "no detectable difference", f"no detectable difference with n = {c.n} pairs: {numbers}"


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _points(value: float) -> str:
    return f"{100 * value:+.0f}"


def _p(value: float) -> str:
    return f"= {value:.2g}" if value >= 0.001 else "< 0.001"


def pass_hat(cells: Iterable[tuple[int, int]], max_j: int) -> list[dict]:
    """pass^j for j = 1..max_j from (usable repeats n, passes c) per cell, averaged over cells with n >= j.

    Each entry: ``j``, ``pass_j`` (None when no cell has j usable repeats) and ``cells`` (how many
    cells the average is over). pass^1 is the mean per-cell pass rate.
    """
    cells = [(n, c) for n, c in cells if n > 0]
    out = []
    for j in range(1, max_j + 1):
        values = [math.comb(c, j) / math.comb(n, j) for n, c in cells if n >= j]
        out.append({"j": j, "pass_j": round(sum(values) / len(values), 4) if values else None, "cells": len(values)})
    return out
