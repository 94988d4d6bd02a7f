"""Issue 13, hostile input: secrets echoed by an endpoint, templates that reach for Python, files
that crash the reader, plans too large to expand, keys given twice, gates on judges that do not
run, and settings that are not what they look like. Each test goes through the real CLI; each
failed on the code before its fix."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import RecordingFake, base_matrix, invoke, run_cli
from simbench.matrix import MatrixError, parse_matrix
from simbench.models.cache import ResponseCache

KEY_ENV = "SIMBENCH_TEST_SECRET_KEY"
KEY = "sk-test-4f9a2c7e1b8d6a3f5e0c9b2a7d4e1f8c"
MASK = f"[redacted ${KEY_ENV}]"


def dump(matrix: dict) -> str:
    return yaml.safe_dump(matrix, sort_keys=False)


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"{needle!r} is not in the text {occurrence} time(s)")


# -- item 1: a secret echoed in an error body reaches nothing we store or print ---------------------


@dataclass
class KeyEchoingFake(RecordingFake):
    """Answers every chat request of ``reject_role`` with 401 and the API key in the body, as some
    endpoints and proxies do ("Incorrect API key provided: sk-...")."""

    reject_role: str = "tutor"

    async def _route(self, method: str, path: str, body: bytes):
        if method == "POST" and path.endswith("/chat/completions") and self.role_of(json.loads(body)) == self.reject_role:
            self.statuses[401] += 1
            self.roles[self.reject_role] += 1
            message = {"error": {"message": f"Incorrect API key provided: {KEY}. Check {KEY} again.",
                                 "type": "invalid_request_error", "code": "invalid_api_key"}}
            return 401, json.dumps(message).encode(), {}
        return await super()._route(method, path, body)


def _stored_text(run_dir: Path) -> tuple[str, bytes]:
    """Every value of every table of run.sqlite as text, and the raw bytes of the file, WAL and SHM."""
    db = sqlite3.connect(run_dir / "run.sqlite")
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        values = [str(v) for t in tables for row in db.execute(f'SELECT * FROM "{t}"') for v in row]
    finally:
        db.close()
    raw = b"".join(p.read_bytes() for p in run_dir.iterdir() if p.name.startswith("run.sqlite"))
    return "\n".join(values), raw


@pytest.mark.parametrize("reject_role", ["tutor", "judge"])
def test_item1_an_api_key_echoed_in_a_401_body_is_masked_everywhere(reject_role, write_matrix, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with KeyEchoingFake(latency=0, reject_role=reject_role) as fake:
        matrix = base_matrix(fake.base_url)
        matrix["models"]["fake"]["api_key_env"] = KEY_ENV
        matrix["tutor"]["variants"] = {"socratic": matrix["tutor"]["variants"]["socratic"]}
        # A per-turn judge too, so turn_evaluations.error is covered.
        matrix["judges"]["custom"] = {"turn_ok": {
            "scope": "turn", "prompt": "Is this reply fine? {reply}", "choices": {"yes": 1, "no": 0}}}
        matrix["judges"]["use"] = ["coherence", "turn_ok"]
        out = tmp_path / "run"
        result = run_cli(write_matrix(matrix), out, "--no-cache")
        assert fake.statuses[401] > 0  # the endpoint did echo the key

    assert result.exit_code in (0, 3), result.output
    values, raw = _stored_text(out)
    summary = (out / "summary.json").read_text(encoding="utf-8")
    report = (out / "report.html").read_text(encoding="utf-8")
    for where, text in (("run.sqlite", values), ("summary.json", summary), ("report.html", report),
                        ("CLI output", result.output)):
        assert KEY not in text, f"the API key leaked into {where}"
    assert KEY.encode() not in raw, "the API key is in the bytes of run.sqlite (or its WAL)"
    # What the error said is kept, with the key masked: the error was stored, not dropped.
    assert MASK in values
    if reject_role == "tutor":
        assert MASK in summary and "errored" in summary
        # The report rebuilt from the file, printed by the CLI, stays clean too.
        rebuilt = invoke("report", out)
        assert KEY not in rebuilt.output
    else:
        db = sqlite3.connect(out / "run.sqlite")
        errors = [r[0] for t in ("evaluations", "turn_evaluations")
                  for r in db.execute(f"SELECT error FROM {t} WHERE status = 'error'")]
        db.close()
        assert errors and all(KEY not in e for e in errors)
        assert any(MASK in e for e in errors), errors


def test_item1_spans_sent_to_a_remote_store_are_masked(monkeypatch):
    """A remote trace store gets the tutor's span with the exception the instrumentor recorded,
    which quotes the error body: the processor the run hands it masks the key first."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Status, StatusCode

    from simbench.redact import redacting_processor, register_env

    monkeypatch.setenv(KEY_ENV, KEY)
    register_env([KEY_ENV])
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(redacting_processor(SimpleSpanProcessor(exporter)))
    with provider.get_tracer("t").start_as_current_span("ChatCompletion", record_exception=False,
                                                         set_status_on_exception=False) as span:
        span.set_attribute("output.value", f"Incorrect API key provided: {KEY}")
        span.record_exception(RuntimeError(f"Error code: 401 - Incorrect API key provided: {KEY}"))
        span.set_status(Status(StatusCode.ERROR, f"AuthenticationError: {KEY}"))
    provider.shutdown()
    (sent,) = exporter.get_finished_spans()
    text = repr(dict(sent.attributes)) + repr([dict(e.attributes) for e in sent.events]) + str(sent.status.description)
    assert KEY not in text
    assert text.count(MASK) >= 3  # attribute, exception message (and its stack trace), status


