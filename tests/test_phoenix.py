"""The phoenix trace store against a REAL Phoenix server, started here from its own venv.

``SIMBENCH_PHOENIX`` names the ``phoenix`` executable of a venv with ``arize-phoenix`` (its own
venv, so Phoenix's ~100 dependencies cannot hide one simbench forgot). Without it these tests skip,
unless ``SIMBENCH_REQUIRE_PHOENIX=1`` (CI), where a missing server is a failure.

Models are the fake OpenAI server; everything else is real: the CLI, the tracer, OTLP/HTTP into
Phoenix, ``phoenix.client`` out, session annotations back.
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from conftest import base_matrix, invoke, run_cli
from fake_openai import judge_name

from simbench.children import free_port
from simbench.tracing.phoenix import PhoenixStore

READY_TIMEOUT_S = 180


@pytest.fixture(scope="session")
def phoenix_server(tmp_path_factory):
    """A Phoenix server on 127.0.0.1 with its own working dir and free ports, for the whole session:
    {"url": its HTTP root, "grpc_port": its OTLP gRPC receiver}."""
    executable = os.environ.get("SIMBENCH_PHOENIX")
    if not executable:
        message = ("SIMBENCH_PHOENIX is not set: point it at the phoenix executable of a venv with arize-phoenix "
                   "(python3 -m venv V && V/bin/pip install arize-phoenix; SIMBENCH_PHOENIX=V/bin/phoenix)")
        if os.environ.get("SIMBENCH_REQUIRE_PHOENIX") == "1":
            pytest.fail(message)
        pytest.skip(message)
    workdir = tmp_path_factory.mktemp("phoenix")
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "OTEL_")) and k != "PYTHONPATH"}
    env.update(PHOENIX_WORKING_DIR=str(workdir), PHOENIX_HOST="127.0.0.1", PHOENIX_PORT=str(port),
               PHOENIX_GRPC_PORT=str(grpc_port), PHOENIX_TELEMETRY_ENABLED="false")
    log_path = workdir / "phoenix.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([executable, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_ready(url, process, log_path)
        yield {"url": url, "grpc_port": grpc_port}
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="session")
def phoenix_url(phoenix_server):
    return phoenix_server["url"]


def _wait_until_ready(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"phoenix serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"phoenix serve was not ready after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


# -- helpers that read Phoenix directly (never through simbench's store) -----------------------------


def _phoenix_spans(url: str, project: str):
    """Every span of the project, through phoenix.client, with a limit far above what a test makes."""
    from phoenix.client import Client

    now = datetime.now(timezone.utc)
    return Client(base_url=url).spans.get_spans_dataframe(
        project_identifier=project, start_time=now - timedelta(hours=2), end_time=now + timedelta(minutes=5),
        limit=100_000, timeout=60)


def _annotations(url: str, project: str, kind: str, ids: list[str]) -> list[dict]:
    """Session or span annotations (``kind``) through Phoenix's REST API, paged, read directly rather
    than through simbench's store (phoenix.client has no reader for session annotations yet)."""
    out: list[dict] = []
    cursor = None
    while True:
        params: dict = {f"{kind}_ids": ids, "limit": 1000}
        if cursor:
            params["cursor"] = cursor
        response = httpx.get(f"{url}/v1/projects/{project}/{kind}_annotations", params=params, timeout=30)
        response.raise_for_status()
        body = response.json()
        out.extend(body["data"])
        cursor = body.get("next_cursor")
        if not cursor:
            return out


def _session_annotations(url: str, project: str, session_ids: list[str]) -> list[dict]:
    return _annotations(url, project, "session", session_ids)


def _labels_by_judge(prompt: str, labels: list[str]) -> str:
    # coherence answers its last label, every other judge its first: labels differ by judge
    return labels[-1] if judge_name(prompt) == "coherence" else labels[0]


def _phoenix_matrix(fake_url: str, phoenix: str, project: str, **overrides):
    return base_matrix(fake_url, trace_store={"kind": "phoenix", "endpoint": phoenix, "project": project}, **overrides)


