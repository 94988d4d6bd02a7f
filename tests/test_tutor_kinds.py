"""Tutor kinds (issue 11): prompt, callable and http tutors end to end through ``simbench run`` on the
fake server; their failures become errored sessions with the reason; their spans; variants as records."""

from __future__ import annotations

import json
import os
import textwrap
import uuid
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import base_matrix, cache_entries, copy_own_tutor, run_cli
from simbench.matrix import MatrixError, load_matrix

TESTS = Path(__file__).parent


def _module(tmp_path: Path, source: str) -> str:
    """Write a tutor module next to the matrix under a fresh name (in-process runs share sys.modules)."""
    name = f"user_tutor_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return name


def _callable_matrix(fake, target: str, **tutor) -> dict:
    matrix = base_matrix(fake.base_url)
    matrix["tutor"] = {"kind": "callable", "callable": target, "model": "fake", "max_tokens": 48,
                       "baseline": "notes", "max_retries": 0,
                       "variants": {"notes": {"settings": {"top_k": 2}}, "plain": {"settings": {"top_k": 0}}},
                       **tutor}
    return matrix


def _turn_spans(run) -> dict[str, dict]:
    return {s["span_id"]: s for s in run.spans() if s["name"] == "tutor.turn"}


SYNC_TUTOR = """
    import json, os, openai

    def reply(messages, context):
        # the context, as the user's function sees it
        with open(os.environ["SEEN_LOG"], "a") as f:
            f.write(json.dumps({"roles": [m["role"] for m in messages], "session_id": context.session_id,
                                "sample_id": context.sample_id, "attempt": context.attempt,
                                "variant": context.variant, "settings": context.settings, "turn": context.turn,
                                "topic": context.topic["name"], "persona": context.persona,
                                "model": context.model.model, "max_tokens": context.max_tokens}) + "\\n")
        client = openai.OpenAI(base_url=context.model.base_url, api_key=context.model.api_key, max_retries=0)
        answer = client.chat.completions.create(
            model=context.model.model, max_tokens=context.max_tokens,
            messages=[{"role": "system", "content": "tutor top_k=%d" % context.settings["top_k"]}] + messages)
        text = answer.choices[0].message.content
        return {"text": text, "tool_calls": [{"name": "calculator", "arguments": {"expression": "1/2+1/3"},
                                              "result": "5/6"}],
                "metadata": {"top_k": context.settings["top_k"]}, "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
"""


def test_sync_callable_end_to_end_with_its_own_calls_nested_under_the_turn(fake, write_matrix, tmp_path, open_run,
                                                                            monkeypatch):
    monkeypatch.setenv("SEEN_LOG", str(tmp_path / "seen.jsonl"))
    name = _module(tmp_path, SYNC_TUTOR)
    out = tmp_path / "run"
    result = run_cli(write_matrix(_callable_matrix(fake, f"{name}:reply")), out)
    assert result.exit_code == 0, result.output

    run = open_run(out)
    sessions = run.sessions()
    assert len(sessions) == 2 and all(s["status"] == "completed" and s["turns"] == 2 for s in sessions)
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 4
    by_session = {f"{run.run_id}/{s['sample_id']}/{s['attempt']}": s for s in sessions}
    for call in seen:
        session = by_session[call["session_id"]]
        assert call["sample_id"] == session["sample_id"] and call["variant"] == session["variant"]
        assert call["settings"] == {"top_k": 2 if call["variant"] == "notes" else 0}
        assert call["roles"] == ["user", "assistant"] * (call["turn"] - 1) + ["user"]  # no system message
        assert (call["topic"], call["persona"], call["model"], call["max_tokens"], call["attempt"]) == \
            ("adding fractions", "impatient", "fake-model", 48, 1)
    # The function's own OpenAI calls reached the model, each an LLM span under its turn's span.
    assert {r["messages"][0]["content"] for r in fake.requests_of("tutor")} == {"tutor top_k=2", "tutor top_k=0"}
    spans = run.spans()
    turns = _turn_spans(run)
    llm = [s for s in spans if s["span_kind"] == "LLM"]
    tools = [s for s in spans if s["span_kind"] == "TOOL"]
    assert len(turns) == len(llm) == len(tools) == 4
    assert all(s["parent_id"] in turns and s["trace_id"] == turns[s["parent_id"]]["trace_id"] for s in llm + tools)
    for turn in turns.values():
        attributes = turn["attributes"]
        assert turn["parent_id"] is None and turn["span_kind"] == "AGENT"
        assert attributes["session.id"] in by_session and attributes["output.value"].startswith("Tutor turn")
        assert json.loads(attributes["simbench.reply.metadata"])["top_k"] in (0, 2)
    tool = tools[0]["attributes"]
    assert (tool["tool.name"], json.loads(tool["tool.parameters"]), tool["output.value"]) == \
        ("calculator", {"expression": "1/2+1/3"}, "5/6")
    # The turns reach the judges as one message pair per turn, and the usage the function gave is counted.
    for messages in run.transcripts().values():
        assert [role for role, _ in messages] == ["student", "tutor", "student", "tutor", "student"]
    calls = run.rows("SELECT * FROM calls WHERE role = 'tutor'")
    assert len(calls) == 4 and {c["model"] for c in calls} == {f"callable:{name}:reply"}
    assert sum(c["prompt_tokens"] for c in calls) == 12 and sum(c["completion_tokens"] for c in calls) == 16


