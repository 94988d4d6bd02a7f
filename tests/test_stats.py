"""The report's statistics against published values, scipy, and hand-computed cases."""

from __future__ import annotations

import json
import math

import pytest
from scipy.stats import binomtest

from simbench.records import Judgement, Sample, SimulatedSession, session_id_for
from simbench.reports import stats
from simbench.reports.summary import SUMMARY_VERSION, build_summary
from simbench.store import RunStore

# -- Wilson interval ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, low, high",
    [  # Newcombe (1998), "Two-sided confidence intervals for the single proportion", method 3 (Wilson)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_published_values(k, n, low, high):
    lo, hi = stats.wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)


def test_wilson_interval_by_hand():
    # 5 of 10 at 95%: centre 0.5, half-width z*sqrt(n p q + z^2/4) / (n + z^2).
    z = 1.959963984540054
    half = z * math.sqrt(10 * 0.25 + z * z / 4) / (10 + z * z)
    lo, hi = stats.wilson_interval(5, 10)
    assert lo == pytest.approx(0.5 - half, abs=1e-9) and hi == pytest.approx(0.5 + half, abs=1e-9)


def test_wilson_interval_of_nothing_is_none():
    assert stats.wilson_interval(0, 0) is None
    assert stats.rate_fields(0, 0) == {"pass_rate": None, "pass_ci": None, "fail_rate": None, "fail_ci": None}


def test_fail_interval_mirrors_the_pass_interval():
    r = stats.rate_fields(3, 7)
    assert r["pass_rate"] == 0.3 and r["fail_rate"] == 0.7
    assert r["fail_ci"] == [pytest.approx(1 - r["pass_ci"][1], abs=1e-4), pytest.approx(1 - r["pass_ci"][0], abs=1e-4)]


# -- exact McNemar --------------------------------------------------------------------------------


@pytest.mark.parametrize("b, c", [(6, 16), (0, 5), (5, 0), (3, 3), (1, 12), (40, 25)])
def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs(b, c):
    assert stats.mcnemar_exact(b, c) == pytest.approx(binomtest(c, b + c, 0.5).pvalue, rel=1e-12)


def test_mcnemar_exact_known_values():
    # Cavo et al. (2012) in Fagerland, Lydersen & Laake: 6 vs 16 discordant pairs, exact conditional p = 0.052.
    assert stats.mcnemar_exact(6, 16) == pytest.approx(0.0525, abs=5e-5)
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 * 0.5**5)  # by hand: both tails of the extreme
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(4, 9) == stats.mcnemar_exact(9, 4)


# -- paired difference interval -------------------------------------------------------------------


def test_paired_interval_matches_published_value():
    # Cavo et al. (2012), Fagerland et al.'s Newcombe square-and-add interval for paired data:
    # table [[59, 6], [16, 80]] (rows: first measurement, columns: second) gives -0.0621 (-0.1186 to -0.0046)
    # for first minus second. Here rows are the baseline and the difference is variant minus baseline.
    lo, hi = stats.paired_difference_interval(59, 6, 16, 80)
    assert lo == pytest.approx(0.0046, abs=5e-5)
    assert hi == pytest.approx(0.1186, abs=5e-5)
    c = stats.compare_paired([(True, True)] * 59 + [(True, False)] * 6 + [(False, True)] * 16 + [(False, False)] * 80)
    assert c.diff == pytest.approx(10 / 161, abs=1e-4)
    assert c.ci == [pytest.approx(0.0046, abs=1e-4), pytest.approx(0.1186, abs=1e-4)]


def test_paired_interval_stays_in_range_and_contains_the_estimate():
    for table in [(0, 0, 10, 0), (10, 0, 0, 0), (0, 10, 0, 0), (3, 2, 4, 1), (0, 0, 0, 1)]:
        n = sum(table)
        lo, hi = stats.paired_difference_interval(*table)
        diff = (table[2] - table[1]) / n
        assert -1 <= lo <= diff <= hi <= 1, table


# -- Holm -----------------------------------------------------------------------------------------


