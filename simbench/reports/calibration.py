"""Calibration: the judges' labels against human labels of the same imported sessions.

A label map (YAML, docs/calibrate.md) turns each dimension's human labels into the judge's labels;
a dimension without a map entry must already use the judge's labels. ``check_labels`` validates a
file's labels against the map and the judges before any model call; ``calibration`` reads a judged
run and computes, per dimension, accuracy, Cohen's kappa with an interval, the confusion matrix and
the sessions where judge and human disagree. A judgement with status ``error`` or ``skipped`` (or
none) is counted apart, never as an agreement or a disagreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..store import RunStore
from .agreement import accuracy, cohen_kappa, confusion_matrix
from .stats import CONFIDENCE, wilson_interval

LabelMap = dict[str, dict[str, str]]
MAP_SETTING = "calibration_map"
MIN_KAPPA_SETTING = "calibration_min_kappa"


class LabelMapError(Exception):
    """An invalid label map or labels that do not fit it. ``problems`` name file, line and field."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def load_label_map(path: Union[str, Path, None]) -> LabelMap:
    """Read ``{dimension: {human label: judge label}}`` from YAML (no path: an empty map, identity everywhere)."""
    if path is None:
        return {}
    # The matrix's YAML reader and line finder: map errors (duplicate keys too) name their line.
    from ..matrix import MatrixError, _LineIndex, read_yaml

    source = str(path)
    try:
        node, data = read_yaml(Path(path).read_text(encoding="utf-8"), source)
    except OSError as exc:
        raise LabelMapError([f"{source}: cannot read the label map: {exc.strerror or exc}"]) from None
    except MatrixError as exc:
        raise LabelMapError(exc.problems) from None
    lines = _LineIndex(node)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LabelMapError([f"{source}: the label map must be a mapping: dimension: {{human label: judge label}}"])
    problems, out = [], {}
    for dim, entries in data.items():
        if not isinstance(entries, dict) or not entries:
            problems.append(f"{source}:{lines.line((dim,))}: {dim}: expected a mapping of human label: judge label")
            continue
        out[str(dim)] = {}
        for human, judged in entries.items():
            if not isinstance(judged, str):
                problems.append(f"{source}:{lines.line((dim, human))}: {dim}.{human}: the judge label must be a string")
                continue
            out[str(dim)][str(human)] = judged
    if problems:
        raise LabelMapError(problems)
    return out


def check_labels(sessions: list, mapping: LabelMap, choices: dict[str, list[str]], source: str,
                 map_source: str = "the label map") -> list[str]:
    """Problems with the human labels of ``sessions`` (``ImportedSession``s) under ``mapping``.

    ``choices`` are the labels of each judge in use. Every labelled dimension must be a judge in use;
    every human label must map (or, without a map entry, be one of the judge's labels); every map
    target must be one of the judge's labels.
    """
    problems = []
    for dim, entries in mapping.items():
        if dim not in choices:
            problems.append(f"{map_source}: {dim}: no judge of that name is used (judges: {', '.join(choices)})")
            continue
        for human, judged in entries.items():
            if judged not in choices[dim]:
                problems.append(f"{map_source}: {dim}.{human}: {judged!r} is not a label of the {dim} judge "
                                f"({', '.join(choices[dim])})")
    if problems:
        return problems
    for s in sessions:
        for dim, human in s.labels.items():
            where = f"{source}:{s.line}: labels.{dim}"
            if dim not in choices:
                problems.append(f"{where}: no judge of that name is used (judges: {', '.join(choices)})")
            elif dim in mapping and human not in mapping[dim]:
                problems.append(f"{where}: {human!r} is not in {map_source} under {dim} "
                                f"(mapped: {', '.join(mapping[dim])})")
            elif dim not in mapping and human not in choices[dim]:
                problems.append(f"{where}: {human!r} is not a label of the {dim} judge ({', '.join(choices[dim])}); "
                                f"map it in a label map (--map)")
    if not problems and not any(s.labels for s in sessions):
        problems.append(f"{source}: no session has human labels (\"labels\": {{dimension: label}}); nothing to calibrate")
    return problems