def test_async_callable_returning_text_and_the_cache_of_its_answers(fake, write_matrix, tmp_path, open_run, monkeypatch):
    monkeypatch.setenv("CALLS_LOG", str(tmp_path / "calls.txt"))
    name = _module(tmp_path, """
        import asyncio, os

        async def reply(messages, context):
            await asyncio.sleep(0)
            with open(os.environ["CALLS_LOG"], "a") as f:
                f.write("x")
            return f"async reply {context.turn} for {context.variant}"
    """)
    matrix = write_matrix(_callable_matrix(fake, f"{name}:reply"))
    cache = tmp_path / "cache.sqlite"
    first = run_cli(matrix, tmp_path / "one", "--cache", cache)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "calls.txt").read_text() == "x" * 4
    texts = {t["attributes"]["output.value"] for t in _turn_spans(open_run(tmp_path / "one")).values()}
    assert texts == {f"async reply {turn} for {v}" for turn in (1, 2) for v in ("notes", "plain")}
    # The same conversations again: every answer from the cache, the function not called.
    second = run_cli(matrix, tmp_path / "two", "--cache", cache)
    assert second.exit_code == 0, second.output
    assert (tmp_path / "calls.txt").read_text() == "x" * 4
    # A variant's settings, then another's temperature, changed: that variant's turns are asked
    # again (2 each), the other's still come from the cache.
    changed = _callable_matrix(fake, f"{name}:reply")
    changed["tutor"]["variants"]["plain"]["settings"] = {"top_k": 1}
    assert run_cli(write_matrix(changed, "settings.yaml"), tmp_path / "settings", "--cache", cache).exit_code == 0
    assert (tmp_path / "calls.txt").read_text() == "x" * 6
    changed["tutor"]["variants"]["notes"]["temperature"] = 0.9
    assert run_cli(write_matrix(changed, "temperature.yaml"), tmp_path / "temperature", "--cache", cache).exit_code == 0
    assert (tmp_path / "calls.txt").read_text() == "x" * 8
    # ``cache: false`` for a tutor that is not deterministic: called again, nothing more cached for it.
    entries = cache_entries(cache)
    uncached = write_matrix(_callable_matrix(fake, f"{name}:reply", cache=False), "uncached.yaml")
    third = run_cli(uncached, tmp_path / "three", "--cache", cache)
    assert third.exit_code == 0, third.output
    assert (tmp_path / "calls.txt").read_text() == "x" * 12
    assert cache_entries(cache) == entries


