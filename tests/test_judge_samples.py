"""--judge-samples N: each judge asked N times per session, keyed apart, majority label, unstable marked."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import base_matrix, invoke, run_cli
from fake_openai import judge_name
from simbench.records import Judgement
from simbench.reports.agreement import fleiss_kappa
from simbench.reports.outcomes import verdict_of


def _j(sample: int, label, status: str = "ok", score: float = None) -> Judgement:
    scores = {"coherent": 1.0, "incoherent": 0.0}
    return Judgement("s", "coherence", "m", sample, status, label, scores.get(label) if score is None else score,
                     label == "coherent" if label else None, f"sample {sample}", None if status == "ok" else "boom")


def test_verdict_is_the_majority_and_marks_disagreement():
    v = verdict_of([_j(0, "incoherent"), _j(1, "coherent"), _j(2, "coherent")])
    assert (v.label, v.passed, v.unstable, v.votes, v.samples) == ("coherent", True, True, {"incoherent": 1, "coherent": 2}, 3)
    assert v.explanation == "sample 1"  # the first sample that gave the majority label
    v = verdict_of([_j(0, "coherent"), _j(1, "coherent")])
    assert (v.label, v.unstable) == ("coherent", False)


def test_a_tie_goes_to_the_lower_scored_label():
    v = verdict_of([_j(0, "coherent"), _j(1, "incoherent")])
    assert (v.label, v.passed, v.unstable) == ("incoherent", False, True)


def test_errors_among_samples_do_not_vote_and_no_label_keeps_the_error():
    v = verdict_of([_j(0, None, "error"), _j(1, "incoherent"), _j(2, None, "error")])
    assert (v.status, v.label, v.unstable, v.samples) == ("ok", "incoherent", False, 3)
    v = verdict_of([_j(1, None, "error"), _j(0, None, "skipped")])
    assert (v.status, v.label) == ("skipped", None)  # sample 0's status


def test_one_sample_is_unchanged():
    v = verdict_of([_j(0, "incoherent")])
    assert (v.label, v.passed, v.unstable, v.judge_sample) == ("incoherent", False, False, 0)


# -- end to end ---------------------------------------------------------------------------------------


def _session(marker: str) -> str:
    return json.dumps({"session_id": marker, "metadata": {"reference": "5/6"}, "messages": [
        {"role": "user", "content": "What is 1/2 + 1/3?"},
        {"role": "assistant", "content": f"<<{marker}>> Use sixths: 3/6 + 2/6."}]})


def _scripted_judge():
    """coherence: session a gets one dissenting sample of three, b always fails, c always passes."""
    seen: Counter = Counter()

    def label(prompt: str, labels: list[str]) -> str:
        marker = prompt.split("<<")[1].split(">>")[0]
        if judge_name(prompt) != "coherence":
            return labels[0]
        seen[marker] += 1
        return {"a": labels[1] if seen[marker] == 2 else labels[0], "b": labels[1], "c": labels[0]}[marker]

    return label


def test_judge_samples_on_imported_transcripts(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake(judge_label=_scripted_judge())
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(_session(m) for m in "abc") + "\n", encoding="utf-8")
    matrix = write_matrix(base_matrix(fake.base_url))
    out = tmp_path / "run"
    args = ["judge", "--transcripts", path, "--matrix", matrix, "-q", "--cache", tmp_path / "c.sqlite",
            "--judge-samples", "3"]
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.output

    # Every judge asked 3 times per session, at the default sampling temperature, stored apart.
    judge_requests = fake.requests_of("judge")
    assert len(judge_requests) == 3 * 2 * 3
    assert {r["temperature"] for r in judge_requests} == {0.7}
    run = open_run(out)
    rows = run.judgements()
    assert Counter((r["session_id"], r["judge"]) for r in rows) == {k: 3 for k in {(r["session_id"], r["judge"]) for r in rows}}
    assert {r["judge_sample"] for r in rows} == {0, 1, 2}

    summary = run.summary()
    jc = summary["judge_consistency"]
    assert (jc["samples"], jc["temperature"]) == (3, 0.7)
    coherence = jc["dimensions"]["coherence"]
    assert (coherence["rated"], coherence["unanimous"], coherence["unstable"], coherence["incomplete"]) == (3, 2, 1, 0)
    assert coherence["unanimous_share"] == pytest.approx(2 / 3)
    assert coherence["fleiss_kappa"] == pytest.approx(fleiss_kappa([[2, 1], [0, 3], [3, 0]]))
    assert jc["dimensions"]["correctness"]["unanimous_share"] == 1.0
    assert jc["dimensions"]["correctness"]["fleiss_kappa"] is None  # one label throughout: undefined
    # Rates use the majority: a passes (2 of 3), b fails, c passes.
    overall = summary["dimensions"]["coherence"]["overall"]
    assert (overall["pass"], overall["fail"]) == (2, 1)

    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="judge-consistency"' in html
    assert html.count("coherence: coherent (unstable)") == 1
    assert "coherence:@unstable" in html

    # The samples are keyed apart in the cache: the same command again costs no call and gets the same 3 answers.
    again = invoke(*args, "--out", tmp_path / "run2")
    assert again.exit_code == 0, again.output
    assert len(fake.requests_of("judge")) == 3 * 2 * 3
    assert open_run(tmp_path / "run2").summary()["judge_consistency"] == jc


def test_run_with_judge_samples_and_an_explicit_temperature(fake, write_matrix, tmp_path, open_run):
    out = tmp_path / "run"
    result = run_cli(write_matrix(base_matrix(fake.base_url)), out, "--cache", tmp_path / "c.sqlite",
                     "--judge-samples", "2", "--judge-temperature", "1.1")
    assert result.exit_code == 0, result.output
    assert fake.roles["judge"] == 2 * 2 * 2  # sessions x judges x samples
    assert {r["temperature"] for r in fake.requests_of("judge")} == {1.1}
    summary = open_run(out).summary()
    assert summary["judge_consistency"]["samples"] == 2
    assert summary["judge_consistency"]["dimensions"]["coherence"]["unanimous_share"] == 1.0


def test_one_sample_keeps_the_matrix_temperature_and_adds_no_section(fake, write_matrix, tmp_path, open_run):
    out = tmp_path / "run"
    result = run_cli(write_matrix(base_matrix(fake.base_url)), out, "--cache", tmp_path / "c.sqlite")
    assert result.exit_code == 0, result.output
    assert {r["temperature"] for r in fake.requests_of("judge")} == {0.0}
    assert "judge_consistency" not in open_run(out).summary()
    assert 'id="judge-consistency"' not in (out / "report.html").read_text(encoding="utf-8")


def test_judge_samples_must_be_positive(fake, write_matrix, tmp_path):
    result = run_cli(write_matrix(base_matrix(fake.base_url)), tmp_path / "run", "--judge-samples", "0")
    assert result.exit_code == 2 and "--judge-samples" in result.output
    assert fake.chat_calls == 0
