"""The simulator-fidelity judge: scripted students that break character or solve the problem unaided
are flagged, and their sessions leave the tutor's rates and both sides of comparisons."""

from __future__ import annotations

import pytest
import yaml

from conftest import base_matrix, invoke, run_cli
from simbench.evaluators.builtin import SIMULATOR_FIDELITY
from simbench.matrix import parse_matrix

FIDELITY = "checking a SIMULATED student"
BREAKS = "As your tutor, let me explain the whole method"   # the student teaches
SOLVES = "I worked it out myself: 3/6 + 2/6 = 5/6"          # the student solves it before any help


def _student(request: dict) -> str:
    """Scripted students: one breaks character whatever the tutor does; one solves the problem unaided,
    but only against the direct variant (so its pair is flagged on one side only); others behave."""
    system = request["messages"][0]["content"]
    last_tutor = [m["content"] for m in request["messages"] if m["role"] == "user"][-1]
    if "SCRIPT-TEACHER" in system:
        return f"{BREAKS}: add the numerators."
    if "SCRIPT-SOLVER" in system and last_tutor.startswith("DIRECT"):
        return SOLVES
    return "ok"


def _tutor(request: dict) -> str:
    return "DIRECT: use a common denominator." if "Explain clearly" in request["messages"][0]["content"] \
        else "SOCRATIC: what do 2 and 3 have in common?"


def _judge(prompt: str, labels: list[str]) -> str:
    if FIDELITY in prompt:
        # a stand-in for a real judge model: flag a student who teaches or solves unaided
        return "out_of_character" if (BREAKS in prompt or SOLVES in prompt) else "in_character"
    return labels[1]  # every tutor judgement fails: a flagged session must not add to the tutor's failures


def _matrix(url: str) -> dict:
    personas = [
        "terse",
        {"name": "teacher", "description": "SCRIPT-TEACHER a student", "traits": ["quiet"]},
        {"name": "solver", "description": "SCRIPT-SOLVER a student", "traits": ["quiet"]},
    ]
    m = base_matrix(url, personas=personas, max_turns=1)
    m["judges"]["use"] = ["coherence", "simulator_fidelity"]
    return m


def test_flagged_sessions_leave_the_tutor_rates_and_both_sides_of_comparisons(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake(tutor=_tutor, student=_student, judge_label=_judge)
    path = write_matrix(_matrix(fake.base_url))
    out = tmp_path / "run"
    result = run_cli(path, out, "--cache", tmp_path / "cache.sqlite")
    assert result.exit_code == 0, result.output

    run = open_run(out)
    key = {s["session_id"]: (s["variant"], s["persona"]) for s in run.sessions()}
    fidelity = {key[j["session_id"]]: j["label"] for j in run.judgements() if j["judge"] == "simulator_fidelity"}
    assert fidelity == {
        ("socratic", "terse"): "in_character", ("direct", "terse"): "in_character",
        ("socratic", "teacher"): "out_of_character", ("direct", "teacher"): "out_of_character",
        ("socratic", "solver"): "in_character", ("direct", "solver"): "out_of_character",
    }
    # the fidelity judge read the persona it was told to play
    prompts = ["\n".join(m["content"] for m in r["messages"]) for r in fake.requests_of("judge")]
    assert any(FIDELITY in p and "teacher: SCRIPT-TEACHER a student" in p for p in prompts)

    summary = run.summary()
    coherence = summary["dimensions"]["coherence"]
    # 6 sessions, 3 flagged: only the 3 others count for the tutor (all failed by the script)
    assert coherence["overall"]["judged"] == 3 and coherence["overall"]["fail"] == 3
    assert coherence["overall"]["simulator_error"] == 3
    assert coherence["by_persona"]["teacher"]["judged"] == 0 and coherence["by_persona"]["teacher"]["simulator_error"] == 2
    assert coherence["by_persona"]["solver"]["judged"] == 1
    # the fidelity dimension itself is not masked
    assert summary["dimensions"]["simulator_fidelity"]["overall"]["judged"] == 6

    sim = summary["simulator_errors"]
    assert sim["overall"] == {"flagged": 3, "judged": 6, "share": 0.5}
    assert sim["by_persona"]["teacher"]["share"] == 1.0 and sim["by_persona"]["terse"]["share"] == 0.0
    assert sim["by_persona"]["solver"] == {"flagged": 1, "judged": 2, "share": 0.5}
    assert len(sim["sessions"]) == 3

    # direct vs socratic on coherence: the teacher pair (flagged on both sides) and the solver pair (flagged on
    # the direct side only) both drop out; only terse pairs.
    comparison = summary["comparisons"]["direct"]["coherence"]
    assert comparison["dropped"] == 2
    assert comparison["n"] == 1 and comparison["both_fail"] == 1

    html = (out / "report.html").read_text()
    assert "Simulator errors" in html and "simulator error" in html
    assert "simulator errors: 3/6" in result.stdout


def test_the_fidelity_judge_is_opt_in_and_validates(fake):
    m = base_matrix(fake.base_url)
    del m["judges"]["use"]
    assert "simulator_fidelity" not in parse_matrix(yaml.safe_dump(m)).judges.use
    m["judges"]["use"] = ["simulator_fidelity"]
    matrix = parse_matrix(yaml.safe_dump(m))
    assert matrix.judges.definition("simulator_fidelity") is SIMULATOR_FIDELITY
    assert SIMULATOR_FIDELITY.requires == ("persona",)
    assert SIMULATOR_FIDELITY.pass_labels() == frozenset({"in_character"})


def test_a_custom_judge_cannot_take_the_fidelity_judges_name(fake, write_matrix):
    m = base_matrix(fake.base_url)
    m["judges"]["custom"] = {"simulator_fidelity": {"prompt": "{transcript}", "choices": {"a": 1, "b": 0}}}
    result = invoke("validate", write_matrix(m))
    assert result.exit_code == 2 and "built-in" in result.stderr
