"""CI gates: a minimum pass rate per dimension that every variant must reach (errors and skips excluded).

The one place gates are decided; ``simbench run``'s exit code, ``summary.json`` and the JUnit file
all read ``check_gates``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass
class GateCheck:
    """One gate on one variant: its threshold, the pass rate found, and whether it held."""

    dimension: str
    variant: str
    minimum: float
    pass_rate: Optional[float]
    passed: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _variants(summary: dict[str, Any]) -> list[str]:
    names = list(summary.get("variants") or [])
    for dim in summary.get("dimensions", {}).values():
        names += [v for v in dim.get("by_variant", {}) if v not in names]
    return names


def check_gates(summary: dict[str, Any], gates: dict[str, float]) -> list[GateCheck]:
    """Check every gate against every variant of the run; a variant with nothing judged fails its gate."""
    checks = []
    for dim, minimum in gates.items():
        by_variant = summary.get("dimensions", {}).get(dim, {}).get("by_variant", {})
        variants = _variants(summary)
        if not variants:
            checks.append(GateCheck(dim, "", minimum, None, False, f"{dim}: no judgements to check the gate against"))
        for variant in variants:
            counts = by_variant.get(variant)
            if not counts or not counts["judged"]:
                checks.append(GateCheck(dim, variant, minimum, None, False, f"{dim} / {variant}: nothing judged"))
                continue
            rate = counts["pass"] / counts["judged"]
            ok = rate >= minimum
            relation = ">=" if ok else "<"
            checks.append(GateCheck(dim, variant, minimum, rate, ok,
                                    f"{dim} / {variant}: pass rate {rate:.2f} {relation} gate {minimum:.2f}"))
    return checks


def gate_failures(summary: dict[str, Any], gates: dict[str, float]) -> list[str]:
    """The messages of the gates that failed, each naming the dimension and the variant."""
    return [c.message for c in check_gates(summary, gates) if not c.passed]