@pytest.fixture(scope="module")
def traced_run(phoenix_url, tmp_path_factory):
    """One small matrix run into Phoenix (module-scoped: several tests read the same run)."""
    import yaml
    from conftest import RecordingFake, RunFiles

    tmp = tmp_path_factory.mktemp("traced")
    with RecordingFake(latency=0, judge_label=_labels_by_judge) as fake:
        matrix = tmp / "matrix.yaml"
        matrix.write_text(yaml.safe_dump(_phoenix_matrix(fake.base_url, phoenix_url, "simbench-run", repeats=2)))
        result = run_cli(matrix, tmp / "run", "--no-cache")
        assert result.exit_code == 0, result.output
        files = RunFiles(tmp / "run")
        yield {"files": files, "fake": fake, "matrix": matrix, "project": "simbench-run", "output": result.output}
        files.close()


def test_a_run_sends_only_tutor_and_closing_spans_to_phoenix(traced_run, phoenix_url):
    files, fake = traced_run["files"], traced_run["fake"]
    spans = _phoenix_spans(phoenix_url, traced_run["project"])
    sessions = {s["session_id"] for s in files.sessions()}
    assert len(sessions) == 4
    assert set(spans["attributes.session.id"]) == sessions
    # one turn span per tutor turn holding that turn's one LLM call, one closing span per session,
    # nothing else (no student, no judge)
    assert sorted(spans["name"].value_counts().items()) == \
        [("ChatCompletion", fake.roles["tutor"]), ("session.end", 4), ("tutor.turn", fake.roles["tutor"])]
    turns = spans[spans["name"] == "tutor.turn"]
    # roots: Phoenix's dataframe writes a missing parent id as the string "None"
    assert set(turns["parent_id"].map(str)) == {"None"} and set(turns["span_kind"]) == {"AGENT"}
    assert set(spans[spans["name"] == "ChatCompletion"]["parent_id"]) == set(turns["context.span_id"])
    assert fake.roles["student"] > 0 and fake.roles["judge"] > 0
    inputs = " ".join(str(m) for ms in spans["attributes.llm.input_messages"].dropna() for m in ms)
    assert "role-playing" not in inputs and "reference answer" not in inputs
    # the same spans as the run's own copy, with the same ids
    assert set(spans["context.span_id"]) == {s["span_id"] for s in files.spans()}


def test_every_judgement_is_a_session_annotation_in_phoenix(traced_run, phoenix_url):
    files = traced_run["files"]
    local = {(j["session_id"], j["judge"]): j for j in files.judgements()}
    assert {j["status"] for j in local.values()} == {"ok"}
    annotations = _session_annotations(phoenix_url, traced_run["project"], sorted({k[0] for k in local}))
    remote = {(a["session_id"], a["name"]): a for a in annotations}
    assert set(remote) == set(local)
    for key, annotation in remote.items():
        assert annotation["annotator_kind"] == "LLM"
        assert annotation["result"]["label"] == local[key]["label"]
        assert annotation["result"]["score"] == pytest.approx(local[key]["score"])
        assert annotation["result"]["explanation"] == local[key]["explanation"]
    assert {a["result"]["label"] for a in annotations if a["name"] == "coherence"} != \
        {a["result"]["label"] for a in annotations if a["name"] == "correctness"}
    assert "Logged 8 judgement(s) of 4 session(s)" in traced_run["output"]


def test_push_again_updates_instead_of_duplicating(traced_run, phoenix_url):
    files = traced_run["files"]
    result = invoke("push", files.run_dir, "--store", "phoenix", "--endpoint", phoenix_url,
                    "--project", traced_run["project"])
    assert result.exit_code == 0, result.output
    assert "logged 8 of 8 judgement(s) on 4 session(s)" in result.output
    annotations = _session_annotations(phoenix_url, traced_run["project"], [s["session_id"] for s in files.sessions()])
    assert len(annotations) == 8