@pytest.mark.parametrize("body, reason, calls", [
    ("raise ValueError('the notes index is gone')", "raised ValueError: the notes index is gone", 3),
    ("time.sleep(3)", "did not return within 0.3 s", 3),
    ("raise SystemExit(0)", "raised SystemExit: 0", 3),  # the user's sys.exit() ends a turn, not the run
    ("return 42", "returned int", 1),  # a wrong type is not retried: the function would return it again
    ("return {'answer': 'x'}", "a dict without a 'text' string", 1),
])
def test_a_failing_callable_errors_its_sessions_with_the_reason(fake, write_matrix, tmp_path, open_run, monkeypatch,
                                                                 body, reason, calls):
    monkeypatch.setenv("CALLS_LOG", str(tmp_path / "calls.txt"))
    name = _module(tmp_path, f"""
        import os, time

        def reply(messages, context):
            with open(os.environ["CALLS_LOG"], "a") as f:
                f.write("x")
            {body}
    """)
    matrix = _callable_matrix(fake, f"{name}:reply", timeout=0.3, max_retries=2)
    matrix["tutor"]["variants"] = {"notes": {"settings": {"top_k": 2}}}
    out = tmp_path / "run"
    result = run_cli(write_matrix(matrix), out)
    assert result.exit_code == 3, result.output  # every session errored: the run could not do its job
    assert reason in result.output
    run = open_run(out)
    (session,) = run.sessions()
    assert session["status"] == "errored" and session["error"].startswith("tutor call failed:")
    assert reason in session["error"]
    assert len((tmp_path / "calls.txt").read_text()) == calls
    attempts = run.rows("SELECT * FROM calls WHERE role = 'tutor'")
    assert len(attempts) == calls and all(reason in (a["error"] or "") for a in attempts)
    assert fake.roles["judge"] == 0  # an errored session is not judged


def test_an_async_callable_that_calls_sys_exit_errors_its_session_not_the_run(fake, write_matrix, tmp_path, open_run):
    name = _module(tmp_path, """
        import sys

        async def reply(messages, context):
            sys.exit(0)
    """)
    matrix = _callable_matrix(fake, f"{name}:reply", max_retries=0)
    matrix["tutor"]["variants"] = {"notes": {"settings": {"top_k": 2}}}
    out = tmp_path / "run"
    result = run_cli(write_matrix(matrix), out)
    assert result.exit_code == 3, result.output
    (session,) = open_run(out).sessions()
    assert session["status"] == "errored" and "raised SystemExit: 0" in session["error"]
    assert (out / "report.html").exists()


PEAK_TUTOR = """
    import asyncio, os

    running = peak = 0

    async def reply(messages, context):
        global running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        with open(os.environ["PEAK_LOG"], "w") as f:
            f.write(str(peak))
        return "ok"
"""


@pytest.mark.parametrize("tutor_concurrency, peak", [(None, 4), (1, 1)])
def test_tutor_concurrency_caps_the_turns_in_flight(fake, write_matrix, tmp_path, monkeypatch, tutor_concurrency, peak):
    monkeypatch.setenv("PEAK_LOG", str(tmp_path / "peak.txt"))
    name = _module(tmp_path, PEAK_TUTOR)
    matrix = _callable_matrix(fake, f"{name}:reply", **({"concurrency": tutor_concurrency} if tutor_concurrency else {}))
    matrix.update(concurrency=4, repeats=2, topics=["adding_fractions", "photosynthesis"])  # 8 sessions, 4 at once
    result = run_cli(write_matrix(matrix), tmp_path / "run", "--no-cache")
    assert result.exit_code == 0, result.output
    assert int((tmp_path / "peak.txt").read_text()) == peak


def test_a_callable_that_cannot_be_imported_fails_validation(fake, write_matrix, tmp_path):
    path = write_matrix(_callable_matrix(fake, "no_such_module_here:reply"))
    result = run_cli(path, tmp_path / "run")
    assert result.exit_code == 2
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "callable:" in text)
    assert f"{path}:{line}: tutor.callable: cannot import 'no_such_module_here:reply'" in result.output
    assert "ModuleNotFoundError" in result.output
    assert fake.chat_calls == 0 and not (tmp_path / "run").exists()
    name = _module(tmp_path, "reply = 3\n")
    result = run_cli(write_matrix(_callable_matrix(fake, f"{name}:reply"), "m2.yaml"), tmp_path / "run")
    assert result.exit_code == 2 and "is a int, not a function" in result.output


