"""``summary.json``: what a run planned, completed and how each dimension fared, for people and CI.

Counts take each sample once, by its latest attempt. Judgements with status ``error`` or
``skipped`` are counted apart and never enter a rate or a comparison. Every field is described in
docs/report.md; ``SUMMARY_VERSION`` changes when a field changes meaning or goes away.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..evaluators.builtin import SIMULATOR_JUDGES
from ..evaluators.turns import first_failing_turn
from ..store import RunStore
from .calibration import MAP_SETTING, MIN_KAPPA_SETTING, calibration

# Run settings written by the pipeline (kept here, so the reports need not import the pipeline).
JUDGE_SAMPLES_SETTING = "judge_samples"
JUDGE_TEMPERATURE_SETTING = "judge_temperature"
from .agreement import fleiss_kappa
from .outcomes import SampleOutcome, by_pair_key, compare_matchups, load_outcomes, verdicts
from .stats import ALPHA, CONFIDENCE, pass_hat, rate_fields

# 2: rates with Wilson intervals, ``variants``, ``statistics``, ``comparisons``, ``consistency``.
SUMMARY_VERSION = 2
SUMMARY_FILE = "summary.json"
BREAKDOWNS = {"by_variant": "variant", "by_persona": "persona", "by_topic": "topic"}

STATISTICS = {
    "confidence": CONFIDENCE,
    "alpha": ALPHA,
    "rate_interval": "wilson",
    "difference_interval": "newcombe_paired_hybrid_score",
    "test": "mcnemar_exact",
    "correction": "holm",
    "pairing": "pair key (topic, persona, repeat)",
}


def _empty_counts() -> dict[str, Any]:
    return {"pass": 0, "fail": 0, "error": 0, "skipped": 0, "simulator_error": 0}


def _finish(counts: dict[str, Any]) -> dict[str, Any]:
    counts["judged"] = counts["pass"] + counts["fail"]
    counts.update(rate_fields(counts["pass"], counts["fail"]))
    return counts


def breakdowns(outcomes: list[SampleOutcome], dimensions: list[str]) -> dict[str, dict[str, Any]]:
    """Counts and rates per dimension: overall and by variant, persona and topic (completed sessions only)."""
    result: dict[str, dict[str, Any]] = {}
    for dim in dimensions:
        d: dict[str, Any] = {"overall": _empty_counts(), **{key: defaultdict(_empty_counts) for key in BREAKDOWNS}}
        for o in outcomes:
            outcome = o.outcome(dim)
            if outcome not in ("pass", "fail", "error", "skipped", "simulator_error"):
                continue
            for counts in (d["overall"], *(d[key][getattr(o.sample, attr)] for key, attr in BREAKDOWNS.items())):
                counts[outcome] += 1
        _finish(d["overall"])
        for key in BREAKDOWNS:
            d[key] = {name: _finish(c) for name, c in d[key].items()}
        result[dim] = d
    return result


def simulator_errors(outcomes: list[SampleOutcome], judges: list[str]) -> Optional[dict[str, Any]]:
    """Sessions a simulator judge flagged, overall and per persona (None when no simulator judge ran).

    A persona with a high share does not work as written: fix the persona, not the tutor.
    """
    used = [j for j in judges if j in SIMULATOR_JUDGES]
    if not used:
        return None

    def counts(items: list[SampleOutcome]) -> dict[str, Any]:
        judged = [o for o in items if any(o.outcome(j) in ("pass", "fail") for j in used)]
        flagged = sum(1 for o in judged if o.simulator_error)
        return {"flagged": flagged, "judged": len(judged), "share": flagged / len(judged) if judged else None}

    personas = list(dict.fromkeys(o.sample.persona for o in outcomes))
    return {
        "judges": used,
        "overall": counts(outcomes),
        "by_persona": {p: counts([o for o in outcomes if o.sample.persona == p]) for p in personas},
        "sessions": [o.session_id for o in outcomes if o.status == "completed" and o.simulator_error],
    }


def turn_breakdowns(store: RunStore, outcomes: list[SampleOutcome], per_turn_judges: list[str]) -> dict[str, Any]:
    """For every per-turn judge: at which turn sessions first fail, and the share of turns that pass.

    Only sessions whose session verdict counts (pass or fail; no simulator error) are included.
    """
    if not per_turn_judges:
        return {}
    by_session: dict[tuple[str, str], list] = defaultdict(list)
    for j in store.turn_judgements():
        if j.judge_sample == 0:
            by_session[(j.session_id, j.judge)].append(j)
    result: dict[str, Any] = {}
    for judge in per_turn_judges:
        counted = [o for o in outcomes if o.outcome(judge) in ("pass", "fail")]
        first: dict[str, int] = defaultdict(int)
        turns_judged = turns_passed = 0
        for o in counted:
            turns = by_session.get((o.session_id, judge), [])
            ok = [t for t in turns if t.status == "ok"]
            turns_judged += len(ok)
            turns_passed += sum(1 for t in ok if t.passed)
            failing = first_failing_turn(turns)
            first[str(failing) if failing is not None else "none"] += 1
        result[judge] = {
            "sessions": len(counted),
            "first_failing_turn": dict(sorted(first.items(), key=lambda kv: (kv[0] == "none", int(kv[0]) if kv[0] != "none" else 0))),
            "turns_judged": turns_judged,
            "turn_pass_share": turns_passed / turns_judged if turns_judged else None,
        }
    return result


def variant_comparisons(outcomes: list[SampleOutcome], variants: list[str], baseline: str,
                        dimensions: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every other variant against the baseline on every dimension, paired by pair key, one Holm family."""
    base = by_pair_key(outcomes, baseline)
    matchups = {v: (base, by_pair_key(outcomes, v)) for v in variants if v != baseline}
    return {
        v: {dim: {"baseline": baseline, **c.as_dict()} for dim, c in per_dim.items()}
        for v, per_dim in compare_matchups(matchups, dimensions).items()
    }