def test_item1_secret_env_names_is_the_one_list(fake):
    m = parse_matrix(dump(base_matrix(fake.base_url, models={
        "a": {"base_url": fake.base_url, "model": "x", "api_key_env": "KEY_A"},
        "fake": {"base_url": fake.base_url, "model": "x", "api_key_env": "KEY_B"},
    })))
    names = m.secret_env_names()
    assert {"KEY_A", "KEY_B", "ARIZE_API_KEY", "ARIZE_SPACE_ID", "PHOENIX_API_KEY"} <= set(names)


def test_item1_short_values_are_not_masked():
    from simbench.redact import redact, register_secret

    register_secret("abc", "SHORT_ENV")
    register_secret("sk-longer-secret-value", "LONG_ENV")
    assert redact("abc sk-longer-secret-value") == "abc [redacted $LONG_ENV]"


# -- item 5: variant templates render in jinja2's sandbox -----------------------------------------


def test_item5_a_template_that_reaches_for_os_is_a_validation_error(fake, write_matrix, tmp_path):
    marker = tmp_path / "pwned"
    m = base_matrix(fake.base_url)
    m["tutor"]["variants"]["direct"] = (
        "You teach {{ topic.name }}. {{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}")
    text = dump(m)
    path = write_matrix(text)
    for command in (["validate", path], ["run", path, "--out", tmp_path / "run", "-q", "--no-cache"]):
        result = invoke(*command)
        assert not marker.exists(), "the template ran a shell command"
        assert result.exit_code == 2, result.output
        assert f"{path}:{line_of(text, 'direct:')}: tutor.variants.direct:" in result.output
        assert "sandbox" in result.output
    assert fake.chat_calls == 0


def test_item5_an_http_body_template_that_reaches_for_os_is_a_validation_error(fake, write_matrix, tmp_path):
    marker = tmp_path / "pwned"
    m = base_matrix(fake.base_url)
    m["tutor"] = {"kind": "http", "variants": {"a": {"settings": {}}},
                  "http": {"protocol": "json", "base_url": "http://127.0.0.1:9/", "reply": "$.answer",
                           "body": '{"q": "{{ cycler.__init__.__globals__.os.popen(\'touch ' + str(marker)
                                   + '\').read() }}"}'}}
    text = dump(m)
    result = invoke("run", write_matrix(text), "--out", tmp_path / "run", "-q", "--no-cache")
    assert not marker.exists(), "the body template ran a shell command"
    assert result.exit_code == 2, result.output
    assert "tutor.http.body" in result.output and "sandbox" in result.output
    assert fake.chat_calls == 0 and not (tmp_path / "run").exists()


def test_item5_render_user_template_is_sandboxed():
    import jinja2

    from simbench.matrix import render_user_template

    assert render_user_template("Hi {{ name }}", name="Ada") == "Hi Ada"
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_user_template("{{ cycler.__init__.__globals__ }}")


def test_item5_a_template_that_builds_a_huge_string_is_a_validation_error(fake, write_matrix):
    m = base_matrix(fake.base_url)
    m["tutor"]["variants"]["direct"] = "{{ topic.name * 10 ** 12 }}"  # terabytes, were it built
    result = invoke("validate", write_matrix(m))
    assert result.exit_code == 2 and "tutor.variants.direct" in result.output and "sandbox" in result.output