@dataclass
class LabelPair:
    """One human label of one session and what the judge said on that dimension."""

    session_id: str
    source_id: str
    line: int
    dimension: str
    human: str  # as the person wrote it
    expected: str  # mapped to the judge's labels
    status: str  # ok, error, skipped, missing
    judged: Optional[str] = None
    explanation: Optional[str] = None
    unstable: bool = False

    @property
    def agrees(self) -> Optional[bool]:
        """True or False for a verdict; None when the judge gave none."""
        return None if self.status != "ok" else self.judged == self.expected


def label_pairs(store: RunStore, mapping: LabelMap) -> list[LabelPair]:
    """Every human label of the run with the judge's verdict on the same session and dimension."""
    from .outcomes import verdicts  # the one place that picks a session's verdict (majority of samples)

    origins = store.imported_sessions()
    judged = verdicts(store)
    out = []
    for session_id, labels in store.human_labels().items():
        origin = origins.get(session_id, {"source_id": session_id, "line": 0})
        for dim, human in labels.items():
            v = judged.get((session_id, dim))
            expected = mapping.get(dim, {}).get(human, human)
            if v is None:
                out.append(LabelPair(session_id, origin["source_id"], origin["line"], dim, human, expected, "missing"))
                continue
            out.append(LabelPair(session_id, origin["source_id"], origin["line"], dim, human, expected, v.status,
                                 v.label if v.status == "ok" else None, v.explanation or v.error, v.unstable))
    out.sort(key=lambda p: (p.line, p.dimension))
    return out


def calibration(store: RunStore, choices: dict[str, list[str]], mapping: LabelMap,
                min_kappa: Optional[float] = None) -> dict[str, Any]:
    """The calibration section of summary.json (docs/report.md): per dimension agreement with people."""
    pairs = label_pairs(store, mapping)
    dimensions = {}
    for dim, labels in choices.items():
        mine = [p for p in pairs if p.dimension == dim]
        if not mine:
            continue
        compared = [p for p in mine if p.agrees is not None]
        table = confusion_matrix(((p.expected, p.judged) for p in compared), labels)
        kappa = cohen_kappa(table)
        agreed = sum(1 for p in compared if p.agrees)
        acc = accuracy(table)
        below = None if min_kappa is None else (kappa.kappa is None or kappa.kappa < min_kappa)
        dimensions[dim] = {
            "labels": labels,
            "labelled": len(mine),
            "compared": len(compared),
            "not_compared": {status: sum(1 for p in mine if p.status == status) for status in ("error", "skipped", "missing")},
            "agreed": agreed,
            "accuracy": acc,
            "accuracy_ci": list(wilson_interval(agreed, len(compared)) or []) or None,
            **{f"kappa{'' if k == 'kappa' else '_' + k}": v for k, v in kappa.as_dict().items() if k != "n"},
            "confusion": table,
            "below_min_kappa": below,
            "disagreements": [
                {"session_id": p.session_id, "source_id": p.source_id, "line": p.line, "human": p.human,
                 "expected": p.expected, "judge": p.judged, "explanation": p.explanation, "unstable": p.unstable}
                for p in compared if not p.agrees
            ],
            "no_verdict": [
                {"session_id": p.session_id, "source_id": p.source_id, "line": p.line, "status": p.status,
                 "reason": p.explanation}
                for p in mine if p.agrees is None
            ],
        }
    return {"confidence": CONFIDENCE, "kappa_interval": "asymptotic normal (Fleiss, Cohen & Everitt 1969)",
            "map": mapping, "min_kappa": min_kappa, "dimensions": dimensions}


def kappa_failures(section: dict[str, Any]) -> list[str]:
    """One line per dimension whose kappa is under the section's ``min_kappa`` (or undefined)."""
    k = section.get("min_kappa")
    out = []
    for dim, d in section["dimensions"].items():
        if d["below_min_kappa"]:
            value = "undefined" if d["kappa"] is None else f"{d['kappa']:.2f}"
            out.append(f"{dim}: Cohen's kappa {value} is under --min-kappa {k} ({d['compared']} sessions compared)")
    return out