def consistency(outcomes: list[SampleOutcome], variants: list[str], dimensions: list[str],
                repeats: int) -> dict[str, dict[str, list[dict]]]:
    """pass^j for j = 1..repeats per variant and dimension, averaged over the variant's cells."""
    out: dict[str, dict[str, list[dict]]] = {}
    for variant in variants:
        out[variant] = {}
        for dim in dimensions:
            cells: dict[tuple[str, str], list[bool]] = defaultdict(list)
            for o in outcomes:
                passed = o.passed(dim)
                if o.sample.variant == variant and passed is not None:
                    cells[(o.sample.topic, o.sample.persona)].append(passed)
            out[variant][dim] = pass_hat(((len(v), sum(v)) for v in cells.values()), repeats)
    return out


def build_summary(store: RunStore) -> dict[str, Any]:
    """The summary of a run as a JSON-ready dict (docs/report.md describes every field)."""
    run = store.run() or {}
    matrix = json.loads(run.get("matrix_json") or "{}")
    tutor = matrix.get("tutor") or {}
    judges = (matrix.get("judges") or {}).get("use") or []
    outcomes = load_outcomes(store)
    variants = list(tutor.get("variants") or dict.fromkeys(o.sample.variant for o in outcomes))
    baseline = tutor.get("baseline") or (variants[0] if variants else None)
    repeats = int(matrix.get("repeats") or max((o.sample.repeat for o in outcomes), default=1))
    sessions = store.latest_sessions()
    planned = len(outcomes)
    completed = sum(1 for s in sessions if s["status"] == "completed")
    errored = sum(1 for s in sessions if s["status"] == "errored")
    summary = {
        "summary_version": SUMMARY_VERSION,
        "simbench_version": __version__,
        "run_id": run.get("run_id"),
        "matrix": run.get("matrix_name"),
        "matrix_source": run.get("matrix_source"),
        "status": run.get("status"),
        "baseline": baseline,
        "variants": variants,
        "repeats": repeats,
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
        "statistics": STATISTICS,
        "dimensions": breakdowns(outcomes, judges),
        "simulator_errors": simulator_errors(outcomes, judges),
        "turns": turn_breakdowns(store, outcomes, [name for name in judges if
                                                   ((matrix.get("judges") or {}).get("custom") or {}).get(name, {}).get("scope") == "turn"]),
        "comparisons": variant_comparisons(outcomes, variants, baseline, judges) if baseline else {},
        "consistency": consistency(outcomes, variants, judges, repeats),
        "usage": usage_totals(store, {name: m["price"] for name, m in (matrix.get("models") or {}).items()
                                      if m.get("price")}),
    }
    samples = store.setting(JUDGE_SAMPLES_SETTING, 1)
    if samples > 1:  # --judge-samples N
        summary["judge_consistency"] = {
            "samples": samples, "temperature": store.setting(JUDGE_TEMPERATURE_SETTING),
            "dimensions": judge_consistency(store, judge_choices(_definitions(matrix)), samples),
        }
    label_map = store.setting(MAP_SETTING)
    if label_map is not None:  # a run of `simbench calibrate`
        summary["calibration"] = calibration(store, judge_choices(_definitions(matrix)), label_map,
                                             store.setting(MIN_KAPPA_SETTING))
    return summary


