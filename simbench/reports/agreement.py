"""Agreement statistics: how far a judge agrees with people, and with itself.

Pure functions over labels and counts, each testable against published values and statsmodels.

- **Confusion matrix**: rows are the reference (the human label, mapped to the judge's labels),
  columns the judge's label, in the judge's label order.
- **Cohen's kappa** ``(p_o - p_e) / (1 - p_e)``: agreement beyond chance between two raters, with
  the large-sample standard error of Fleiss, Cohen and Everitt (1969) (the one statsmodels'
  ``cohens_kappa`` reports) and a normal interval, clipped to [-1, 1]. Undefined (None) when chance
  agreement is 1 (both raters used one and the same label throughout); no interval (None) when the
  standard error is 0 (perfect agreement, or a rater that used one label), which the formula cannot
  turn into an honest interval.
- **Fleiss' kappa**: agreement among the N samples of one judge over many sessions (every session
  rated the same number of times), for ``--judge-samples``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from scipy.stats import norm

from .stats import CONFIDENCE


def confusion_matrix(pairs: Iterable[tuple[str, str]], labels: Sequence[str]) -> list[list[int]]:
    """Counts of (reference, judged) label pairs: ``table[i][j]`` = reference ``labels[i]``, judged ``labels[j]``.

    A label outside ``labels`` is a ValueError (map every label before comparing).
    """
    index = {label: i for i, label in enumerate(labels)}
    table = [[0] * len(labels) for _ in labels]
    for reference, judged in pairs:
        if reference not in index or judged not in index:
            raise ValueError(f"label {reference if reference not in index else judged!r} is not one of {list(labels)}")
        table[index[reference]][index[judged]] += 1
    return table


def accuracy(table: Sequence[Sequence[int]]) -> Optional[float]:
    """The share of pairs on the diagonal (None for no pairs)."""
    n = sum(map(sum, table))
    return sum(table[i][i] for i in range(len(table))) / n if n else None


@dataclass(frozen=True)
class Kappa:
    """Cohen's kappa with its standard error and a ``confidence`` interval (None where undefined)."""

    kappa: Optional[float]
    se: Optional[float]
    ci: Optional[tuple[float, float]]
    n: int

    def as_dict(self) -> dict:
        return {"kappa": self.kappa, "se": self.se, "ci": list(self.ci) if self.ci else None, "n": self.n}


def cohen_kappa(table: Sequence[Sequence[int]], confidence: float = CONFIDENCE) -> Kappa:
    """Cohen's kappa of a square confusion matrix, its asymptotic standard error and interval."""
    k = len(table)
    n = sum(map(sum, table))
    if n == 0:
        return Kappa(None, None, None, 0)
    p = [[table[i][j] / n for j in range(k)] for i in range(k)]
    rows = [sum(p[i]) for i in range(k)]
    cols = [sum(p[i][j] for i in range(k)) for j in range(k)]
    observed = sum(p[i][i] for i in range(k))
    chance = sum(rows[i] * cols[i] for i in range(k))
    if math.isclose(chance, 1.0):
        return Kappa(None, None, None, n)
    kappa = (observed - chance) / (1 - chance)
    # Fleiss, Cohen & Everitt (1969), eq. 13: the variance of kappa when it is not zero.
    a = sum(p[i][i] * (1 - (rows[i] + cols[i]) * (1 - kappa)) ** 2 for i in range(k))
    b = (1 - kappa) ** 2 * sum(p[i][j] * (cols[i] + rows[j]) ** 2 for i in range(k) for j in range(k) if i != j)
    c = (kappa - chance * (1 - kappa)) ** 2
    variance = max(0.0, (a + b - c) / ((1 - chance) ** 2 * n))
    se = math.sqrt(variance)
    if math.isclose(se, 0.0, abs_tol=1e-12):
        # The large-sample formula sees no spread (perfect agreement, or a rater that used one label):
        # an interval of width 0 would claim a certainty a few sessions cannot give.
        return Kappa(kappa, se, None, n)
    z = norm.isf((1 - confidence) / 2)
    ci = (max(-1.0, kappa - z * se), min(1.0, kappa + z * se))
    return Kappa(kappa, se, ci, n)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> Optional[float]:
    """Fleiss' kappa of ``counts[subject][category]`` (each subject rated the same number of times, >= 2).

    None when undefined: no subjects, fewer than two ratings each, or every rating in one category.
    """
    if not counts:
        return None
    raters = sum(counts[0])
    if raters < 2 or any(sum(row) != raters for row in counts):
        return None
    subjects = len(counts)
    total = subjects * raters
    shares = [sum(row[j] for row in counts) / total for j in range(len(counts[0]))]
    observed = sum((sum(c * c for c in row) - raters) / (raters * (raters - 1)) for row in counts) / subjects
    chance = sum(s * s for s in shares)
    if math.isclose(chance, 1.0):
        return None
    return (observed - chance) / (1 - chance)