def test_judge_store_judges_a_time_window_and_logs_back(traced_run, phoenix_url, tmp_path, make_fake, open_run):
    files = traced_run["files"]
    # A second judge model, so the new verdicts are new annotations next to the run's own.
    judge_fake = make_fake(judge_label=lambda prompt, labels: labels[0])
    import yaml

    matrix = tmp_path / "judges.yaml"
    matrix.write_text(yaml.safe_dump(base_matrix(judge_fake.base_url, judges={"model": "fake", "use": ["coherence"]})))
    now = datetime.now(timezone.utc)
    result = invoke("judge", "--store", "phoenix", "--endpoint", phoenix_url, "--project", traced_run["project"],
                    "--start", (now - timedelta(hours=1)).isoformat(), "--end", (now + timedelta(minutes=1)).isoformat(),
                    "--matrix", matrix, "--out", tmp_path / "judged", "-q", "--no-cache")
    assert result.exit_code == 0, result.output
    judged = open_run(tmp_path / "judged")
    assert {s["session_id"] for s in judged.sessions()} == {s["session_id"] for s in files.sessions()}
    # the same samples as the simulated run (names come from the spans' metadata)
    assert {s["sample_id"] for s in judged.sessions()} == {s["sample_id"] for s in files.sessions()}
    assert [(j["judge"], j["status"], j["label"]) for j in judged.judgements()] == [("coherence", "ok", "coherent")] * 4
    assert judge_fake.roles["judge"] == 4 and judge_fake.roles["tutor"] == 0 and judge_fake.roles["student"] == 0
    # the transcripts the judge read came from Phoenix, and the report shows them
    assert judged.transcripts() == files.transcripts()
    assert "Tutor turn 1" in (tmp_path / "judged" / "report.html").read_text()
    annotations = _session_annotations(phoenix_url, traced_run["project"], [s["session_id"] for s in files.sessions()])
    # same judge name, model name and sample as the run's verdicts: the new verdicts replace them
    coherence = [a for a in annotations if a["name"] == "coherence"]
    assert [a["result"]["label"] for a in coherence] == ["coherent"] * 4
    assert len(annotations) == 8


def test_judge_store_where_selects_sessions(traced_run, phoenix_url, tmp_path, open_run):
    now = datetime.now(timezone.utc)
    result = invoke("judge", "--store", "phoenix", "--endpoint", phoenix_url, "--project", traced_run["project"],
                    "--start", (now - timedelta(hours=1)).isoformat(), "--end", (now + timedelta(minutes=1)).isoformat(),
                    "--where", "metadata['variant'] == 'direct'", "--matrix", traced_run["matrix"],
                    "--out", tmp_path / "direct", "-q", "--no-cache")
    assert result.exit_code == 0, result.output
    judged = open_run(tmp_path / "direct")
    assert {s["variant"] for s in judged.sessions()} == {"direct"}
    assert len(judged.sessions()) == 2
    # whole sessions: both tutor turns and the closing message, not only the spans that matched
    assert all(len(t) == 5 for t in judged.transcripts().values())


def test_paging_reads_more_than_a_thousand_spans(phoenix_url, fake, write_matrix, tmp_path, open_run):
    """520 sessions x (1 turn span + the 1 LLM span under it + 1 closing span) = 1,560 spans: past
    phoenix.client's default limit of 1,000. Every session must come back from Phoenix and be judged."""
    matrix = write_matrix(_phoenix_matrix(fake.base_url, phoenix_url, "simbench-paging", repeats=260, max_turns=1,
                                          concurrency=32, judges={"model": "fake", "use": ["coherence"], "max_tokens": 64}))
    result = run_cli(matrix, tmp_path / "run", "--no-cache")
    assert result.exit_code == 0, result.output
    files = open_run(tmp_path / "run")
    assert len(files.spans()) == 1560
    from phoenix.client import Client

    now = datetime.now(timezone.utc)
    window = dict(start_time=now - timedelta(hours=1), end_time=now + timedelta(minutes=5))
    # phoenix.client's default answers 1,000 and says nothing: the reason for paging
    assert len(Client(base_url=phoenix_url).spans.get_spans_dataframe(project_identifier="simbench-paging", **window)) == 1000
    store = PhoenixStore(phoenix_url, "simbench-paging")
    assert len(store.fetch_all(window["start_time"], window["end_time"])) == 1560
    # a smaller page splits the window more often and still returns every span once
    small = PhoenixStore(phoenix_url, "simbench-paging", page_size=100)
    frame = small.fetch_all(window["start_time"], window["end_time"])
    assert len(frame) == 1560 and frame["context.span_id"].is_unique
    from simbench.tracing.local import SPAN_COLUMNS

    assert set(SPAN_COLUMNS) <= set(frame.columns)  # the span dataframe every store hands back
    judgements = files.judgements()
    assert len(judgements) == 520 and {j["status"] for j in judgements} == {"ok"}
    assert len(_session_annotations(phoenix_url, "simbench-paging", [s["session_id"] for s in files.sessions()])) == 520


