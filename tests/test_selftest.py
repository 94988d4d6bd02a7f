"""``simbench selftest`` against a fake judge that answers right, and one that answers wrong."""

from __future__ import annotations

import json

import pytest

from conftest import base_matrix, invoke
from fake_openai import judge_name
from simbench.evaluators.builtin import BUILTIN
from simbench.selftest import selftest_cases


def _cases() -> list[dict]:
    return [json.loads(line) for line in selftest_cases().read_text(encoding="utf-8").splitlines() if line.strip()]


def _right_answers(prompt: str, labels: list[str]) -> str:
    """What a judge that can do the job answers: the case's expected label, else the passing one."""
    for case in _cases():
        first_tutor = next(m["content"] for m in case["messages"] if m["role"] == "assistant")
        if first_tutor in prompt:
            return case["labels"].get(judge_name(prompt), labels[0])
    raise AssertionError("a judge prompt without a selftest case in it")


def _matrix(fake, write_matrix):
    matrix = base_matrix(fake.base_url)
    matrix["models"]["other"] = dict(matrix["models"]["fake"])
    return write_matrix(matrix)


def test_the_cases_cover_every_builtin_judge_and_each_fails_one_property():
    cases = {c["session_id"]: c for c in _cases()}
    assert set(cases) == {"clean", "contradiction", "tangents", "impatient", "wrong_answer_confirmed"}
    passing = {name: d.pass_labels() for name, d in BUILTIN.items()}
    assert all(label in passing[dim] for dim, label in cases["clean"]["labels"].items())
    assert set(cases["clean"]["labels"]) == set(BUILTIN)
    for name, case in cases.items():
        assert all(label in BUILTIN[dim].choices for dim, label in case["labels"].items())
        if name != "clean":
            [(dim, label)] = case["labels"].items()
            assert label not in passing[dim], name
            assert case["metadata"]["reference"] and case["metadata"]["goal"]
    assert {d for c in cases.values() if c["session_id"] != "clean" for d in c["labels"]} == set(BUILTIN)


def test_a_judge_that_answers_right_passes(make_fake, write_matrix, tmp_path):
    fake = make_fake(judge_label=_right_answers)
    result = invoke("selftest", "--matrix", _matrix(fake, write_matrix), "--model", "other", "-q",
                    "--out", tmp_path / "st", "--cache", tmp_path / "c.sqlite")
    assert result.exit_code == 0, result.output
    assert "8/8 checks passed" in result.output
    assert "MISSED" not in result.output and "expected to fail" not in result.output
    assert "judge model: other" in result.output
    assert fake.roles["judge"] == 5 * 4  # every built-in judge on every case
    assert (tmp_path / "st" / "report.html").exists()


def test_a_judge_that_answers_wrong_fails_and_the_table_shows_where(make_fake, write_matrix, tmp_path):
    fake = make_fake(judge_label=lambda prompt, labels: labels[0])  # always the passing label
    result = invoke("selftest", "--matrix", _matrix(fake, write_matrix), "-q", "--out", tmp_path / "st",
                    "--cache", tmp_path / "c.sqlite")
    assert result.exit_code == 1, result.output
    rows = {tuple(line.split()[:2]): line.split() for line in result.output.splitlines()
            if line.split() and line.split()[-1] in ("ok", "MISSED")}
    assert rows[("contradiction", "coherence")][2:] == ["incoherent", "coherent", "MISSED"]
    assert rows[("tangents", "goal_completion")][2:] == ["not_met", "met", "MISSED"]
    assert rows[("impatient", "frustration")][2:] == ["frustrated", "not_frustrated", "MISSED"]
    assert rows[("wrong_answer_confirmed", "correctness")][2:] == ["incorrect", "correct", "MISSED"]
    assert all(rows[("clean", dim)][-1] == "ok" for dim in BUILTIN)
    assert len(rows) == 8
    assert "4/8 checks passed" in result.output
    assert "missed 4 check(s)" in result.output


def test_a_judge_error_is_a_miss_not_a_pass(make_fake, write_matrix, tmp_path):
    fake = make_fake(judge_reply=lambda prompt, labels: "not json at all")
    result = invoke("selftest", "--matrix", _matrix(fake, write_matrix), "-q", "--out", tmp_path / "st",
                    "--no-cache")
    assert result.exit_code == 1, result.output
    assert "0/8 checks passed" in result.output
    assert result.output.count("error") >= 8


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt"], "--model gpt: no such model"),
])
def test_unknown_model_is_an_input_error(fake, write_matrix, tmp_path, args, message):
    result = invoke("selftest", "--matrix", _matrix(fake, write_matrix), *args, "-q", "--out", tmp_path / "st")
    assert result.exit_code == 2
    assert message in result.output
    assert fake.chat_calls == 0