def test_item5_a_template_that_raises_is_a_validation_error(fake, write_matrix):
    m = base_matrix(fake.base_url)
    m["tutor"]["variants"]["direct"] = "{{ 1 / 0 }}"
    result = invoke("validate", write_matrix(m))
    assert result.exit_code == 2 and "tutor.variants.direct" in result.output


# -- item 6: files that crashed the reader are clear messages with exit 2 -------------------------


def test_item6_deeply_nested_yaml_is_an_input_error(fake, write_matrix, tmp_path):
    text = dump(base_matrix(fake.base_url)) + "extra: " + "[" * 20000 + "]" * 20000 + "\n"
    path = write_matrix(text)
    for command in (["validate", path], ["run", path, "--out", tmp_path / "run", "-q"]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert f"{path}: the YAML is nested too deeply" in result.output
    assert fake.chat_calls == 0


def test_item6_deeply_nested_jsonl_is_an_input_error(fake, write_matrix, tmp_path):
    lines = tmp_path / "t.jsonl"
    lines.write_text('{"session_id": "a", "messages": [{"role": "user", "content": "hi"}]}\n'
                     '{"session_id": "b", "messages": ' + "[" * 200000 + "]" * 200000 + "}\n", encoding="utf-8")
    result = invoke("judge", "--transcripts", lines, "--matrix", write_matrix(base_matrix(fake.base_url)),
                    "--out", tmp_path / "run", "-q")
    assert result.exit_code == 2, result.output
    assert f"{lines}:2: the JSON is nested too deeply" in result.output
    assert fake.chat_calls == 0


def _truncated_cache(path: Path) -> Path:
    cache = ResponseCache(path)
    for i in range(300):
        cache.put(f"key{i}", "m", "application/json", b"x" * 4000)
    cache.close()
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return path


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_item6_a_damaged_cache_file_is_an_input_error(damage, fake, write_matrix, tmp_path):
    cache = tmp_path / "cache.sqlite"
    if damage == "garbage":
        cache.write_bytes(b"this is not a database " * 200)
    else:
        _truncated_cache(cache)
    result = run_cli(write_matrix(base_matrix(fake.base_url)), tmp_path / "run", "--cache", cache)
    assert result.exit_code == 2, result.output
    assert f"{cache}: damaged or not a simbench response cache" in result.output
    assert fake.chat_calls == 0
    assert not (tmp_path / "run" / "run.sqlite").exists()


@pytest.fixture
def finished_run(fake, write_matrix, tmp_path):
    matrix = write_matrix(base_matrix(fake.base_url))
    out = tmp_path / "good"
    assert run_cli(matrix, out, "--no-cache").exit_code == 0
    return matrix, out


def _commands_on(run_dir: Path, matrix: Path, good: Path, tmp_path: Path) -> list[list]:
    return [["report", run_dir], ["run", matrix, "--out", run_dir, "--resume", "-q", "--no-cache"],
            ["compare", good, run_dir], ["compare", run_dir, good],
            ["judge", run_dir, "--out", tmp_path / "judged", "-q", "--no-cache"]]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_item6_a_damaged_run_file_is_an_input_error(damage, finished_run, fake, tmp_path):
    matrix, good = finished_run
    bad = tmp_path / "bad"
    bad.mkdir()
    if damage == "garbage":
        (bad / "run.sqlite").write_bytes(b"not sqlite at all " * 500)
    else:
        data = (good / "run.sqlite").read_bytes()
        (bad / "run.sqlite").write_bytes(data[: len(data) // 3])
    calls = fake.chat_calls
    for command in _commands_on(bad, matrix, good, tmp_path):
        result = invoke(*command)
        assert result.exit_code == 2, (command, result.output)
        assert "damaged or not a simbench run file" in result.output, (command, result.output)
    assert fake.chat_calls == calls


def test_item6_a_run_file_of_a_newer_schema_is_an_input_error(finished_run, fake, tmp_path):
    matrix, good = finished_run
    newer = tmp_path / "newer"
    newer.mkdir()
    db = sqlite3.connect(good / "run.sqlite")
    db.execute(f"VACUUM INTO '{newer / 'run.sqlite'}'")
    db.close()
    db = sqlite3.connect(newer / "run.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.close()
    calls = fake.chat_calls
    for command in _commands_on(newer, matrix, good, tmp_path):
        result = invoke(*command)
        assert result.exit_code == 2, (command, result.output)
        assert "written by a newer simbench (schema 99" in result.output, (command, result.output)
    assert fake.chat_calls == calls


@pytest.mark.parametrize("damage", ["empty file", "matrix_json"])
def test_item6_a_run_file_without_a_readable_run_is_an_input_error(damage, finished_run, fake, tmp_path):
    matrix, good = finished_run
    bad = tmp_path / "bad"
    bad.mkdir()
    if damage == "empty file":
        (bad / "run.sqlite").write_bytes(b"")
        expected = "holds no run"
    else:
        db = sqlite3.connect(good / "run.sqlite")
        db.execute(f"VACUUM INTO '{bad / 'run.sqlite'}'")
        db.close()
        db = sqlite3.connect(bad / "run.sqlite")
        db.execute("UPDATE runs SET matrix_json = ?", (json.dumps({"name": "x", "repeats": [[[[1]]]]}),))
        db.commit()
        db.close()
        expected = "the run's matrix cannot be read"
    calls = fake.chat_calls
    for command in (["report", bad], ["judge", bad, "--out", tmp_path / "judged", "-q", "--no-cache"]):
        result = invoke(*command)
        assert result.exit_code == 2, (command, result.output)
        assert expected in result.output, (command, result.output)
    assert fake.chat_calls == calls


# -- item 8: a plan over the cap is refused before it is expanded ----------------------------------


def test_item8_a_plan_over_the_cap_is_refused_by_validate(fake, write_matrix):
    # 2 variants x 1 topic x 1 persona x 600,000 repeats = 1.2 million sessions.
    text = dump(base_matrix(fake.base_url, repeats=600_000))
    path = write_matrix(text)
    result = invoke("validate", path)
    assert result.exit_code == 2, result.output
    assert f"{path}:{line_of(text, 'repeats:')}: repeats: the plan has 1,200,000 sessions" in result.output
    assert "1,000,000" in result.output


def test_item8_a_huge_repeats_is_refused_without_expanding(fake):
    # Expanding a billion samples took 3.9 GB and minutes; the check is arithmetic.
    with pytest.raises(MatrixError, match="1,000,000,000"):
        parse_matrix(dump(base_matrix(fake.base_url, personas=["impatient"], repeats=500_000_000)))
    m = parse_matrix(dump(base_matrix(fake.base_url, repeats=500_000)))
    assert m.planned_sessions() == 1_000_000  # the cap itself is allowed


# -- item 9: keys given twice are errors with their line ------------------------------------------


def test_item9_a_duplicate_key_in_the_matrix_names_its_line(fake, write_matrix):
    text = dump(base_matrix(fake.base_url)) + "repeats: 5\n"
    path = write_matrix(text)
    result = invoke("validate", path)
    assert result.exit_code == 2, result.output
    assert f"{path}:{line_of(text, 'repeats:', 2)}: YAML error: duplicate key 'repeats' (first on line " \
           f"{line_of(text, 'repeats:')})" in result.output
    # Nested mappings too.
    nested = dump(base_matrix(fake.base_url)).replace("  max_tokens: 64\n", "  max_tokens: 64\n  max_tokens: 8\n", 1)
    result = invoke("validate", write_matrix(nested))
    assert result.exit_code == 2 and "duplicate key 'max_tokens'" in result.output


def test_item9_a_duplicate_key_in_a_persona_file_names_that_file(fake, write_matrix, tmp_path):
    people = tmp_path / "people.yaml"
    people.write_text("shy:\n  description: a shy student\n  description: a loud student\n", encoding="utf-8")
    result = invoke("validate", write_matrix(base_matrix(fake.base_url, personas=[{"file": "people.yaml"}])))
    assert result.exit_code == 2, result.output
    assert f"{people}:3: YAML error: duplicate key 'description'" in result.output


def test_item9_a_duplicate_key_in_a_label_map_names_its_line(fake, write_matrix, tmp_path):
    label_map = tmp_path / "map.yaml"
    label_map.write_text("coherence:\n  good: coherent\n  good: incoherent\n", encoding="utf-8")
    lines = tmp_path / "t.jsonl"
    lines.write_text(json.dumps({"session_id": "a", "labels": {"coherence": "good"}, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n", encoding="utf-8")
    result = invoke("calibrate", lines, "--map", label_map, "--matrix", write_matrix(base_matrix(fake.base_url)),
                    "--out", tmp_path / "run", "-q")
    assert result.exit_code == 2, result.output
    assert f"{label_map}:3: YAML error: duplicate key 'good'" in result.output
    assert fake.chat_calls == 0


def test_item9_a_duplicate_key_in_a_jsonl_object_names_its_line(fake, write_matrix, tmp_path):
    lines = tmp_path / "t.jsonl"
    good = {"session_id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    lines.write_text(json.dumps(good) + "\n"
                     + '{"session_id": "b", "session_id": "c", "messages": [{"role": "user", "content": "hi"},'
                       ' {"role": "assistant", "content": "yo"}]}\n', encoding="utf-8")
    result = invoke("judge", "--transcripts", lines, "--matrix", write_matrix(base_matrix(fake.base_url)),
                    "--out", tmp_path / "run", "-q")
    assert result.exit_code == 2, result.output
    assert f"{lines}:2: duplicate key 'session_id'" in result.output
    assert fake.chat_calls == 0


# -- item 11: --gate on a judge that does not run is refused before any call -----------------------


def test_item11_run_gate_on_an_unknown_judge_exits_2_before_any_call(fake, write_matrix, tmp_path):
    out = tmp_path / "run"
    result = run_cli(write_matrix(base_matrix(fake.base_url)), out, "--gate", "goal_completon=0.8")
    assert result.exit_code == 2, result.output
    assert "goal_completon" in result.output and "coherence, correctness" in result.output
    assert fake.chat_calls == 0
    assert not (out / "run.sqlite").exists()


def test_item11_judge_gate_on_an_unknown_judge_exits_2_before_any_call(fake, write_matrix, tmp_path):
    lines = tmp_path / "t.jsonl"
    lines.write_text(json.dumps({"session_id": "a", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n", encoding="utf-8")
    result = invoke("judge", "--transcripts", lines, "--matrix", write_matrix(base_matrix(fake.base_url)),
                    "--out", tmp_path / "run", "-q", "--gate", "nosuch=0.5")
    assert result.exit_code == 2, result.output
    assert "nosuch" in result.output and "coherence, correctness" in result.output
    assert fake.chat_calls == 0


def test_item11_judge_gate_without_transcripts_is_a_usage_error(finished_run, fake, tmp_path):
    _, good = finished_run
    calls = fake.chat_calls
    result = invoke("judge", good, "--out", tmp_path / "judged", "-q", "--gate", "coherence=0.5")
    assert result.exit_code == 2 and "--gate applies to --transcripts only" in result.output, result.output
    assert fake.chat_calls == calls  # it was ignored before: the run was judged with no gate


# -- item 12: settings that are not what they look like ------------------------------------------


@pytest.mark.parametrize("field, value, needle, message", [
    ("base_url", "not a url", "base_url:", "must be an http:// or https:// URL"),
    ("base_url", "ftp://example.com/v1", "base_url:", "must be an http:// or https:// URL"),
    ("timeout", float("inf"), "timeout:", "finite number"),
    ("timeout", float("nan"), "timeout:", "finite number"),
    ("max_retries", True, "max_retries:", "valid integer"),
])
def test_item12_model_settings_are_checked_strictly(field, value, needle, message, fake, write_matrix):
    m = base_matrix(fake.base_url)
    m["models"]["fake"][field] = value
    text = dump(m)
    path = write_matrix(text)
    result = invoke("validate", path)
    assert result.exit_code == 2, result.output
    assert f"{path}:{line_of(text, needle)}: models.fake.{field}: " in result.output
    assert message in result.output


@pytest.mark.parametrize("field, value, message", [
    ("repeats", True, "valid integer"), ("max_turns", "3", "valid integer"), ("concurrency", "8", "valid integer"),
])
def test_item12_matrix_counts_are_strict_integers(field, value, message, fake, write_matrix):
    text = dump(base_matrix(fake.base_url, **{field: value}))
    path = write_matrix(text)
    result = invoke("validate", path)
    assert result.exit_code == 2, result.output
    assert f"{path}:{line_of(text, field + ':')}: {field}: " in result.output and message in result.output


def test_item12_an_empty_key_variable_is_said_to_be_empty(fake, write_matrix, tmp_path, monkeypatch):
    m = base_matrix(fake.base_url)
    m["models"]["fake"]["api_key_env"] = "SIMBENCH_EMPTY_KEY"
    path = write_matrix(m)
    monkeypatch.setenv("SIMBENCH_EMPTY_KEY", "")
    result = run_cli(path, tmp_path / "a", "--no-cache")
    assert result.exit_code == 2 and "SIMBENCH_EMPTY_KEY is set but empty" in result.output, result.output
    monkeypatch.delenv("SIMBENCH_EMPTY_KEY")
    result = run_cli(path, tmp_path / "b", "--no-cache")
    assert result.exit_code == 2 and "SIMBENCH_EMPTY_KEY is not set" in result.output, result.output
    assert fake.chat_calls == 0
