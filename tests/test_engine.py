"""The run engine under faults, rate limits and cache changes (issue: run engine at scale)."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import base_matrix, run_cli
from fake_openai import Fault
from simbench.models.limits import AdaptiveLimit, ModelLimiter, SlidingWindow


@pytest.mark.timeout(600)
def test_faulty_server_every_sample_completed_or_errored_with_a_reason(make_fake, write_matrix, tmp_path, open_run):
    fault = Fault(rate_limit=0.08, server_error=0.08, slow=0.02, truncated=0.04, malformed=0.04,
                  retry_after=0.05, slow_seconds=3)
    fake = make_fake(fault=fault, seed=7)
    matrix = base_matrix(
        fake.base_url,
        models={"fake": {"base_url": fake.base_url, "model": "m", "timeout": 1, "max_retries": 2}},
        topics=["adding_fractions", "photosynthesis"],
        personas=["impatient", "terse", "anxious", "overconfident", "answer_seeker"],
        repeats=10,
        max_turns=3,
        concurrency=32,
    )
    result = run_cli(write_matrix(matrix), tmp_path / "run", "--no-cache")
    assert result.exit_code == 0, result.output
    run = open_run(tmp_path / "run")
    sessions = run.sessions()
    planned = 2 * 2 * 5 * 10
    assert len(sessions) == planned
    assert {s["status"] for s in sessions} <= {"completed", "errored"}
    errored = [s for s in sessions if s["status"] == "errored"]
    assert errored, "with these fault rates some sessions exhaust their retries"
    assert all(s["error"] for s in errored)
    summary = run.summary()
    counts = summary["sessions"]
    assert counts["completed"] + counts["errored"] == counts["planned"] == planned
    # errored sessions are never judged, so never in a rate
    judged_ids = {j["session_id"] for j in run.judgements()}
    assert not judged_ids & {s["session_id"] for s in errored}
    for dim in summary["dimensions"].values():
        o = dim["overall"]
        assert o["pass"] + o["fail"] + o["error"] + o["skipped"] == counts["completed"]
    assert {e["session_id"] for e in summary["errors"]} == {s["session_id"] for s in errored}
    html = (tmp_path / "run" / "report.html").read_text()
    assert all(s["session_id"] in html for s in errored)
    # every kind of fault was met and retried (the calls table keeps each attempt)
    statuses = {r["status"] for r in run.rows("SELECT DISTINCT status FROM calls")}
    assert {0, 429, 500}.issubset(statuses)
    assert run.rows("SELECT COUNT(*) AS n FROM calls WHERE attempt > 0")[0]["n"] > 0
    assert run.rows("SELECT COUNT(*) AS n FROM calls WHERE error = 'malformed response body'")[0]["n"] > 0


def test_changing_one_variant_reruns_only_its_samples(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake()
    matrix = base_matrix(fake.base_url, personas=["impatient", "terse"], repeats=2)
    cache = tmp_path / "cache.sqlite"
    assert run_cli(write_matrix(matrix), tmp_path / "a", "--cache", cache).exit_code == 0
    first = fake.chat_calls
    matrix["tutor"]["variants"]["direct"] = "You are a tutor for {{ topic.name }}. Explain very clearly."
    assert run_cli(write_matrix(matrix), tmp_path / "b", "--cache", cache).exit_code == 0
    tutor_prompts = [r["messages"][0]["content"] for r in fake.requests[first:] if fake.role_of(r) == "tutor"]
    assert tutor_prompts, "the changed variant must be re-run"
    assert all("very clearly" in p for p in tutor_prompts), "only the changed variant's sessions call the model"
    run_b = open_run(tmp_path / "b")
    assert len(run_b.sessions()) == 2 * 2 * 2
    spans = run_b.rows("SELECT COUNT(*) AS n FROM spans WHERE name = 'session.end'")[0]["n"]
    assert spans == 8, "cached sessions are still traced"


def test_rpm_window_is_never_exceeded() -> None:
    now = [0.0]
    window = SlidingWindow(limit=5, clock=lambda: now[0])

    async def scenario() -> list[float]:
        admitted = []
        for _ in range(5):
            await window.take(1)
            admitted.append(now[0])
        blocked = asyncio.ensure_future(window.take(1))
        await asyncio.sleep(0.05)
        assert not blocked.done(), "a sixth request within the minute must wait"
        now[0] = 60.01
        await asyncio.wait_for(blocked, 2)
        return admitted

    assert asyncio.run(scenario()) == [0.0] * 5


def test_tpm_window_counts_real_usage() -> None:
    window = SlidingWindow(limit=1000, clock=lambda: 0.0)

    async def scenario() -> float:
        event = await window.take(900)  # an estimate
        window.adjust(event, 100)  # the answer used far less
        await asyncio.wait_for(window.take(800), 1)  # fits now
        return window.total

    assert asyncio.run(scenario()) == 900


def test_sustained_429s_lower_concurrency_and_successes_restore_it() -> None:
    async def scenario() -> tuple[int, int]:
        limiter = ModelLimiter("m", concurrency=16)
        for _ in range(3):
            limiter.on_rate_limited()
        lowered = limiter.limit.capacity
        for _ in range(200):
            limiter.on_success()
        return lowered, limiter.limit.capacity

    lowered, restored = asyncio.run(scenario())
    assert lowered == 12
    assert restored == 16


def test_adaptive_limit_never_leaks_a_slot_when_waiters_are_cancelled() -> None:
    async def scenario() -> tuple[int, int]:
        limit = AdaptiveLimit(2)
        await limit.acquire()
        await limit.acquire()
        waiters = [asyncio.ensure_future(limit.acquire()) for _ in range(5)]
        await asyncio.sleep(0)
        waiters[0].cancel()  # cancelled while waiting
        limit.release()  # hands the slot to waiters[1] ...
        waiters[1].cancel()  # ... which is cancelled in the same tick: it must hand the slot on
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        for w in waiters[3:]:
            w.cancel()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        holders = 1 + sum(r is None for r in results)  # the first acquirer plus waiters that got a slot
        return limit.in_use, holders

    in_use, holders = asyncio.run(scenario())
    assert in_use == holders == 2, "waiters[2] got the slot waiters[1] gave back; nothing leaked"


def test_backoff_honours_retry_after_with_jitter() -> None:
    limiter = ModelLimiter("m", concurrency=1)
    delays = [limiter.backoff(1, 2.0) for _ in range(50)]
    assert all(2.0 <= d <= 3.0 for d in delays)
    assert len(set(delays)) > 1
    exponential = [limiter.backoff(4, None) for _ in range(50)]
    assert all(2.0 <= d <= 4.0 for d in exponential)


def test_retry_after_is_honoured_end_to_end(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake(fault=Fault(rate_limit=0.5, retry_after=0.3), seed=3)
    matrix = base_matrix(fake.base_url, models={"fake": {"base_url": fake.base_url, "model": "m", "max_retries": 8}})
    started = time.monotonic()
    result = run_cli(write_matrix(matrix), tmp_path / "run", "--no-cache")
    assert result.exit_code == 0, result.output
    run = open_run(tmp_path / "run")
    retried_429 = run.rows("SELECT COUNT(*) AS n FROM calls WHERE status = 429")[0]["n"]
    assert retried_429 > 0
    assert all(s["status"] == "completed" for s in run.sessions())
    # each 429 was followed by a wait of at least Retry-After before the retry
    assert time.monotonic() - started >= 0.3


def test_usage_and_cost_are_accounted_per_role(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake()
    models = {"fake": {"base_url": fake.base_url, "model": "m", "price": {"input": 2.0, "output": 10.0}}}
    matrix = base_matrix(fake.base_url, models=models)
    assert run_cli(write_matrix(matrix), tmp_path / "run", "--no-cache").exit_code == 0
    run = open_run(tmp_path / "run")
    usage = run.summary()["usage"]
    assert set(usage) == {"tutor", "student", "judge"}
    for role, u in usage.items():
        rows = run.rows("SELECT SUM(prompt_tokens) AS p, SUM(completion_tokens) AS c, COUNT(*) AS n FROM calls WHERE role = ?", (role,))[0]
        assert u["calls"] == rows["n"] == fake.roles[role]
        assert (u["prompt_tokens"], u["completion_tokens"]) == (rows["p"], rows["c"])
        assert u["cost_usd"] == round((rows["p"] * 2.0 + rows["c"] * 10.0) / 1e6, 6)
        assert u["cost_usd"] > 0
    # a cached re-run costs nothing
    cache = tmp_path / "cache.sqlite"
    assert run_cli(write_matrix(matrix), tmp_path / "a", "--cache", cache).exit_code == 0
    assert run_cli(write_matrix(matrix), tmp_path / "b", "--cache", cache).exit_code == 0
    rerun = open_run(tmp_path / "b").summary()["usage"]
    assert all(u["cost_usd"] == 0 and u["cached"] == u["calls"] for u in rerun.values())
