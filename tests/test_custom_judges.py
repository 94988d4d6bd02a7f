"""Custom judges written in the matrix: validation (exit 2 naming field and line) and whole runs on the
fake server through the same judge path as the built-ins."""

from __future__ import annotations

import pytest
import yaml

from conftest import base_matrix, invoke, run_cli
from test_matrix import _check_message
from simbench.personas import builtin_personas

MARKER = "CUSTOM-REVEAL-CHECK"
REVEALS = {
    "prompt": (
        f"{MARKER} Does the tutor give away the final answer instead of letting the student work it out?\n"
        "Topic: {topic}\nReference answer: {reference}\nThe student: {persona}\n"
        "<conversation>\n{transcript}\n</conversation>\n"
        'Answer "withholds" or "reveals".'
    ),
    "choices": {"withholds": 1.0, "reveals": 0.0},
    "passing": ["withholds"],
}


def _prompt_of(request: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in request["messages"])


def _with_custom(url: str, **custom) -> dict:
    m = base_matrix(url)
    m["judges"]["custom"] = custom
    m["judges"]["use"] = ["coherence", *custom]
    return m


def test_custom_judge_runs_end_to_end_and_reaches_the_report(make_fake, write_matrix, tmp_path, open_run):
    braces = "The answer is {reference} or maybe {{5/6}}."
    fake = make_fake(
        tutor=lambda request: braces,
        judge_label=lambda prompt, labels: "reveals" if MARKER in prompt else labels[0],
    )
    matrix = _with_custom(fake.base_url, reveals_answer=REVEALS)
    path = write_matrix(matrix)
    out = tmp_path / "run"
    result = run_cli(path, out, "--cache", tmp_path / "cache.sqlite")
    assert result.exit_code == 0, result.output

    run = open_run(out)
    sessions = run.sessions()
    custom = [j for j in run.judgements() if j["judge"] == "reveals_answer"]
    assert len(custom) == len(sessions) == 2
    assert all(j["status"] == "ok" and j["label"] == "reveals" and j["passed"] == 0 and j["score"] == 0.0 for j in custom)
    assert all(j["judge_model"] == "fake" for j in custom)
    built_in = [j for j in run.judgements() if j["judge"] == "coherence"]
    assert all(j["status"] == "ok" and j["passed"] == 1 for j in built_in)

    # The values came in as columns: the slots are filled, the transcript's braces are left as written.
    custom_requests = [r for r in fake.requests_of("judge") if MARKER in _prompt_of(r)]
    assert len(custom_requests) == 2
    persona = builtin_personas()["impatient"]
    for request in custom_requests:
        prompt = _prompt_of(request)
        assert "Reference answer: Use a common denominator: 3/6 + 2/6 = 5/6." in prompt
        assert "Topic: adding fractions" in prompt
        assert f"impatient: {persona['description']}" in prompt and persona["traits"][0] in prompt
        assert f"Tutor: {braces}" in prompt
        labels = request["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"]
        assert labels == ["withholds", "reveals"]

    # the student model got the persona's prompt, new fields included
    student_system = fake.requests_of("student")[0]["messages"][0]["content"]
    assert "after 3 tutor replies that do not help you" in student_system
    assert persona["stop_when"] in student_system

    dims = run.summary()["dimensions"]
    assert dims["reveals_answer"]["overall"]["fail"] == 2 and dims["reveals_answer"]["overall"]["fail_rate"] == 1.0
    assert "reveals_answer" in (out / "report.html").read_text()
    assert "reveals_answer" in result.stdout

    # the report rebuilds from the run file alone, custom judge included
    (out / "summary.json").unlink()
    calls = fake.chat_calls
    rebuilt = invoke("report", out)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert run.summary()["dimensions"]["reveals_answer"]["overall"]["fail"] == 2
    assert fake.chat_calls == calls