def test_holm_by_hand():
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> kept monotone at 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_skips_non_tests_and_caps_at_one():
    adjusted = stats.holm([0.5, None, 0.2])
    assert adjusted[1] is None
    assert adjusted[2] == pytest.approx(0.4) and adjusted[0] == pytest.approx(0.5)  # 0.5 * 1, not below 0.4
    assert stats.holm([0.6, None, 0.7]) == [1.0, None, 1.0]  # 0.6 * 2 capped at 1; monotone after it
    assert stats.holm([]) == []


# -- pass^j ---------------------------------------------------------------------------------------


def test_pass_hat_on_a_constructed_example():
    # (usable repeats n, passes c) per cell; pass^j = mean over cells with n >= j of C(c, j) / C(n, j).
    cells = [(3, 3), (3, 2), (3, 0), (2, 1), (0, 0)]
    out = stats.pass_hat(cells, 3)
    assert [e["j"] for e in out] == [1, 2, 3]
    assert out[0]["pass_j"] == pytest.approx((1 + 2 / 3 + 0 + 1 / 2) / 4, abs=1e-4) and out[0]["cells"] == 4
    assert out[1]["pass_j"] == pytest.approx((1 + 1 / 3 + 0 + 0) / 4, abs=1e-4) and out[1]["cells"] == 4
    assert out[2]["pass_j"] == pytest.approx((1 + 0 + 0) / 3, abs=1e-4) and out[2]["cells"] == 3


def test_pass_hat_falls_for_a_tutor_that_fails_one_run_in_three():
    out = stats.pass_hat([(3, 2)] * 5, 3)
    assert [e["pass_j"] for e in out] == [pytest.approx(2 / 3, abs=1e-4), pytest.approx(1 / 3, abs=1e-4), 0.0]
    assert stats.pass_hat([], 2) == [{"j": 1, "pass_j": None, "cells": 0}, {"j": 2, "pass_j": None, "cells": 0}]


# -- comparisons and verdicts ---------------------------------------------------------------------


def test_pairs_with_no_verdict_on_either_side_drop_out_on_both():
    pairs = [(True, True), (False, True), (False, True), (None, True), (True, None), (None, None), (False, False)]
    c = stats.compare_paired(pairs)
    assert (c.n, c.dropped, c.both_pass, c.b, c.c, c.both_fail) == (4, 3, 1, 0, 2, 1)
    assert c.baseline_pass_rate == 0.25 and c.variant_pass_rate == 0.75
    assert c.diff == 0.5
    assert c.p == pytest.approx(binomtest(2, 2, 0.5).pvalue)


def _family(*tables):
    comps = [stats.compare_paired([(True, False)] * b + [(False, True)] * c + [(True, True)] * a) for a, b, c in tables]
    stats.apply_holm(comps)
    return comps


def test_verdicts_better_worse_and_no_difference():
    better, worse, same = _family((2, 0, 15), (2, 15, 0), (10, 3, 4))
    assert better.verdict == "better" and better.statement.startswith("better:")
    assert worse.verdict == "worse" and worse.diff < 0
    assert same.verdict == "no detectable difference"
    assert same.statement.startswith(f"no detectable difference with n = {same.n} pairs")
    assert "Holm" in better.statement and "95% CI" in better.statement


def test_holm_turns_a_lone_significant_result_into_noise_in_a_family():
    # 0 vs 7 discordant pairs: p = 2 / 2^7 = 0.0156 alone, 0.0625 after Holm over four such tests.
    (alone,) = _family((0, 0, 7))
    assert alone.p == pytest.approx(0.015625) and alone.verdict == "better"
    family = _family(*[(0, 0, 7)] * 4)
    assert all(c.p_holm == pytest.approx(0.0625) for c in family)
    assert all(c.verdict == "no detectable difference" for c in family)


def test_nothing_to_compare():
    (c,) = _family((0, 0, 0))
    assert c.verdict == "not compared" and c.p is None and c.p_holm is None
    c = stats.compare_paired([(None, True), (True, None)])
    stats.apply_holm([c])
    assert c.verdict == "not compared" and "2 pair(s) dropped" in c.statement


