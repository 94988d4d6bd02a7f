"""Reasoning models (OpenAI's gpt-5 and o-series) on the wire, against a fake that answers as OpenAI does.

OpenAI refuses ``max_tokens`` and any temperature but 1 from these models with HTTP 400, and a model
that reasons spends part of its ``max_completion_tokens`` before it writes a word: with too small a
limit the answer is empty (finish_reason ``length``). Every role (tutor, student, judges) must send
what such a model takes, and an answer cut off before any text must error its session with the fix.
"""

from __future__ import annotations

import sqlite3

import pytest

from conftest import base_matrix, run_cli

REASONING_ID = "gpt-5.4-mini"
BUDGET = 4096  # models.NAME.reasoning_budget's default


def _matrix(fake, **model_fields) -> dict:
    matrix = base_matrix(fake.base_url)
    matrix["models"]["fake"].update({"model": REASONING_ID, **model_fields})
    return matrix


def test_every_role_sends_what_a_reasoning_model_takes(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake(reasoning_prefixes=("gpt-5",), reasoning_tokens=300)
    out = tmp_path / "run"
    result = run_cli(write_matrix(_matrix(fake)), out, "--no-cache")
    assert result.exit_code == 0, result.output
    assert fake.statuses[400] == 0 and fake.statuses[200] == fake.chat_calls

    by_role: dict[str, list[dict]] = {}
    for request in fake.requests:
        by_role.setdefault(fake.role_of(request), []).append(request)
    assert set(by_role) == {"tutor", "student", "judge"}
    for role, requests in by_role.items():
        for request in requests:
            assert "max_tokens" not in request and "temperature" not in request, (role, request)
            assert request["max_completion_tokens"] == 64 + BUDGET, role  # base_matrix's max_tokens: 64 per role

    run = open_run(out)
    assert {s["status"] for s in run.sessions()} == {"completed"}
    assert {j["status"] for j in run.judgements()} == {"ok"}
    # the reasoning tokens are paid for: they count in every call's completion tokens
    with sqlite3.connect(out / "run.sqlite") as db:
        tokens = [row[0] for row in db.execute("SELECT completion_tokens FROM calls")]
    assert len(tokens) == fake.chat_calls and min(tokens) >= 300


def test_a_model_id_that_hides_it_is_declared_a_reasoning_model(make_fake, write_matrix, tmp_path):
    """An Azure deployment (or a proxy) names the model its own way: ``reasoning: true`` says what it is."""
    fake = make_fake(reasoning_prefixes=("tutor-deployment",))
    matrix = _matrix(fake, model="tutor-deployment-7", reasoning=True, reasoning_budget=1000)
    result = run_cli(write_matrix(matrix), tmp_path / "run", "--no-cache")
    assert result.exit_code == 0, result.output
    assert {r.get("max_completion_tokens") for r in fake.requests} == {64 + 1000}
    assert not any("max_tokens" in r or "temperature" in r for r in fake.requests)


def test_a_chat_model_keeps_max_tokens_and_its_temperature(make_fake, write_matrix, tmp_path):
    """``reasoning: false`` (or an id that is not a reasoning model's) sends what chat models take."""
    fake = make_fake()
    matrix = _matrix(fake, reasoning=False)
    result = run_cli(write_matrix(matrix), tmp_path / "run", "--no-cache")
    assert result.exit_code == 0, result.output
    temperatures = {fake.role_of(r): r["temperature"] for r in fake.requests}
    assert temperatures == {"tutor": 0.7, "student": 0.8, "judge": 0.0}
    assert {r["max_tokens"] for r in fake.requests} == {64}
    assert not any("max_completion_tokens" in r for r in fake.requests)


def test_an_answer_cut_off_while_reasoning_errors_the_session_and_names_the_fix(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake(reasoning_prefixes=("gpt-5",), reasoning_tokens=300)
    out = tmp_path / "run"
    result = run_cli(write_matrix(_matrix(fake, reasoning_budget=0)), out, "--no-cache")
    assert result.exit_code == 3, result.output
    errors = [s["error"] for s in open_run(out).sessions()]
    expected = ("tutor call failed: the answer was cut off before any text (max_completion_tokens 64 reached, "
                "64 of them reasoning): raise models.fake.reasoning_budget or the role's max_tokens")
    assert errors and all(e == expected for e in errors), errors
    assert "every session errored" in result.output and "cut off before any text" in result.output


@pytest.mark.parametrize("where", ["tutor", "variant", "student", "judges"])
def test_a_temperature_set_for_a_reasoning_model_is_a_validation_error(make_fake, write_matrix, tmp_path, where):
    fake = make_fake()
    matrix = _matrix(fake)
    if where == "variant":
        matrix["tutor"]["variants"]["direct"] = {"prompt": "Explain {{ topic.name }}.", "temperature": 0.2}
        field = "tutor.variants.direct.temperature"
    else:
        matrix[where]["temperature"] = 0.2
        field = f"{where}.temperature"
    result = run_cli(write_matrix(matrix), tmp_path / "run", "--no-cache")
    assert result.exit_code == 2, result.output
    assert f"{field}: model 'fake' ({REASONING_ID}) is a reasoning model, which takes no temperature" in result.output
    assert "matrix.yaml:" in result.output
    assert fake.chat_calls == 0


def test_a_judge_temperature_for_a_reasoning_judge_is_refused_before_any_call(make_fake, write_matrix, tmp_path):
    fake = make_fake()
    out = tmp_path / "run"
    result = run_cli(write_matrix(_matrix(fake)), out, "--no-cache", "--judge-samples", "3",
                     "--judge-temperature", "0.7")
    assert result.exit_code == 2, result.output
    assert "--judge-temperature: the judges' model 'fake' is a reasoning model" in result.output
    assert fake.chat_calls == 0 and not out.exists()


def test_a_chat_served_thinking_model_cut_off_says_to_raise_max_tokens(make_fake, write_matrix, tmp_path, open_run):
    """A thinking model behind a chat endpoint (no reasoning model by its id) that runs out of
    max_tokens while thinking: the session errors, and the message names both ways out."""
    fake = make_fake(thinking_tokens=100)
    out = tmp_path / "run"
    result = run_cli(write_matrix(_matrix(fake, model="qwen3-8b")), out, "--no-cache")
    assert result.exit_code == 3, result.output
    errors = {s["error"] for s in open_run(out).sessions()}
    assert errors == {"tutor call failed: the answer was cut off before any text (max_tokens 64 reached, 64 of "
                      "them reasoning): raise the role's max_tokens (or set models.fake.reasoning: true for a "
                      "reasoning model)"}, errors