def test_custom_judge_on_its_own_model_and_skipped_without_its_input(make_fake, write_matrix, tmp_path, open_run):
    main = make_fake()
    strict = make_fake(judge_label=lambda prompt, labels: "not_met")
    matrix = _with_custom(main.base_url, learned={
        "prompt": "Did the student reach this goal: {goal}?\n{transcript}",
        "choices": {"met": 1, "partly": 0.5, "not_met": 0},
        "model": "strict",
    })
    matrix["models"]["strict"] = {"base_url": strict.base_url, "model": "strict-model", "max_retries": 0}
    matrix["topics"].append({"name": "no goal here", "opening": "What is 2 + 2?"})
    path = write_matrix(matrix)
    out = tmp_path / "run"
    result = run_cli(path, out, "--cache", tmp_path / "cache.sqlite")
    assert result.exit_code == 0, result.output

    run = open_run(out)
    topic_of = {s["session_id"]: s["topic"] for s in run.sessions()}
    learned = {topic_of[j["session_id"]]: j for j in run.judgements() if j["judge"] == "learned"}
    assert learned["adding fractions"]["status"] == "ok" and learned["adding fractions"]["label"] == "not_met"
    assert learned["adding fractions"]["judge_model"] == "strict"
    # default passing = the best-scored label only: "partly" would not pass either
    assert learned["adding fractions"]["passed"] == 0
    assert learned["no goal here"]["status"] == "skipped" and "goal" in learned["no goal here"]["error"]
    # the custom judge went to its own model only; the built-in one stayed on the judges' model
    assert len(strict.requests_of("judge")) == 2 and strict.roles["tutor"] == 0
    assert all("Did the student reach" not in _prompt_of(r) for r in main.requests_of("judge"))
    assert len(main.requests_of("judge")) == 4  # coherence on 2 variants x 2 topics


def test_multi_stage_a_rule_picks_the_sessions_the_judge_reads(make_fake, write_matrix, tmp_path, open_run):
    # The direct variant's tutor gives the answer away; only those sessions should reach the judge.
    def tutor(request: dict) -> str:
        system = request["messages"][0]["content"]
        return "The answer is 5/6." if "Explain clearly" in system else "What is a common denominator of 2 and 3?"

    fake = make_fake(tutor=tutor, judge_label=lambda prompt, labels: "reveals" if MARKER in prompt else labels[0])
    judge = {**REVEALS, "when": {"text": "tutor", "regex": "(?i)answer is"}}
    matrix = _with_custom(fake.base_url, reveals_answer=judge, long_talk={
        "prompt": "Is this long session still on topic? {transcript}", "choices": {"on": 1, "off": 0},
        "when": {"min_chars": 100000},
    })
    path = write_matrix(matrix)
    out = tmp_path / "run"
    result = run_cli(path, out, "--cache", tmp_path / "cache.sqlite")
    assert result.exit_code == 0, result.output

    run = open_run(out)
    variant_of = {s["session_id"]: s["variant"] for s in run.sessions()}
    verdicts = {variant_of[j["session_id"]]: j for j in run.judgements() if j["judge"] == "reveals_answer"}
    assert verdicts["direct"]["status"] == "ok" and verdicts["direct"]["label"] == "reveals"
    assert verdicts["socratic"]["status"] == "skipped" and "answer is" in verdicts["socratic"]["error"]
    assert verdicts["socratic"]["passed"] is None  # skipped is not a pass
    long_talk = [j for j in run.judgements() if j["judge"] == "long_talk"]
    assert len(long_talk) == 2 and all(j["status"] == "skipped" and "100000" in j["error"] for j in long_talk)
    # the expensive judge read only the selected session
    assert len([r for r in fake.requests_of("judge") if MARKER in _prompt_of(r)]) == 1
    assert not [r for r in fake.requests_of("judge") if "still on topic" in _prompt_of(r)]
    overall = run.summary()["dimensions"]["reveals_answer"]["overall"]
    assert overall["skipped"] == 1 and overall["judged"] == 1 and overall["fail"] == 1


def test_custom_judges_run_by_default_when_use_is_omitted(fake):
    from simbench.matrix import parse_matrix

    m = base_matrix(fake.base_url)
    del m["judges"]["use"]
    m["judges"]["custom"] = {"reveals_answer": REVEALS}
    matrix = parse_matrix(yaml.safe_dump(m))
    assert matrix.judges.use == ["coherence", "goal_completion", "frustration", "correctness", "reveals_answer"]
    definition = matrix.judges.definition("reveals_answer")
    assert definition.requires == ("reference", "persona")
    assert definition.pass_labels() == frozenset({"withholds"})


def _bad(custom: dict, use=None):
    def build(url: str) -> str:
        m = base_matrix(url)
        m["judges"]["custom"] = custom
        m["judges"]["use"] = use if use is not None else ["coherence", *custom]
        return yaml.safe_dump(m, sort_keys=False)

    return build


def _judge(**changes) -> dict:
    return {**REVEALS, **changes}