def test_push_of_a_local_run(phoenix_url, fake, write_matrix, tmp_path, open_run):
    """A run traced only locally (or whose store was down) is logged to Phoenix later."""
    run = run_cli(write_matrix(base_matrix(fake.base_url)), tmp_path / "run", "--no-cache")
    assert run.exit_code == 0, run.output
    files = open_run(tmp_path / "run")
    result = invoke("push", tmp_path / "run", "--store", "phoenix", "--endpoint", phoenix_url, "--project", "pushed")
    assert result.exit_code == 0, result.output
    # Phoenix never saw these sessions: push sends their spans first, from the run's own copy
    assert f"sent {len(files.spans())} span(s) the store did not hold" in result.output
    spans = _phoenix_spans(phoenix_url, "pushed")
    assert sorted(spans["context.span_id"]) == sorted(s["span_id"] for s in files.spans())
    sessions = [s["session_id"] for s in files.sessions()]
    annotations = _session_annotations(phoenix_url, "pushed", sessions)
    assert sorted((a["session_id"], a["name"], a["result"]["label"]) for a in annotations) == \
        sorted((j["session_id"], j["judge"], j["label"]) for j in files.judgements())


def test_arize_otel_exports_over_grpc_with_the_project(phoenix_server, monkeypatch):
    """The arize store's span path (``arize.otel.register``, gRPC, the project as a resource) into a
    real OTLP gRPC receiver: Phoenix's, since AX itself cannot be reached from here."""
    from openinference.instrumentation import using_attributes

    from simbench.tracing.arize import ArizeStore
    from simbench.tracing.setup import record_session_end, route_spans_to

    monkeypatch.setenv("ARIZE_COLLECTOR_ENDPOINT", f"http://127.0.0.1:{phoenix_server['grpc_port']}")
    store = ArizeStore("space-id", "api-key", "simbench-arize-grpc")
    store.check()  # the collector answers
    with route_spans_to(store.span_processor()):
        for n in range(3):
            with using_attributes(session_id=f"ax-run/{n}/1", metadata={"variant": "v"}):
                record_session_end(f"goodbye {n}", "max_turns")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = _phoenix_spans(phoenix_server["url"], "simbench-arize-grpc")
        if len(spans) >= 3:
            break
        time.sleep(0.5)
    assert sorted(spans["attributes.session.id"]) == ["ax-run/0/1", "ax-run/1/1", "ax-run/2/1"]
    assert sorted(spans["attributes.input.value"]) == ["goodbye 0", "goodbye 1", "goodbye 2"]


class _FailingPhoenix:
    """A Phoenix that answers the reachability check and then fails every other request: a server
    that goes down mid-run. (A stand-in at the network boundary, like the fake model server.)"""

    def __enter__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, status: int, body: bytes) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.startswith("/v1/projects?") or self.path == "/v1/projects":
                    self._answer(200, b'{"data": [], "next_cursor": null}')
                else:
                    self._answer(500, b'{"detail": "down"}')

            def do_POST(self):
                # 400 for OTLP: the exporter gives up at once instead of backing off for a minute
                self._answer(400 if self.path == "/v1/traces" else 500, b'{"detail": "down"}')

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_store_that_fails_mid_run_loses_nothing(phoenix_url, fake, write_matrix, tmp_path, open_run):
    with _FailingPhoenix() as broken:
        matrix = write_matrix(_phoenix_matrix(fake.base_url, broken.url, "recovered"))
        result = run_cli(matrix, tmp_path / "run", "--no-cache")
    assert result.exit_code == 0, result.output
    assert "judging the run's own copy of the spans instead" in result.output
    assert "judgements were not logged" in result.output and "simbench push" in result.output
    files = open_run(tmp_path / "run")
    judgements = files.judgements()
    assert len(judgements) == 4 and {j["status"] for j in judgements} == {"ok"}
    # the server is back (here: the real one): push sends the spans and the judgements
    pushed = invoke("push", tmp_path / "run", "--store", "phoenix", "--endpoint", phoenix_url, "--project", "recovered")
    assert pushed.exit_code == 0, pushed.output
    annotations = _session_annotations(phoenix_url, "recovered", [s["session_id"] for s in files.sessions()])
    assert sorted((a["session_id"], a["name"], a["result"]["label"]) for a in annotations) == \
        sorted((j["session_id"], j["judge"], j["label"]) for j in judgements)
    assert len(_phoenix_spans(phoenix_url, "recovered")) == len(files.spans())


