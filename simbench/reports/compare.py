"""``simbench compare RUN_DIR_A RUN_DIR_B``: two runs on the samples they share, with paired statistics.

Run A is the reference (before), run B the candidate (after): "better" means B passes more often.
Samples pair on the pair key (topic, persona, repeat) and the same variant name; when the runs
share no variant name (two single-variant runs, say), each run's baseline variant is paired with the
other's on the pair key alone. Statistics are those of a run's report (``stats.py``): the exact
McNemar test and Newcombe's interval on the pairs, Holm-corrected over every (variant, dimension).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import RunStore
from .html import assets, comparison_rows, environment, session_views
from .outcomes import PairKey, SampleOutcome, by_pair_key, compare_matchups, load_outcomes
from .summary import STATISTICS

from . import COMPARE_FILE
COMPARE_VERSION = 1


class CompareError(Exception):
    """The two directories cannot be compared (not runs, or no dimension in common)."""


@dataclass
class RunComparison:
    """What ``compare_runs`` found: a JSON-ready ``result``, and the shared samples whose outcome changed
    (each with both runs' session views, for the drill-down)."""

    result: dict[str, Any]
    changed: list[dict[str, Any]] = field(default_factory=list)


IMPORTED_TUTOR = "imported sessions (not simulated)"


def _describe(run_dir: Path, store: RunStore) -> dict[str, Any]:
    run = store.run() or {}
    matrix = json.loads(run.get("matrix_json") or "{}")
    tutor = matrix.get("tutor") or {}
    variants = list(tutor.get("variants") or {})
    models = matrix.get("models") or {}

    def model_of(role_key: str) -> str:
        name = (matrix.get(role_key) or {}).get("model") or "local"
        spec = models.get(name) or {"provider": "local"}
        return spec.get("model") or name if spec.get("provider", "openai") != "local" else f"{name} (embedded)"

    def tutor_of() -> str:
        kind = tutor.get("kind") or "prompt"
        if kind == "callable":
            return f"callable {tutor.get('callable')}"
        if kind == "http":
            return f"http app at {(tutor.get('http') or {}).get('base_url')}"
        if kind == "imported":
            return IMPORTED_TUTOR
        return model_of("tutor")

    return {
        "run_dir": str(run_dir), "run_id": run.get("run_id"), "matrix": run.get("matrix_name"),
        "variants": variants, "baseline": tutor.get("baseline") or (variants[0] if variants else None),
        "dimensions": (matrix.get("judges") or {}).get("use") or [],
        "tutor_model": tutor_of(), "judge_model": model_of("judges"),
    }


def compare_runs(run_dir_a: Path, run_dir_b: Path) -> RunComparison:
    """Pair the samples of two runs and compare every matched variant on every shared dimension."""
    store_a, store_b = RunStore.open_existing(run_dir_a), None
    try:
        store_b = RunStore.open_existing(run_dir_b)
        a, b = _describe(run_dir_a, store_a), _describe(run_dir_b, store_b)
        dims = [d for d in a["dimensions"] if d in b["dimensions"]]
        if not dims:
            raise CompareError(f"the runs share no judged dimension ({', '.join(a['dimensions'])} vs "
                               f"{', '.join(b['dimensions'])})")
        outcomes_a, outcomes_b = load_outcomes(store_a), load_outcomes(store_b)
        result = _compare(a, b, dims, outcomes_a, outcomes_b)
        views_a = session_views(store_a, prefix="a")
        views_b = session_views(store_b, prefix="b")
    finally:
        store_a.close()
        if store_b is not None:
            store_b.close()
    return RunComparison(result, _changed_pairs(result, views_a, views_b))


def _compare(a: dict, b: dict, dims: list[str], outcomes_a: list[SampleOutcome],
             outcomes_b: list[SampleOutcome]) -> dict[str, Any]:
    shared = [v for v in a["variants"] if v in b["variants"]]
    notes = []
    if shared:
        mode = "same variant"
        pairs = [(v, v) for v in shared]
        left_out = [f"A:{v}" for v in a["variants"] if v not in shared] + [f"B:{v}" for v in b["variants"] if v not in shared]
        if left_out:
            notes.append(f"variants in one run only are not compared: {', '.join(left_out)}")
    else:
        mode = "baselines"
        pairs = [(a["baseline"], b["baseline"])]
        notes.append(f"the runs share no variant name: run A's baseline {a['baseline']!r} is paired with run B's "
                     f"baseline {b['baseline']!r} on topic, persona and repeat")
    matchups: dict[str, tuple[dict[PairKey, SampleOutcome], dict[PairKey, SampleOutcome]]] = {}
    described = []
    for va, vb in pairs:
        name = va if va == vb else f"{va} → {vb}"
        left, right = by_pair_key(outcomes_a, va), by_pair_key(outcomes_b, vb)
        matchups[name] = (left, right)
        n_shared = sum(1 for k in left if k in right)
        described.append({"name": name, "a_variant": va, "b_variant": vb, "shared_samples": n_shared,
                          "unshared_samples": len(left) + len(right) - 2 * n_shared})
    comparisons = compare_matchups(matchups, dims)
    for m in described:
        if not m["shared_samples"]:
            notes.append(f"{m['name']}: the runs share no sample (topic, persona, repeat)")
    for key, what in (("tutor_model", "tutor"), ("judge_model", "judge")):
        if key == "tutor_model" and IMPORTED_TUTOR in (a[key], b[key]):
            continue  # a judge-only run's sessions came from elsewhere (often the other run): no tutor to differ
        if a[key] != b[key]:
            notes.append(f"the {what} models differ ({a[key]} vs {b[key]})"
                         + (": a difference may come from the judge, not the tutor" if what == "judge" else ""))
    left_dims = [d for d in a["dimensions"] + b["dimensions"] if d not in dims]
    if left_dims:
        notes.append(f"dimensions judged in one run only are not compared: {', '.join(dict.fromkeys(left_dims))}")
    by_name = {m["name"]: m for m in described}
    return {
        "compare_version": COMPARE_VERSION,
        "a": a, "b": b,
        "mode": mode,
        "dimensions": dims,
        "matchups": described,
        "statistics": STATISTICS,
        "comparisons": {
            name: {dim: {"a_variant": by_name[name]["a_variant"], "b_variant": by_name[name]["b_variant"],
                         "unshared": by_name[name]["unshared_samples"], **c.as_dict()} for dim, c in per_dim.items()}
            for name, per_dim in comparisons.items()
        },
        "notes": notes,
    }


def _changed_pairs(result: dict[str, Any], views_a: list[dict], views_b: list[dict]) -> list[dict[str, Any]]:
    """Shared samples whose outcome differs between the runs on some dimension (or that errored on one side):
    worse in B first, then better in B, then errors."""
    index_a = {(v["variant"], v["topic"], v["persona"], v["repeat"]): v for v in views_a}
    index_b = {(v["variant"], v["topic"], v["persona"], v["repeat"]): v for v in views_b}
    groups = []
    for m in result["matchups"]:
        for (variant, topic, persona, repeat), sa in index_a.items():
            if variant != m["a_variant"]:
                continue
            sb = index_b.get((m["b_variant"], topic, persona, repeat))
            if sb is None:
                continue
            worse, better = [], []
            for dim in result["dimensions"]:
                oa, ob = sa["outcomes"].get(dim), sb["outcomes"].get(dim)
                if oa == "pass" and ob == "fail":
                    worse.append(dim)
                elif oa == "fail" and ob == "pass":
                    better.append(dim)
            errored = "errored" in (sa["status"], sb["status"]) and sa["status"] != sb["status"]
            if worse or better or errored:
                groups.append({"anchor": f"c-{len(groups) + 1}", "matchup": m["name"], "topic": topic,
                               "persona": persona, "repeat": repeat, "worse": worse, "better": better,
                               "errored": errored, "a": sa, "b": sb})
    groups.sort(key=lambda g: (not g["worse"], not g["better"]))
    return groups


def render_comparison(comparison: RunComparison) -> str:
    """The comparison report as one self-contained HTML string."""
    template = environment().get_template("compare.html.j2")
    r = comparison.result
    return template.render(result=r, rows=comparison_rows(r["comparisons"]), changed=comparison.changed, **assets())


def write_comparison(comparison: RunComparison, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_comparison(comparison), encoding="utf-8")
    tmp.replace(path)
    return path


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """One line per (variant, dimension) for the terminal."""
    lines = [f"{name} / {dim}: {c['statement']}" for name, per_dim in result["comparisons"].items()
             for dim, c in per_dim.items()]
    return lines + [f"note: {n}" for n in result["notes"]]
