"""Per-turn judges: one verdict per tutor turn stored on the turn's span, aggregated per session
(any failing turn fails the session), and the first failing turn in the summary and report."""

from __future__ import annotations

import re

import pytest

from conftest import base_matrix, invoke, run_cli
from test_custom_judges import _check_message  # noqa: F401  (re-exported from test_matrix)
from simbench.evaluators.turns import FAILING_TURN, NO_FAILING_TURN, aggregate_turns, first_failing_turn
from simbench.records import Judgement

MARKER = "TURN-CHECK"
TURN_JUDGE = {
    "scope": "turn",
    "prompt": f"{MARKER} Does this tutor reply give the answer away?\nBefore it:\n{{context}}\nReply: {{reply}}\n"
              'Answer "withholds" or "reveals".',
    "choices": {"withholds": 1, "reveals": 0},
}


def _tutor(request: dict) -> str:
    turn = sum(1 for m in request["messages"] if m["role"] == "assistant") + 1
    return {1: "Think about the denominators {first}.", 2: "The answer is 5/6."}.get(turn, "Try another one.")


def _prompt_of(request: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in request["messages"])


def test_turn_verdicts_per_span_and_session_aggregate(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake(tutor=_tutor,
                     judge_label=lambda prompt, labels: "reveals" if "Reply: The answer is" in prompt else labels[0])
    matrix = base_matrix(fake.base_url, max_turns=3)
    matrix["judges"]["custom"] = {"reveals_turn": TURN_JUDGE}
    matrix["judges"]["use"] = ["coherence", "reveals_turn"]
    path = write_matrix(matrix)
    out = tmp_path / "run"
    result = run_cli(path, out, "--cache", tmp_path / "cache.sqlite")
    assert result.exit_code == 0, result.output

    run = open_run(out)
    sessions = run.sessions()
    assert len(sessions) == 2 and all(s["turns"] == 3 for s in sessions)
    turns = run.rows("SELECT * FROM turn_evaluations WHERE judge = 'reveals_turn' ORDER BY session_id, turn")
    assert len(turns) == 6
    spans = run.spans()
    for s in sessions:
        own = [t for t in turns if t["session_id"] == s["session_id"]]
        assert [t["turn"] for t in own] == [1, 2, 3]
        assert [t["label"] for t in own] == ["withholds", "reveals", "withholds"]
        assert [t["passed"] for t in own] == [1, 0, 1]
        # each verdict sits on the turn's root span (tutor.turn), not on the LLM call under it
        turn_spans = [x["span_id"] for x in spans if x["session_id"] == s["session_id"] and x["name"] == "tutor.turn"]
        assert len(turn_spans) == 3 and all(x["parent_id"] is None for x in spans if x["span_id"] in turn_spans)
        assert [t["span_id"] for t in own] == turn_spans

    aggregates = [j for j in run.judgements() if j["judge"] == "reveals_turn"]
    assert len(aggregates) == 2
    for a in aggregates:
        assert a["status"] == "ok" and a["label"] == FAILING_TURN and a["passed"] == 0
        assert "first failing turn: 2 of 3" in a["explanation"]
        assert a["score"] == pytest.approx(2 / 3)

    # a turn row reads the reply and only the conversation before it; braces in replies stay literal
    requests = [r for r in fake.requests_of("judge") if MARKER in _prompt_of(r)]
    assert len(requests) == 6
    first_turn = [p for p in map(_prompt_of, requests) if "Reply: Think about the denominators {first}." in p]
    assert len(first_turn) == 2
    assert all("Why isn't 1/2 + 1/3" in p and "The answer is" not in p for p in first_turn)

    summary = run.summary()
    assert summary["dimensions"]["reveals_turn"]["overall"]["fail"] == 2
    t = summary["turns"]["reveals_turn"]
    assert t["sessions"] == 2 and t["first_failing_turn"] == {"2": 2}
    assert t["turns_judged"] == 6 and t["turn_pass_share"] == pytest.approx(4 / 6)
    html = (out / "report.html").read_text()
    assert "At which turn do sessions go wrong?" in html and "first fails at turn 2" in html
    assert "turn 2 · <bdi>reveals_turn</bdi>" in html
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), sorted(i for i in set(ids) if ids.count(i) > 1)  # every link has one target
    assert 'href="#failing-turns"' in html and 'id="failing-turns"' in html

    # resume with nothing missing asks no judge again
    calls = fake.chat_calls
    resumed = run_cli(path, out, "--cache", tmp_path / "cache.sqlite", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert fake.chat_calls == calls


def _j(turn, status="ok", passed=True, label="x", error=None):
    return Judgement("s", "j", "m", 0, status, label, None, passed if status == "ok" else None, "why", error, turn, f"span{turn}")


def test_aggregate_turns():
    failing = aggregate_turns("s", "j", "m", 0, [_j(3, passed=False), _j(1), _j(2, passed=False)])
    assert failing.label == FAILING_TURN and failing.passed is False and "first failing turn: 2 of 3" in failing.explanation
    assert failing.score == pytest.approx(1 / 3)
    assert aggregate_turns("s", "j", "m", 0, [_j(1), _j(2)]).label == NO_FAILING_TURN
    errored = aggregate_turns("s", "j", "m", 0, [_j(1), _j(2, status="error", error="timeout")])
    assert errored.status == "error" and "turn 2: timeout" in errored.error
    # a failing turn decides even when another turn errored
    assert aggregate_turns("s", "j", "m", 0, [_j(1, status="error"), _j(2, passed=False)]).passed is False
    assert aggregate_turns("s", "j", "m", 0, [_j(1, status="skipped", error="pre-filter")]).status == "skipped"
    assert aggregate_turns("s", "j", "m", 0, []).status == "skipped"
    assert first_failing_turn([_j(2, passed=False), _j(1), _j(4, passed=False)]) == 2
    assert first_failing_turn([_j(1)]) is None


@pytest.mark.parametrize("judge, field, needle, detail", [
    ({**TURN_JUDGE, "prompt": "Is this turn kind? {context}"}, "judges.custom.x.prompt", "prompt:", "{reply}"),
    ({**TURN_JUDGE, "scope": "session", "prompt": "Judge {transcript} and {reply}"}, "judges.custom.x.prompt",
     "prompt:", "only with scope: turn"),
    ({**TURN_JUDGE, "scope": "span"}, "judges.custom.x.scope", "scope:", "turn"),
])
def test_bad_turn_judges_exit_2(judge, field, needle, detail, fake, write_matrix):
    import yaml

    m = base_matrix(fake.base_url)
    m["judges"]["custom"] = {"x": judge}
    m["judges"]["use"] = ["x"]
    text = yaml.safe_dump(m, sort_keys=False)
    path = write_matrix(text)
    result = invoke("validate", path)
    assert result.exit_code == 2, result.output
    _check_message(result.stderr, path, text, field, [needle], detail)


def test_a_schema_1_run_file_upgrades_and_reports(tmp_path):
    """A run file written before per-turn judges opens, gains the table, and keeps its rows."""
    import sqlite3

    from simbench.store import MIGRATIONS, RunStore

    path = tmp_path / "run.sqlite"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0]() + "\nPRAGMA user_version = 1;")
    db.execute("INSERT INTO runs (run_id, matrix_name, matrix_source, matrix_fingerprint, matrix_json, simbench_version,"
               " status, created_at) VALUES ('r', 'm', 'm.yaml', 'fp', '{}', '0', 'finished', 0)")
    db.commit()
    db.close()
    store = RunStore(path)
    try:
        assert store.schema_version == len(MIGRATIONS) >= 2
        assert store.run()["run_id"] == "r"
        assert store.turn_judgements() == []
    finally:
        store.close()


def test_a_prefilter_on_a_turn_judge_picks_turns(make_fake, write_matrix, tmp_path, open_run):
    fake = make_fake(tutor=_tutor, judge_label=lambda prompt, labels: "reveals" if MARKER in prompt else labels[0])
    matrix = base_matrix(fake.base_url, max_turns=3)
    matrix["tutor"]["variants"] = {"socratic": matrix["tutor"]["variants"]["socratic"]}
    matrix["judges"]["custom"] = {"reveals_turn": {**TURN_JUDGE, "when": {"text": "tutor", "regex": "answer is"}}}
    matrix["judges"]["use"] = ["reveals_turn"]
    result = run_cli(write_matrix(matrix), tmp_path / "run", "--cache", tmp_path / "cache.sqlite")
    assert result.exit_code == 0, result.output
    turns = open_run(tmp_path / "run").rows("SELECT turn, status, label FROM turn_evaluations ORDER BY turn")
    assert [(t["turn"], t["status"]) for t in turns] == [(1, "skipped"), (2, "ok"), (3, "skipped")]
    assert len([r for r in fake.requests_of("judge") if MARKER in _prompt_of(r)]) == 1