def judge_consistency(store: RunStore, choices: dict[str, list[str]], samples: int) -> dict[str, dict[str, Any]]:
    """How often the N samples of each judge agree on a session (latest completed attempts only).

    ``rated``: sessions all N samples gave a label to; ``unanimous``/``unanimous_share``: of those,
    the ones whose samples all agree; ``fleiss_kappa`` over them; ``unstable``: sessions whose
    samples that gave a label disagree (whatever their number); ``incomplete``: sessions where a
    sample gave no label (error or skipped).
    """
    latest = {s["session_id"] for s in store.latest_sessions() if s["status"] == "completed"}
    by_dim: dict[str, list] = defaultdict(list)
    for (session_id, dim), v in verdicts(store).items():
        if session_id in latest:
            by_dim[dim].append(v)
    out = {}
    for dim, labels in choices.items():
        vs = by_dim.get(dim, [])
        rated = [v for v in vs if sum(v.votes.values()) == samples]
        unanimous = sum(1 for v in rated if len(v.votes) == 1)
        out[dim] = {
            "rated": len(rated),
            "unanimous": unanimous,
            "unanimous_share": unanimous / len(rated) if rated else None,
            "fleiss_kappa": fleiss_kappa([[v.votes.get(l, 0) for l in labels] for v in rated]),
            "unstable": sum(1 for v in vs if v.unstable),
            "incomplete": sum(1 for v in vs if sum(v.votes.values()) < samples),
        }
    return out


def _definitions(matrix: dict[str, Any]) -> list:
    """The judge definitions (built-in and custom) of a run's stored matrix."""
    from ..matrix import JudgesSpec

    return JudgesSpec.model_validate(matrix.get("judges") or {}).definitions()


def judge_choices(definitions: list) -> dict[str, list[str]]:
    """The labels of each judge (``JudgeDefinition``s: built-in or custom), in the judge's order."""
    return {d.name: list(d.choices) for d in definitions}


def usage_totals(store: RunStore, prices: Optional[dict[str, dict[str, float]]] = None) -> dict[str, dict[str, Any]]:
    """Calls, retries, tokens, model time and (where the matrix prices a model) cost per role.

    ``prices`` maps a model name to ``{input, output}`` dollars per million tokens. Cached calls cost
    nothing; ``cost_usd`` is None when a role used a model without a price.
    """
    totals: dict[str, dict[str, Any]] = {}
    for roles in store.usage_by_session().values():
        for role, u in roles.items():
            t = totals.setdefault(role, {k: 0 for k in u})
            for k, v in u.items():
                t[k] += v or 0
    for t in totals.values():
        t["latency_s"] = round(t["latency_s"], 3)
        t["cost_usd"] = 0.0
    prices = prices or {}
    for row in store.usage_by_model():
        t = totals.get(row["role"])
        if t is None or row["cached"]:
            continue
        price = prices.get(row["model"])
        if price is None or t["cost_usd"] is None:
            t["cost_usd"] = None
            continue
        t["cost_usd"] += ((row["prompt_tokens"] or 0) * price["input"] + (row["completion_tokens"] or 0) * price["output"]) / 1e6
    for t in totals.values():
        if t["cost_usd"] is not None:
            t["cost_usd"] = round(t["cost_usd"], 6)
    return totals


def write_summary(summary: dict[str, Any], run_dir: Path) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