def _span_annotations(url: str, project: str, span_ids: list[str]) -> list[dict]:
    return _annotations(url, project, "span", span_ids)


def test_per_turn_judgements_are_span_annotations_on_their_tutor_spans(phoenix_url, make_fake, write_matrix,
                                                                         tmp_path, open_run):
    """A per-turn judge's verdicts land on the tutor span of each turn, its session aggregate on the
    session; a second push updates them instead of adding copies."""
    from test_turn_judges import TURN_JUDGE, _tutor

    fake = make_fake(tutor=_tutor,
                     judge_label=lambda prompt, labels: "reveals" if "Reply: The answer is" in prompt else labels[0])
    project = "simbench-turns"
    matrix = _phoenix_matrix(fake.base_url, phoenix_url, project, max_turns=3)
    matrix["judges"]["custom"] = {"reveals_turn": TURN_JUDGE}
    matrix["judges"]["use"] = ["coherence", "reveals_turn"]
    result = run_cli(write_matrix(matrix), tmp_path / "run", "--no-cache")
    assert result.exit_code == 0, result.output
    assert "Logged 10 judgement(s) of 2 session(s), 6 of them per turn on the turn's tutor span" in result.output
    files = open_run(tmp_path / "run")
    local_turns = files.rows("SELECT * FROM turn_evaluations ORDER BY session_id, turn")
    assert len(local_turns) == 6 and {t["status"] for t in local_turns} == {"ok"}

    # the tutor spans of each session as Phoenix holds them, in turn order
    spans = _phoenix_spans(phoenix_url, project).sort_values("start_time")
    tutor_spans = spans[spans["name"] == "tutor.turn"].groupby("attributes.session.id")["context.span_id"].agg(list)
    assert sorted(tutor_spans.index) == sorted(s["session_id"] for s in files.sessions())
    assert all(len(ids) == 3 for ids in tutor_spans)

    annotations = _span_annotations(phoenix_url, project, list(spans["context.span_id"]))
    assert len(annotations) == 6  # the turns only: nothing on the closing spans, no session verdict on a span
    on_span = {a["span_id"]: a for a in annotations}
    for session_id, span_ids in tutor_spans.items():
        turn_annotations = [on_span[span_id] for span_id in span_ids]
        assert [a["name"] for a in turn_annotations] == ["reveals_turn"] * 3
        assert [a["result"]["label"] for a in turn_annotations] == ["withholds", "reveals", "withholds"]
        assert [a["result"]["score"] for a in turn_annotations] == [1, 0, 1]
        assert all(a["annotator_kind"] == "LLM" for a in turn_annotations)
        assert [a["metadata"]["turn"] for a in turn_annotations] == [1, 2, 3]
        assert {a["metadata"]["session_id"] for a in turn_annotations} == {session_id}
        local = [t for t in local_turns if t["session_id"] == session_id]
        assert [a["result"]["explanation"] for a in turn_annotations] == [t["explanation"] for t in local]
        assert [t["span_id"] for t in local] == span_ids

    # the per-turn judge's session aggregate is a session annotation, beside the session judge's
    sessions = sorted(tutor_spans.index)
    session_annotations = _session_annotations(phoenix_url, project, sessions)
    assert sorted((a["session_id"], a["name"], a["result"]["label"]) for a in session_annotations) == \
        sorted([(s, "coherence", "coherent") for s in sessions] + [(s, "reveals_turn", "failing_turn") for s in sessions])
    aggregate = next(a for a in session_annotations if a["name"] == "reveals_turn")
    assert "first failing turn: 2 of 3" in aggregate["result"]["explanation"]

    pushed = invoke("push", tmp_path / "run", "--store", "phoenix", "--endpoint", phoenix_url, "--project", project)
    assert pushed.exit_code == 0, pushed.output
    assert "logged 10 of 10 judgement(s) on 2 session(s), 6 of them per turn" in pushed.output
    again = _span_annotations(phoenix_url, project, list(spans["context.span_id"]))
    assert sorted(a["id"] for a in again) == sorted(a["id"] for a in annotations)
    assert len(_session_annotations(phoenix_url, project, sessions)) == 4

    # judging the sessions again from Phoenix (simbench judge --store) logs onto the same spans:
    # same judge, model name and sample, so the new turn verdicts replace the old ones
    judge_fake = make_fake(judge_label=lambda prompt, labels: labels[0])
    judges = base_matrix(judge_fake.base_url, judges={"model": "fake", "use": ["reveals_turn"],
                                                      "custom": {"reveals_turn": TURN_JUDGE}})
    now = datetime.now(timezone.utc)
    judged = invoke("judge", "--store", "phoenix", "--endpoint", phoenix_url, "--project", project,
                    "--start", (now - timedelta(hours=1)).isoformat(), "--end", (now + timedelta(minutes=1)).isoformat(),
                    "--matrix", write_matrix(judges, "judges.yaml"), "--out", tmp_path / "judged", "-q", "--no-cache")
    assert judged.exit_code == 0, judged.output
    assert judge_fake.roles["judge"] == 6
    rejudged = _span_annotations(phoenix_url, project, list(spans["context.span_id"]))
    assert sorted(a["id"] for a in rejudged) == sorted(a["id"] for a in annotations)
    assert {a["result"]["label"] for a in rejudged} == {"withholds"}