def test_an_http_tutor_without_base_url_fails_validation_with_its_line(fake, write_matrix, tmp_path):
    matrix = base_matrix(fake.base_url)
    matrix["tutor"] = {"kind": "http", "http": {"protocol": "openai", "model": "my-app"}, "variants": {"a": {}}}
    path = write_matrix(matrix)
    result = run_cli(path, tmp_path / "run")
    assert result.exit_code == 2, result.output
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip() == "http:")
    assert f"{path}:{line}: tutor.http.base_url: required field is missing" in result.output
    assert fake.chat_calls == 0 and not (tmp_path / "run").exists()


def test_kind_and_its_fields_must_agree(fake, tmp_path):
    def problems(tutor: dict) -> str:
        matrix = base_matrix(fake.base_url)
        matrix["tutor"] = tutor
        path = tmp_path / "m.yaml"
        import yaml

        path.write_text(yaml.safe_dump(matrix, sort_keys=False))
        with pytest.raises(MatrixError) as err:
            load_matrix(path)
        return str(err.value)

    assert "tutor.http.base_url: required field is missing" in problems(
        {"kind": "http", "http": {"protocol": "openai"}, "variants": {"a": {"settings": {}}}})
    assert "kind callable needs tutor.callable" in problems({"kind": "callable", "variants": {"a": {}}})
    assert "a prompt tutor's variant needs a prompt" in problems({"model": "fake", "variants": {"a": {"temperature": 0.2}}})
    assert "protocol json needs body and reply" in problems(
        {"kind": "http", "http": {"protocol": "json", "base_url": "http://127.0.0.1:9/"}, "variants": {"a": {}}})
    assert "does not render to JSON" in problems(
        {"kind": "http", "http": {"protocol": "json", "base_url": "http://127.0.0.1:9/", "reply": "$.a",
                                  "body": "{\"q\": {{ last_message }}}"}, "variants": {"a": {}}})
    assert "must start with $" in problems(
        {"kind": "http", "http": {"base_url": "http://127.0.0.1:9/v1", "reply": "answer"}, "variants": {"a": {}}})
    assert "unknown model 'nope'" in problems({"model": "fake", "variants": {"a": {"prompt": "x", "model": "nope"}}})
    assert "tutor.variants.a.model: an http tutor's app calls its own models" in problems(
        {"kind": "http", "http": {"base_url": "http://127.0.0.1:9/v1"}, "variants": {"a": {"model": "fake"}}})


# -- http ---------------------------------------------------------------------------------------


def _json_app_matrix(fake, log: Path, fault: str = "", **tutor) -> dict:
    matrix = base_matrix(fake.base_url)
    start = f"python {TESTS / 'tutor_app.py'} --port {{port}} --log {log}" + (f" --fault {fault}" if fault else "")
    matrix["tutor"] = {
        "kind": "http", "max_retries": 1, "baseline": "warm",
        "http": {"protocol": "json", "base_url": "http://127.0.0.1:{port}/",
                 "body": '{"question": {{ last_message|tojson }}, "session": {{ session_id|tojson }}, '
                         '"style": {{ settings.style|tojson }}, "turn": {{ turn }}}',
                 "reply": "$.answer", "tool_calls": "$.tools", "start": start,
                 "headers": {"Authorization": "Bearer ${TUTOR_APP_KEY}"}},
        "variants": {"warm": {"settings": {"style": "warm"}}, "terse": {"settings": {"style": "terse"}}},
        **tutor,
    }
    return matrix