# -- pairing in a run's summary (errored sessions, judge errors, skips) ---------------------------

MATRIX_JSON = json.dumps({
    "name": "pairs", "tutor": {"baseline": "base", "variants": {"base": "b", "new": "n"}},
    "judges": {"use": ["coherence"]}, "repeats": 2,
})


def _store_with(tmp_path, outcomes: dict[tuple[str, str, int], str]) -> RunStore:
    """A run file with one session per sample: outcome is pass, fail, error, skipped or errored."""
    store = RunStore(tmp_path / "run.sqlite")
    store.create_run("r1", "pairs", "m.yaml", "fp", MATRIX_JSON, "test")
    samples = [Sample(v, "t", p, r) for (v, p, r) in outcomes]
    store.add_samples(samples)
    for sample, outcome in zip(samples, outcomes.values()):
        sid = session_id_for("r1", sample.sample_id, 1)
        session = SimulatedSession(sample, sid, 1, "errored" if outcome == "errored" else "completed")
        store.start_session(session)
        store.finish_session(session, None, [])
        if outcome == "errored":
            continue
        status = outcome if outcome in ("error", "skipped") else "ok"
        label = {"pass": "coherent", "fail": "incoherent"}.get(outcome)
        passed = None if status != "ok" else outcome == "pass"
        store.add_judgements([Judgement(sid, "coherence", "judge", 0, status, label, None, passed)], {})
    return store


def test_summary_drops_pairs_with_an_errored_session_or_a_judge_without_verdict(tmp_path):
    store = _store_with(tmp_path, {
        ("base", "p1", 1): "fail", ("new", "p1", 1): "pass",      # c
        ("base", "p1", 2): "fail", ("new", "p1", 2): "pass",      # c
        ("base", "p2", 1): "pass", ("new", "p2", 1): "pass",      # both pass
        ("base", "p2", 2): "errored", ("new", "p2", 2): "pass",   # dropped: baseline session errored
        ("base", "p3", 1): "pass", ("new", "p3", 1): "error",     # dropped: judge error on the variant
        ("base", "p3", 2): "skipped", ("new", "p3", 2): "fail",   # dropped: judge skipped the baseline
    })
    try:
        summary = build_summary(store)
    finally:
        store.close()
    assert summary["summary_version"] == SUMMARY_VERSION == 2
    c = summary["comparisons"]["new"]["coherence"]
    assert (c["n"], c["dropped"], c["both_pass"], c["b"], c["c"], c["both_fail"]) == (3, 3, 1, 0, 2, 0)
    assert c["baseline"] == "base" and c["diff"] == pytest.approx(2 / 3, abs=1e-4)
    assert c["verdict"] == "no detectable difference" and "n = 3 pairs" in c["statement"]

    # Rates count what was judged; errors and skips apart; the errored session not at all.
    base = summary["dimensions"]["coherence"]["by_variant"]["base"]
    assert (base["pass"], base["fail"], base["error"], base["skipped"], base["judged"]) == (2, 2, 0, 1, 4)
    assert base["pass_rate"] == 0.5 and base["pass_ci"] == [pytest.approx(0.15, abs=0.01), pytest.approx(0.85, abs=0.01)]
    new = summary["dimensions"]["coherence"]["by_variant"]["new"]
    assert (new["pass"], new["fail"], new["error"], new["judged"]) == (4, 1, 1, 5)
    assert summary["sessions"] == {"planned": 12, "completed": 11, "errored": 1, "not_run": 0, "superseded_attempts": 0}

    # pass^j per cell (variant, topic, persona) over usable repeats only.
    new_j = summary["consistency"]["new"]["coherence"]
    assert new_j[0] == {"j": 1, "pass_j": pytest.approx((1 + 1 + 0) / 3, abs=1e-4), "cells": 3}
    assert new_j[1] == {"j": 2, "pass_j": pytest.approx((1 + 1) / 2, abs=1e-4), "cells": 2}