def test_custom_per_turn_and_multi_stage_judges_in_one_matrix_reach_phoenix(phoenix_url, make_fake, write_matrix,
                                                                             tmp_path, open_run):
    """The library's judges together: a custom session judge behind a cheap rule (multi-stage), a
    per-turn judge and a built-in one, run on the fake server into a real Phoenix."""
    from test_custom_judges import MARKER as SESSION_MARKER, REVEALS
    from test_turn_judges import TURN_JUDGE, _tutor

    def label(prompt: str, labels: list[str]) -> str:
        return "reveals" if "Reply: The answer is" in prompt or SESSION_MARKER in prompt else labels[0]

    fake = make_fake(tutor=_tutor, judge_label=label)
    project = "simbench-library-judges"
    matrix = _phoenix_matrix(fake.base_url, phoenix_url, project, max_turns=3)
    matrix["judges"]["custom"] = {
        "reveals_turn": TURN_JUDGE,
        # Only sessions whose tutor says "answer is" reach this judge (here every session, at turn 2).
        "reveals_answer": {**REVEALS, "when": {"text": "tutor", "regex": "answer is"}},
        # A rule no session meets: the judge is skipped everywhere and never called.
        "long_talk": {"prompt": "Still on topic? {transcript}", "choices": {"on": 1, "off": 0},
                      "when": {"min_chars": 100000}},
    }
    matrix["judges"]["use"] = ["coherence", "reveals_turn", "reveals_answer", "long_talk"]
    result = run_cli(write_matrix(matrix), tmp_path / "run", "--no-cache")
    assert result.exit_code == 0, result.output

    files = open_run(tmp_path / "run")
    sessions = [s["session_id"] for s in files.sessions()]
    by_judge: dict[str, list[dict]] = {}
    for j in files.judgements():
        by_judge.setdefault(j["judge"], []).append(j)
    assert {j["status"] for j in by_judge["long_talk"]} == {"skipped"}
    assert {(j["status"], j["label"]) for j in by_judge["reveals_answer"]} == {("ok", "reveals")}
    assert {j["label"] for j in by_judge["reveals_turn"]} == {"failing_turn"}
    assert not [r for r in fake.requests_of("judge") if "Still on topic?" in str(r["messages"])]

    annotations = _session_annotations(phoenix_url, project, sessions)
    logged = {(a["session_id"], a["name"]) for a in annotations}
    for session_id in sessions:
        assert {(session_id, name) for name in ("coherence", "reveals_turn", "reveals_answer")} <= logged
        assert (session_id, "long_talk") not in logged  # a skipped judgement is not a verdict
    spans = _phoenix_spans(phoenix_url, project)
    turn_annotations = _span_annotations(phoenix_url, project, list(spans["context.span_id"]))
    assert len(turn_annotations) == 3 * len(sessions)
    assert [a["result"]["label"] for a in sorted(turn_annotations, key=lambda a: (a["metadata"]["session_id"],
                                                                                  a["metadata"]["turn"]))] == \
        ["withholds", "reveals", "withholds"] * len(sessions)


