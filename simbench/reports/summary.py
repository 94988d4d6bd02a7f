"""``summary.json``: what a run planned, completed and how each dimension fared, for people and CI.

Counts take each sample once, by its latest attempt. Judgements with status ``error`` or
``skipped`` are counted apart and never enter a failure rate.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..store import RunStore

SUMMARY_VERSION = 1
SUMMARY_FILE = "summary.json"


def _empty_counts() -> dict[str, Any]:
    return {"pass": 0, "fail": 0, "error": 0, "skipped": 0}


def _finish(counts: dict[str, Any]) -> dict[str, Any]:
    judged = counts["pass"] + counts["fail"]
    counts["judged"] = judged
    counts["fail_rate"] = round(counts["fail"] / judged, 4) if judged else None
    return counts


def _bump(counts: dict[str, Any], status: str, passed: Optional[bool]) -> None:
    if status == "ok":
        counts["pass" if passed else "fail"] += 1
    else:
        counts[status] += 1


def build_summary(store: RunStore) -> dict[str, Any]:
    """The summary of a run as a JSON-ready dict (see docs/architecture.md for every field)."""
    run = store.run() or {}
    matrix = json.loads(run.get("matrix_json") or "{}")
    judges = (matrix.get("judges") or {}).get("use") or []
    sessions = store.latest_sessions()
    by_session = {s["session_id"]: s for s in sessions}
    planned = len(store.samples())

    dimensions: dict[str, dict[str, Any]] = {}
    for judge in judges:
        dimensions[judge] = {
            "overall": _empty_counts(),
            "by_variant": defaultdict(_empty_counts),
            "by_persona": defaultdict(_empty_counts),
            "by_topic": defaultdict(_empty_counts),
        }
    for j in store.judgements():
        session = by_session.get(j.session_id)
        if session is None or session["status"] != "completed" or j.judge not in dimensions or j.judge_sample != 0:
            continue
        dim = dimensions[j.judge]
        for counts in (dim["overall"], dim["by_variant"][session["variant"]], dim["by_persona"][session["persona"]],
                       dim["by_topic"][session["topic"]]):
            _bump(counts, j.status, j.passed)

    for dim in dimensions.values():
        _finish(dim["overall"])
        for key in ("by_variant", "by_persona", "by_topic"):
            dim[key] = {name: _finish(c) for name, c in dim[key].items()}

    completed = sum(1 for s in sessions if s["status"] == "completed")
    errored = sum(1 for s in sessions if s["status"] == "errored")
    return {
        "summary_version": SUMMARY_VERSION,
        "simbench_version": __version__,
        "run_id": run.get("run_id"),
        "matrix": run.get("matrix_name"),
        "matrix_source": run.get("matrix_source"),
        "status": run.get("status"),
        "baseline": (matrix.get("tutor") or {}).get("baseline"),
        "sessions": {
            "planned": planned,
            "completed": completed,
            "errored": errored,
            "not_run": planned - completed - errored,
            "superseded_attempts": len(store.superseded_sessions()),
        },
        "errors": [
            {"session_id": s["session_id"], "error": s["error"]} for s in sessions if s["status"] == "errored"
        ],
        "dimensions": dimensions,
        "usage": usage_totals(store),
    }


def usage_totals(store: RunStore) -> dict[str, dict[str, Any]]:
    """Calls, tokens and latency per role over the whole run."""
    totals: dict[str, dict[str, Any]] = {}
    for roles in store.usage_by_session().values():
        for role, u in roles.items():
            t = totals.setdefault(role, {k: 0 for k in u})
            for k, v in u.items():
                t[k] += v or 0
    for t in totals.values():
        t["latency_s"] = round(t["latency_s"], 3)
    return totals


def write_summary(summary: dict[str, Any], run_dir: Path) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
