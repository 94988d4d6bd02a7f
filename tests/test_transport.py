"""The model transport seen from a run: failing endpoints, errors never cached, the response cache."""

from __future__ import annotations

import json
import sqlite3

from conftest import Fault, base_matrix, cache_entries, invoke, run_cli

BROKEN = "BROKEN: why is 0.1 + 0.2 not 0.3?"


def _one_variant(matrix: dict) -> dict:
    matrix["tutor"]["variants"] = {"socratic": matrix["tutor"]["variants"]["socratic"]}
    return matrix


# -- failing endpoints ----------------------------------------------------------------------------


def test_tutor_http_500_errors_every_session_and_exits_3(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake(fault=Fault(server_error=1.0))
    path = write_matrix(base_matrix(fake.base_url, personas=["impatient", "terse"]))
    out, cache = tmp_path / "run", tmp_path / "c.sqlite"
    result = run_cli(path, out, "--cache", cache)
    assert result.exit_code == 3, result.output
    assert "errored" in result.stderr

    run = open_run(out)
    sessions = run.sessions()
    assert len(sessions) == 4
    for s in sessions:
        assert s["status"] == "errored"
        assert s["error"] and "500" in s["error"]
    assert fake.roles["tutor"] >= 4
    assert fake.roles["student"] == 0 and fake.roles["judge"] == 0
    assert run.judgements() == []

    summary = run.summary()
    assert summary["sessions"] == {**summary["sessions"], "planned": 4, "completed": 0, "errored": 4}
    assert {e["session_id"] for e in summary["errors"]} == {s["session_id"] for s in sessions}
    assert all(e["error"] for e in summary["errors"])
    for dim in summary["dimensions"].values():
        assert dim["overall"]["pass"] == dim["overall"]["fail"] == dim["overall"]["error"] == 0
    assert (out / "report.html").is_file()
    # The failed answers were not cached.
    assert cache_entries(cache) == 0


def test_one_failing_conversation_is_recorded_and_not_judged(make_fake, write_matrix, tmp_path, open_run):
    # (role first: a judge request has one message, and a crash of this check failed every judge call)
    fake = make_fake(fail_when=lambda request: fake.role_of(request) == "tutor"
                     and request["messages"][1]["content"] == BROKEN)
    topics = [
        {"name": "fractions", "opening": "Why isn't 1/2 + 1/3 equal to 2/5?", "reference": "5/6"},
        {"name": "floats", "opening": BROKEN, "reference": "binary fractions round"},
    ]
    path = write_matrix(_one_variant(base_matrix(fake.base_url, topics=topics)))
    out = tmp_path / "run"
    result = run_cli(path, out, "--cache", tmp_path / "c.sqlite")
    assert result.exit_code == 0, result.output  # one session completed: the run itself finished

    run = open_run(out)
    by_topic = {s["topic"]: s for s in run.sessions()}
    assert by_topic["fractions"]["status"] == "completed"
    broken = by_topic["floats"]
    assert broken["status"] == "errored" and "500" in broken["error"]
    assert broken["stop_reason"] == "error"

    judged = {j["session_id"] for j in run.judgements()}
    assert judged == {by_topic["fractions"]["session_id"]}
    for request in fake.requests_of("judge"):
        assert BROKEN not in json.dumps(request)

    summary = run.summary()
    assert summary["sessions"]["completed"] == 1 and summary["sessions"]["errored"] == 1
    assert [e["session_id"] for e in summary["errors"]] == [broken["session_id"]]
    assert "floats" not in summary["dimensions"]["coherence"]["by_topic"]


def test_errors_are_never_cached(make_fake, write_matrix, tmp_path, open_run):
    cache = tmp_path / "c.sqlite"
    failing = make_fake(fault=Fault(server_error=1.0))
    result = run_cli(write_matrix(base_matrix(failing.base_url), "a.yaml"), tmp_path / "a", "--cache", cache)
    assert result.exit_code == 3
    assert cache_entries(cache) == 0

    malformed = make_fake(fault=Fault(malformed=1.0))
    result = run_cli(write_matrix(base_matrix(malformed.base_url), "b.yaml"), tmp_path / "b", "--cache", cache)
    assert result.exit_code == 3
    assert all(s["status"] == "errored" for s in open_run(tmp_path / "b").sessions())
    assert cache_entries(cache) == 0

    healthy = make_fake()
    result = run_cli(write_matrix(base_matrix(healthy.base_url), "c.yaml"), tmp_path / "c", "--cache", cache)
    assert result.exit_code == 0, result.output
    assert healthy.roles["tutor"] == 2 * 2  # asked again: nothing failed was replayed
    assert all(s["status"] == "completed" for s in open_run(tmp_path / "c").sessions())
    assert cache_entries(cache) > 0


# -- the response cache ---------------------------------------------------------------------------


def _labels(run) -> dict:
    sample_of = {s["session_id"]: s["sample_id"] for s in run.sessions()}
    return {(sample_of[j["session_id"]], j["judge"]): (j["status"], j["label"], j["explanation"])
            for j in run.judgements()}


def _transcripts(run) -> dict:
    sample_of = {s["session_id"]: s["sample_id"] for s in run.sessions()}
    return {sample_of[sid]: messages for sid, messages in run.transcripts().items()}


def test_second_identical_run_is_served_from_the_cache(make_fake, write_matrix, tmp_path, open_run):
    cache = tmp_path / "c.sqlite"
    first_fake = make_fake()
    # One session at a time, so a repeat would find its twin's answers in the cache if the key let it.
    matrix = base_matrix(first_fake.base_url, repeats=2, max_turns=2, concurrency=1)
    result = run_cli(write_matrix(matrix, "first.yaml"), tmp_path / "first", "--cache", cache)
    assert result.exit_code == 0, result.output
    # Repeats send identical prompts, but each sample gets its own answers (the sample id is in the key).
    assert first_fake.roles["tutor"] == 4 * 2
    first = open_run(tmp_path / "first")

    # A fresh server (new port, so the URL differs) that must not be asked anything.
    second_fake = make_fake()
    matrix = base_matrix(second_fake.base_url, repeats=2, max_turns=2, concurrency=1)
    result = run_cli(write_matrix(matrix, "second.yaml"), tmp_path / "second", "--cache", cache)
    assert result.exit_code == 0, result.output
    assert second_fake.chat_calls == 0
    second = open_run(tmp_path / "second")

    assert second.run_id != first.run_id
    assert _transcripts(second) == _transcripts(first)
    assert len(_transcripts(second)) == 4
    assert _labels(second) == _labels(first)
    assert len(_labels(second)) == 4 * 2

    # The cache sits under the instrumentation: the tutor's spans are in the second run's store.
    second_llm = [s for s in second.spans() if s["span_kind"] == "LLM"]
    assert len(second_llm) == len([s for s in first.spans() if s["span_kind"] == "LLM"]) == 8
    assert all(s["session_id"].startswith(second.run_id + "/") for s in second_llm)
    cached = second.rows("SELECT role, SUM(cached) AS cached, COUNT(*) AS calls FROM calls GROUP BY role")
    assert cached and all(r["cached"] == r["calls"] for r in cached)

    # --no-cache asks the server again.
    third_fake = make_fake()
    matrix = base_matrix(third_fake.base_url, repeats=2, max_turns=2, concurrency=1)
    entries = cache_entries(cache)
    result = run_cli(write_matrix(matrix, "third.yaml"), tmp_path / "third", "--no-cache")
    assert result.exit_code == 0, result.output
    assert third_fake.roles["tutor"] == 8 and third_fake.roles["student"] == 8 and third_fake.roles["judge"] == 8
    assert cache_entries(cache) == entries


def test_cache_option_uses_the_given_file_not_the_default(fake, write_matrix, tmp_path):
    cache = tmp_path / "mine.sqlite"
    result = run_cli(write_matrix(base_matrix(fake.base_url)), tmp_path / "run", "--cache", cache)
    assert result.exit_code == 0, result.output
    assert cache_entries(cache) > 0
    assert not (tmp_path / "default-cache").exists()


def test_different_model_name_misses_the_cache(make_fake, write_matrix, tmp_path):
    cache = tmp_path / "c.sqlite"
    first = make_fake()
    result = run_cli(write_matrix(base_matrix(first.base_url), "a.yaml"), tmp_path / "a", "--cache", cache)
    assert result.exit_code == 0, result.output

    second = make_fake()
    matrix = base_matrix(second.base_url)
    matrix["models"] = {"other": matrix["models"]["fake"]}
    for role in ("tutor", "student", "judges"):
        matrix[role]["model"] = "other"
    result = run_cli(write_matrix(matrix, "b.yaml"), tmp_path / "b", "--cache", cache)
    assert result.exit_code == 0, result.output
    assert second.roles["tutor"] == 2 * 2


def test_without_cache_option_the_default_cache_file_is_used(fake, write_matrix, tmp_path):
    # conftest points SIMBENCH_CACHE into tmp_path, so this never touches ~/.cache.
    result = invoke("run", write_matrix(base_matrix(fake.base_url)), "--out", tmp_path / "run", "-q")
    assert result.exit_code == 0, result.output
    assert cache_entries(tmp_path / "default-cache" / "responses.sqlite") > 0


def test_unreachable_endpoint_exits_3_before_any_session(make_fake, write_matrix, tmp_path):
    gone = make_fake()
    url = gone.base_url
    gone.__exit__(None, None, None)  # nothing listens on that port any more
    out = tmp_path / "run"
    result = run_cli(write_matrix(base_matrix(url)), out, "--cache", tmp_path / "c.sqlite")
    assert result.exit_code == 3, result.output
    assert "unreachable" in result.stderr
    if (out / "run.sqlite").exists():
        db = sqlite3.connect(out / "run.sqlite")
        try:
            assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0
        finally:
            db.close()