def test_an_instrumented_http_tutor_app_traces_into_the_sessions_and_judge_store_rebuilds_them(
        phoenix_url, fake, tmp_path, open_run):
    """Issue 11: examples/own_tutor/server.py (instrumented with OpenInference) started by the run as an
    http tutor, exporting to the run's Phoenix project: its spans are children of simbench's turn
    spans in the same sessions, and ``judge --store phoenix`` rebuilds the transcripts the run had."""
    import yaml
    from test_tutor_kinds import _example_on_fake

    project = "own-tutor-http"
    path = _example_on_fake(fake, tmp_path, "http.yaml")
    matrix = yaml.safe_load(path.read_text())
    matrix["trace_store"] = {"kind": "phoenix", "endpoint": phoenix_url, "project": project}
    path.write_text(yaml.safe_dump(matrix, sort_keys=False))
    result = run_cli(path, tmp_path / "run", "--no-cache")
    assert result.exit_code == 0, result.output
    run = open_run(tmp_path / "run")
    sessions = {s["session_id"] for s in run.sessions()}
    turns = {s["span_id"]: s for s in run.spans() if s["name"] == "tutor.turn"}
    assert len(sessions) == 8 and len(turns) == sum(s["turns"] for s in run.sessions())

    deadline, spans = time.monotonic() + 60, None
    while time.monotonic() < deadline:  # the app exports on its own; wait until Phoenix has its spans
        spans = _phoenix_spans(phoenix_url, project)
        if (spans["name"] == "own_tutor.request").sum() >= len(turns):
            break
        time.sleep(1)
    apps = spans[spans["name"] == "own_tutor.request"]
    assert len(apps) == len(turns)
    for _, app in apps.iterrows():
        turn = turns[app["parent_id"]]  # a child of simbench's turn span, in its trace and its session
        assert app["context.trace_id"] == turn["trace_id"]
        assert app["attributes.session.id"] == turn["attributes"]["session.id"]
        assert app["attributes.output.value"] == turn["attributes"]["output.value"]
    app_llm = spans[(spans["span_kind"] == "LLM") & spans["parent_id"].isin(set(apps["context.span_id"]))]
    assert len(app_llm) == 2 * len(turns)  # the app's two model calls per turn, inside the session
    assert set(spans["attributes.session.id"].dropna()) == sessions

    now = datetime.now(timezone.utc)
    judged = invoke("judge", "--store", "phoenix", "--endpoint", phoenix_url, "--project", project,
                    "--start", (now - timedelta(hours=1)).isoformat(), "--end", (now + timedelta(minutes=1)).isoformat(),
                    "--matrix", path, "--out", tmp_path / "judged", "-q", "--no-cache")
    assert judged.exit_code == 0, judged.output
    again = open_run(tmp_path / "judged")
    assert {s["session_id"] for s in again.sessions()} == sessions
    assert again.transcripts() == run.transcripts()
    assert all(len(messages) == 2 * s["turns"] + 1 for s in run.sessions()
               for sid, messages in again.transcripts().items() if sid == s["session_id"])
    # the tool calls too: the ones simbench wrote from the app's answer (marked), not the app's own
    # TOOL spans beside them, read back from Phoenix's columns
    app_tools = spans[(spans["span_kind"] == "TOOL") & spans["parent_id"].isin(set(apps["context.span_id"]))]
    assert len(app_tools) > 0
    mine, theirs = _rebuilt(tmp_path / "run"), _rebuilt(tmp_path / "judged")
    assert set(theirs) == set(mine)
    for session_id, transcript in mine.items():
        assert theirs[session_id].messages == transcript.messages
        assert theirs[session_id].turn_span_ids == transcript.turn_span_ids
        assert theirs[session_id].span_id == transcript.span_id
        assert theirs[session_id].metadata == transcript.metadata
    calls = [c for t in mine.values() for m in t.messages for c in m.tool_calls]
    marked = [s for s in run.spans() if s["attributes"].get("simbench.tool_call")]
    assert len(calls) == len(marked) > 0 and {c.name for c in calls} <= {"search_notes", "calculator"}