def _app_log(log: Path) -> tuple[int, list[dict]]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return records[0]["pid"], records[1:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_http_json_app_end_to_end_started_traced_and_stopped(fake, write_matrix, tmp_path, open_run, monkeypatch):
    monkeypatch.setenv("TUTOR_APP_KEY", "sk-app-secret-123456")
    log = tmp_path / "app.jsonl"
    out = tmp_path / "run"
    result = run_cli(write_matrix(_json_app_matrix(fake, log)), out)
    assert result.exit_code == 0, result.output

    pid, requests = _app_log(log)
    assert not _alive(pid)  # stopped after the run
    run = open_run(out)
    sessions = {f"{run.run_id}/{s['sample_id']}/{s['attempt']}": s for s in run.sessions()}
    assert len(sessions) == 2 and all(s["status"] == "completed" for s in sessions.values())
    assert len(requests) == 4
    turns = _turn_spans(run)
    trace_of = {t["trace_id"]: t for t in turns.values()}
    for request in requests:
        body, headers = request["body"], request["headers"]
        session = sessions[body["session"]]
        assert body["style"] == session["variant"]
        assert headers["authorization"] == "Bearer sk-app-secret-123456"
        # W3C trace context: the request belongs to its turn's trace, and the baggage names the session.
        _, trace_id, parent_span, _ = headers["traceparent"].split("-")
        assert trace_of[trace_id]["span_id"] == parent_span
        assert trace_of[trace_id]["attributes"]["session.id"] == body["session"]
        assert f"session.id={body['session']}" in unquote(headers["baggage"])
    for turn in turns.values():
        assert turn["attributes"]["output.value"].startswith("[")
    tools = [s for s in run.spans() if s["span_kind"] == "TOOL"]
    assert len(tools) == 4 and all(t["attributes"]["tool.name"] == "lookup" for t in tools)
    # The app's usage, as it reported it, is accounted like a model call's.
    calls = run.rows("SELECT * FROM calls WHERE role = 'tutor'")
    assert len(calls) == 4 and all((c["prompt_tokens"], c["completion_tokens"]) == (7, 5) for c in calls)
    # The key the headers carry is a secret: nowhere in what the run stored.
    for path in out.rglob("*"):
        if path.is_file():
            assert b"sk-app-secret-123456" not in path.read_bytes(), path


@pytest.mark.parametrize("fault, reason", [
    ("500", "answered HTTP 500"),
    ("malformed", "the app's answer is not JSON"),
    ("nomatch", "the reply selector $.answer matched nothing"),
    ("slow", "did not answer within 0.5 s (tutor.timeout)"),
])
def test_a_failing_http_app_errors_its_sessions_after_retries(fake, write_matrix, tmp_path, open_run, monkeypatch,
                                                              fault, reason):
    monkeypatch.setenv("TUTOR_APP_KEY", "k")
    log = tmp_path / "app.jsonl"
    matrix = _json_app_matrix(fake, log, fault, timeout=0.5)
    matrix["tutor"]["variants"] = {"warm": {"settings": {"style": "warm"}}}
    out = tmp_path / "run"
    result = run_cli(write_matrix(matrix), out)
    assert result.exit_code == 3, result.output
    run = open_run(out)
    (session,) = run.sessions()
    assert session["status"] == "errored" and reason in session["error"], session["error"]
    _, requests = _app_log(log)
    assert len(requests) == 2  # the first try and max_retries: 1
    assert len(run.rows("SELECT * FROM calls WHERE role = 'tutor'")) == 2


def test_a_header_secret_echoed_in_an_app_error_is_masked_everywhere(fake, write_matrix, tmp_path, open_run, monkeypatch):
    secret = "sk-app-secret-9f8e7d6c5b4a"
    monkeypatch.setenv("TUTOR_APP_KEY", secret)
    matrix = _json_app_matrix(fake, tmp_path / "app.jsonl", "echo")
    matrix["tutor"]["variants"] = {"warm": {"settings": {"style": "warm"}}}
    out = tmp_path / "run"
    result = run_cli(write_matrix(matrix), out)
    assert result.exit_code == 3, result.output
    (session,) = open_run(out).sessions()
    assert "answered HTTP 500" in session["error"] and "Bearer [redacted $TUTOR_APP_KEY]" in session["error"]
    assert secret not in result.output
    for path in out.rglob("*"):
        if path.is_file() and path.name != "tutor-app.log":  # the app's own output is the app's
            assert secret.encode() not in path.read_bytes(), path


def test_http_app_answers_are_cached_unless_the_tutor_says_not(fake, write_matrix, tmp_path, open_run, monkeypatch):
    monkeypatch.setenv("TUTOR_APP_KEY", "k")
    log = tmp_path / "app.jsonl"
    matrix = _json_app_matrix(fake, log)
    cache = tmp_path / "cache.sqlite"

    def posts_after(run_name: str, tutor_matrix: dict) -> int:
        result = run_cli(write_matrix(tutor_matrix, f"{run_name}.yaml"), tmp_path / run_name, "--cache", cache)
        assert result.exit_code == 0, result.output
        return sum("body" in json.loads(line) for line in log.read_text().splitlines())

    assert posts_after("one", matrix) == 4
    # Again: the same conversations, each answer from the cache (the session id and the trace
    # headers differ every run and are not part of the key); the app is started but not asked.
    assert posts_after("two", matrix) == 4
    calls = open_run(tmp_path / "two").rows("SELECT * FROM calls WHERE role = 'tutor'")
    assert len(calls) == 4 and all(c["cached"] == 1 for c in calls)
    assert posts_after("three", {**matrix, "tutor": {**matrix["tutor"], "cache": False}}) == 8


@pytest.mark.parametrize("fault, code, message", [
    (None, 3, "is unreachable (is it running?"),
    ("401", 2, "refused the request (HTTP 401): check tutor.http.headers"),
])
def test_an_http_app_that_is_down_or_refuses_the_key_stops_the_run_before_any_session(
        fake, write_matrix, tmp_path, monkeypatch, fault, code, message):
    monkeypatch.setenv("TUTOR_APP_KEY", "k")
    log = tmp_path / "app.jsonl"
    matrix = _json_app_matrix(fake, log, fault or "")
    if fault is None:  # nothing starts it and nothing listens there
        del matrix["tutor"]["http"]["start"]
        matrix["tutor"]["http"]["base_url"] = "http://127.0.0.1:9/"
    result = run_cli(write_matrix(matrix), tmp_path / "run")
    assert result.exit_code == code, result.output
    assert message in result.output
    assert fake.chat_calls == 0 and not (tmp_path / "run" / "run.sqlite").exists()


def test_http_header_variable_unset_is_an_input_error_before_any_call(fake, write_matrix, tmp_path, monkeypatch):
    monkeypatch.delenv("TUTOR_APP_KEY", raising=False)
    result = run_cli(write_matrix(_json_app_matrix(fake, tmp_path / "app.jsonl")), tmp_path / "run")
    assert result.exit_code == 2 and "TUTOR_APP_KEY is not set" in result.output
    assert fake.chat_calls == 0 and not (tmp_path / "app.jsonl").exists()


def test_http_openai_app_gets_the_conversation_and_variant_settings(fake, write_matrix, tmp_path, open_run):
    """``protocol: openai``: the fake server stands in for the user's OpenAI-compatible app."""
    matrix = base_matrix(fake.base_url)
    matrix["tutor"] = {"kind": "http", "temperature": 0.3,
                       "http": {"protocol": "openai", "base_url": fake.base_url, "model": "my-app"},
                       "variants": {"a": {"prompt": "Be brief about {{ topic.name }}.", "settings": {"top_k": 1}},
                                    "b": {"temperature": 0.9, "settings": {"top_k": 3}}}}
    out = tmp_path / "run"
    result = run_cli(write_matrix(matrix), out)
    assert result.exit_code == 0, result.output
    requests = fake.requests_of("tutor")
    assert len(requests) == 4
    by_top_k = {r["top_k"]: r for r in requests if r["messages"][-1]["role"] == "user" and len(r["messages"]) <= 2}
    assert by_top_k[1]["messages"][0] == {"role": "system", "content": "Be brief about adding fractions."}
    assert by_top_k[1]["temperature"] == 0.3 and by_top_k[3]["temperature"] == 0.9
    assert by_top_k[3]["messages"][0]["role"] == "user"  # no prompt, no system message
    assert {r["model"] for r in requests} == {"my-app"}
    run = open_run(out)
    turns = _turn_spans(run)
    assert len(turns) == 4
    # One chat call made the reply: the turn span carries its messages too.
    assert all("llm.output_messages.0.message.content" in t["attributes"] for t in turns.values())


# -- variants as records ------------------------------------------------------------------------


def test_variants_that_change_model_and_temperature(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake()
    matrix = base_matrix(fake.base_url)
    matrix["models"]["other"] = {"base_url": fake.base_url, "model": "other-model", "max_retries": 0}
    prompt = "You are a tutor for {{ topic.name }}."
    matrix["tutor"]["variants"] = {
        "socratic": {"prompt": prompt, "temperature": 0.0},
        "direct": {"prompt": prompt, "temperature": 1.2, "max_tokens": 40},
        "bigger": {"prompt": prompt, "model": "other"},
    }
    matrix["repeats"] = 2
    cache = tmp_path / "cache.sqlite"
    out = tmp_path / "run"
    result = run_cli(write_matrix(matrix), out, "--cache", cache)
    assert result.exit_code == 0, result.output
    run = open_run(out)
    variant_of = {s["sample_id"]: s["variant"] for s in run.sessions()}
    seen = {(r["model"], r["temperature"], r["max_tokens"]) for r in fake.requests_of("tutor")}
    assert seen == {("fake-model", 0.0, 64), ("fake-model", 1.2, 40), ("other-model", 0.7, 64)}
    # Same prompt, different settings: never one cached answer for both (every tutor call reached the model).
    assert len(fake.requests_of("tutor")) == 3 * 2 * 2
    # One variant's temperature changed, on the same cache: only its 4 turns reach the model again.
    matrix["tutor"]["variants"]["direct"]["temperature"] = 0.9
    again = run_cli(write_matrix(matrix, "warmer.yaml"), tmp_path / "warmer", "--cache", cache)
    assert again.exit_code == 0, again.output
    fresh = fake.requests_of("tutor")[3 * 2 * 2:]
    assert len(fresh) == 4 and {(r["model"], r["temperature"], r["max_tokens"]) for r in fresh} == {("fake-model", 0.9, 40)}
    assert len(variant_of) == 6
    # The comparison pairs variants by (topic, persona, repeat), as for prompt variants.
    comparisons = run.summary()["comparisons"]
    assert set(comparisons) == {"direct", "bigger"}
    for per_dimension in comparisons.values():
        assert set(per_dimension) == {"coherence", "correctness"}
        assert all(c["baseline"] == "socratic" and c["n"] == 2 for c in per_dimension.values())


# -- the example: examples/own_tutor, as a callable and as an app -------------------------------

def _example_on_fake(fake, tmp_path: Path, matrix_name: str) -> Path:
    """The example's folder copied to tmp_path, its matrix pointed at the fake server (the README
    runs it on the embedded model; tests/test_embedded.py covers that model)."""
    return copy_own_tutor(tmp_path, matrix_name, lambda matrix: matrix.update(
        models={"local": {"base_url": fake.base_url, "model": "fake-model", "max_retries": 0}}))


@pytest.mark.parametrize("matrix_name", ["callable.yaml", "http.yaml"])
def test_the_own_tutor_example_runs_as_both_kinds(fake, tmp_path, open_run, matrix_name):
    path = _example_on_fake(fake, tmp_path, matrix_name)
    out = tmp_path / "run"
    result = run_cli(path, out)
    assert result.exit_code == 0, result.output
    run = open_run(out)
    sessions = run.sessions()
    assert len(sessions) == 8 and all(s["status"] == "completed" for s in sessions)
    turns = _turn_spans(run)
    assert len(turns) == sum(s["turns"] for s in sessions)
    spans = run.spans()
    # Two model calls per turn (rewrite + answer), both inside the turn's trace.
    llm = [s for s in spans if s["span_kind"] == "LLM" and s["trace_id"] in {t["trace_id"] for t in turns.values()}]
    assert len(fake.requests_of("tutor")) == 2 * len(turns)
    if matrix_name == "callable.yaml":
        assert len(llm) == 2 * len(turns)
    variants = {s["variant"] for s in sessions}
    assert variants == {"with_notes", "no_notes"}
    assert set(run.summary()["comparisons"]) == {"no_notes"}