BAD = [
    pytest.param(_bad({"reveals-answer": REVEALS}, use=["coherence"]), "judges.custom", ["custom:"], "identifier",
                 id="name-not-identifier"),
    pytest.param(_bad({"coherence": REVEALS}, use=["coherence"]), "judges.custom", ["custom:"], "built-in",
                 id="name-of-a-builtin"),
    pytest.param(_bad({"x": _judge(prompt="Rate {transcript} for {student_name}")}), "judges.custom.x.prompt",
                 ["prompt:"], "{student_name}", id="unknown-variable"),
    pytest.param(_bad({"x": _judge(prompt="Is the tutor kind?")}), "judges.custom.x.prompt", ["prompt:"],
                 "{transcript}", id="no-transcript"),
    pytest.param(_bad({"x": _judge(prompt="Rate {{ transcript }}")}), "judges.custom.x.prompt", ["prompt:"],
                 "double braces", id="mustache-braces"),
    pytest.param(_bad({"x": _judge(prompt="Rate {transcript} as JSON {")}), "judges.custom.x.prompt", ["prompt:"],
                 "brace", id="stray-brace"),
    pytest.param(_bad({"x": _judge(choices={"only": 1})}), "judges.custom.x.choices", ["choices:"], "at least 2",
                 id="one-choice"),
    pytest.param(_bad({"x": _judge(choices={"good": "high", "bad": 0})}), "judges.custom.x.choices.good",
                 ["good: high"], "number", id="score-not-a-number"),
    pytest.param(_bad({"x": _judge(choices={"y" * 101: 1, "no": 0})}), "judges.custom.x.choices", ["choices:"],
                 "longer than 100 characters", id="label-too-long-for-ax"),
    pytest.param(_bad({"x": _judge(passing=["great"])}), "judges.custom.x", ["x:"], "not among the choices",
                 id="passing-not-a-choice"),
    pytest.param(_bad({"x": _judge(passing=["withholds", "reveals"])}), "judges.custom.x", ["x:"], "never fail",
                 id="everything-passes"),
    pytest.param(_bad({"x": _judge(direction="up")}), "judges.custom.x.direction", ["direction:"], "maximize",
                 id="bad-direction"),
    pytest.param(_bad({"x": _judge(model="nowhere")}), "judges.custom.x.model", ["model: nowhere"], "unknown model",
                 id="unknown-model"),
    pytest.param(_bad({"x": _judge(colour="red")}), "judges.custom.x.colour", ["colour:"], "unknown field",
                 id="unknown-field"),
    pytest.param(_bad({"x": _judge(when={"regex": "(unclosed"})}), "judges.custom.x.when.regex", ["regex:"],
                 "regular expression", id="prefilter-bad-regex"),
    pytest.param(_bad({"x": _judge(when={"text": "tutor"})}), "judges.custom.x.when", ["when:"], "at least one",
                 id="prefilter-without-rule"),
    pytest.param(_bad({"x": _judge(when={"text": "judge", "min_chars": 3})}), "judges.custom.x.when.text",
                 ["text: judge"], "transcript", id="prefilter-bad-text"),
    pytest.param(_bad({"x": REVEALS}, use=["coherence"]), "judges.custom.x", ["x:"], "not in judges.use",
                 id="defined-not-used"),
    pytest.param(_bad({"x": REVEALS}, use=["coherence", "x", "y"]), "judges.use[2]", ["- y"], "unknown judge 'y'",
                 id="use-names-undefined-judge"),
]


@pytest.mark.parametrize("build, field, needles, detail", BAD)
def test_bad_custom_judges_exit_2_naming_field_and_line(build, field, needles, detail, fake, write_matrix, tmp_path):
    text = build(fake.base_url)
    path = write_matrix(text)
    result = invoke("run", path, "--out", tmp_path / "run", "-q", "--cache", tmp_path / "c.sqlite")
    assert result.exit_code == 2, result.output
    _check_message(result.stderr, path, text, field, needles, detail)
    assert fake.chat_calls == 0


@pytest.mark.parametrize("name", ["coherence", "goal_completion", "frustration", "correctness", "simulator_fidelity"])
def test_every_builtin_judge_uses_only_known_columns_and_renders_braces_safely(name):
    """Built-ins obey the rules custom judges are held to, and phoenix.evals fills them without
    reading the values as templates."""
    from phoenix.evals.llm.prompts import PromptTemplate

    from simbench.matrix import JUDGE_VARIABLES, OPTIONAL_JUDGE_INPUTS, template_variables
    from simbench.matrix import _BUILTIN_JUDGES

    definition = _BUILTIN_JUDGES[name]
    used = template_variables(definition.template)
    assert "transcript" in used and set(used) <= set(JUDGE_VARIABLES)
    assert set(definition.requires) <= set(OPTIONAL_JUDGE_INPUTS) & set(used)
    values = {v: f"value of {v} with {{braces}} and {{{{more}}}}" for v in JUDGE_VARIABLES}
    rendered = PromptTemplate(template=definition.template).render(values)
    text = "\n".join(str(m["content"] if isinstance(m, dict) else m.content) for m in rendered)
    for v in used:
        assert values[v] in text
    assert definition.pass_labels() and definition.pass_labels() < set(definition.choices)