def _rebuilt(run_dir):
    """session id -> its transcript, rebuilt from a run directory's own span copy."""
    from simbench.evaluators.sessions import rebuild_sessions
    from simbench.store import RunStore
    from simbench.tracing.local import spans_dataframe

    store = RunStore.open_run_dir(run_dir)
    try:
        return {t.session_id: t for t in rebuild_sessions(spans_dataframe(store))}
    finally:
        store.close()


def test_spans_without_some_text_come_back_from_phoenix_as_they_went(phoenix_url, fake, write_matrix, tmp_path,
                                                                     open_run):
    """Imported conversations (an LLM root per reply, all in one trace) pushed to Phoenix and read back
    by the store: a conversation that ends with the tutor has a closing span without input, and
    roots have no parent. Phoenix's dataframe writes such missing text as "None"; the rebuild from
    Phoenix must equal the one from the run's own copy (no "None" message, no extra turn)."""
    import json

    from simbench.records import Message

    lines = [{"session_id": "ends-with-tutor", "messages": [{"role": "user", "content": "What is 2/3 of 9?"},
                                                           {"role": "assistant", "content": "It is 6."}]},
             {"session_id": "ends-with-student", "messages": [{"role": "user", "content": "1/2 + 1/3?"},
                                                             {"role": "assistant", "content": "5/6."},
                                                             {"role": "user", "content": "Thanks!"}]}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    matrix = write_matrix(base_matrix(fake.base_url, judges={"model": "fake", "use": ["coherence"], "max_tokens": 64}))
    judged = invoke("judge", "--transcripts", path, "--matrix", matrix, "--out", tmp_path / "run", "-q", "--no-cache")
    assert judged.exit_code == 0, judged.output
    pushed = invoke("push", tmp_path / "run", "--store", "phoenix", "--endpoint", phoenix_url, "--project", "imported")
    assert pushed.exit_code == 0, pushed.output
    raw = _phoenix_spans(phoenix_url, "imported")
    closing = raw[raw["name"] == "session.end"]["attributes.input.value"]
    assert sorted(closing) == ["None", "Thanks!"]  # what Phoenix's dataframe makes of a missing input

    files = open_run(tmp_path / "run")
    now = datetime.now(timezone.utc)
    store = PhoenixStore(phoenix_url, "imported")
    frame = store.fetch_all(now - timedelta(hours=1), now + timedelta(minutes=5))
    assert len(frame) == len(files.spans()) == 4 and frame["parent_id"].isna().all()
    assert frame[frame["name"] == "session.end"]["attributes.input.value"].isna().sum() == 1
    mine = _rebuilt(tmp_path / "run")
    from simbench.evaluators.sessions import rebuild_sessions

    theirs = {t.session_id: t for t in rebuild_sessions(frame)}
    assert set(theirs) == set(mine)
    for session_id, transcript in mine.items():
        assert theirs[session_id].messages == transcript.messages
        assert theirs[session_id].turn_span_ids == transcript.turn_span_ids
    assert sorted(len(t.messages) for t in theirs.values()) == [2, 3]
    assert all(Message("student", "None") not in t.messages for t in theirs.values())
