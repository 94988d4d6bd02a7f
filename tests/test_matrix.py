"""Matrix validation through the real CLI: every invalid matrix exits 2, names the file, the field and
the line, and ``run`` makes no model call before validation passes."""

from __future__ import annotations

import re
import subprocess
from typing import Callable

import pytest
import yaml

from conftest import SIMBENCH_BIN, base_matrix, invoke
from simbench.matrix import parse_matrix


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of ``text`` that contains ``needle``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} is not in the matrix text")


def dump(matrix: dict) -> str:
    return yaml.safe_dump(matrix, sort_keys=False)


# Each case: (id, build(base_url) -> YAML text, field named in the message, needle(s) whose line the message names).


def _yaml_syntax(url: str) -> str:
    lines = dump(base_matrix(url)).splitlines()
    # A valid matrix with one invalid line inserted as line 4: "mapping values are not allowed here".
    lines.insert(3, "bad: key: here")
    return "\n".join(lines) + "\n"


def _unknown_persona(url: str) -> str:
    return dump(base_matrix(url, personas=["impatient", "no_such_persona"]))


def _missing_opening(url: str) -> str:
    m = base_matrix(url)
    m["topics"] = [{"name": "fractions without opening", "reference": "5/6"}]
    return dump(m)


def _undefined_template_variable(url: str) -> str:
    m = base_matrix(url)
    m["tutor"]["variants"]["direct"] = "You teach {{ topic.name }} to {{ topic.audience_level }}."
    return dump(m)


def _judge_name(name: str) -> Callable[[str], str]:
    def build(url: str) -> str:
        m = base_matrix(url)
        m["judges"]["use"] = [name]
        return dump(m)

    return build


def _local_context_too_big(url: str) -> str:
    m = base_matrix(url)
    m["models"]["local"] = {"provider": "local"}
    m["tutor"]["model"] = "local"
    m["tutor"]["max_tokens"] = 4000
    m["max_turns"] = 50
    return dump(m)


CASES = [
    pytest.param(_yaml_syntax, None, ["bad: key: here"], "YAML", id="yaml-syntax-error"),
    pytest.param(_unknown_persona, "personas[1]", ["no_such_persona"], "no_such_persona", id="unknown-persona"),
    pytest.param(_missing_opening, "topics[0].opening", ["fractions without opening"], "missing", id="missing-topic-opening"),
    pytest.param(_undefined_template_variable, "tutor.variants.direct", ["direct:"], "audience_level",
                 id="undefined-template-variable"),
    pytest.param(lambda url: dump(base_matrix(url, max_turns=0)), "max_turns", ["max_turns:"], "greater than 0",
                 id="max-turns-zero"),
    pytest.param(lambda url: dump(base_matrix(url, max_turns=-3)), "max_turns", ["max_turns:"], "greater than 0",
                 id="max-turns-negative"),
    pytest.param(lambda url: dump(base_matrix(url, repeats=0)), "repeats", ["repeats:"], "greater than 0",
                 id="repeats-zero"),
    pytest.param(_judge_name("goal-completion"), "judges.use", ["use:", "goal-completion"], "identifier",
                 id="judge-name-with-dash"),
    pytest.param(_judge_name("coherence.v2"), "judges.use", ["use:", "coherence.v2"], "identifier",
                 id="judge-name-with-dot"),
    pytest.param(lambda url: dump(base_matrix(url, colour="red")), "colour", ["colour:"], "unknown field",
                 id="unknown-top-level-field"),
    pytest.param(_local_context_too_big, "max_turns", ["max_turns:"], "cannot fit", id="local-context-does-not-fit"),
    pytest.param(lambda url: dump(base_matrix(url, tutor={"kind": "imported", "variants": {"a": "x"}})), "tutor.kind",
                 ["kind: imported"], "simbench judge", id="tutor-kind-imported"),
    pytest.param(lambda url: dump(base_matrix(url, student=None)), "student", ["student: null"], "must be a mapping",
                 id="student-null"),
]


def _check_message(stderr: str, path, text: str, field, needles, detail) -> None:
    lines = {line_of(text, n) for n in needles}
    errors = [l for l in stderr.splitlines() if l.startswith("error:") and str(path) in l]
    assert errors, f"no error line names the file {path}:\n{stderr}"
    pattern = re.compile(re.escape(str(path)) + r":(\d+):")
    named = [(int(m.group(1)), l) for l in errors if (m := pattern.search(l))]
    assert named, f"no error names a line of {path}:\n{stderr}"
    assert any(n in lines for n, _ in named), f"expected a line in {sorted(lines)}:\n{stderr}"
    if field is not None:
        assert any(f": {field}:" in l for _, l in named), f"the field {field!r} is not named:\n{stderr}"
    assert any(detail in l for l in errors), f"{detail!r} not explained:\n{stderr}"


@pytest.mark.parametrize("build, field, needles, detail", CASES)
def test_validate_rejects_invalid_matrix(build, field, needles, detail, fake, write_matrix):
    text = build(fake.base_url)
    path = write_matrix(text)
    result = invoke("validate", path)
    assert result.exit_code == 2, result.output
    _check_message(result.stderr, path, text, field, needles, detail)
    assert "valid." not in result.stdout
    assert fake.chat_calls == 0


@pytest.mark.parametrize("build, field, needles, detail", CASES)
def test_run_rejects_invalid_matrix_before_any_model_call(build, field, needles, detail, fake, write_matrix, tmp_path):
    text = build(fake.base_url)
    path = write_matrix(text)
    out = tmp_path / "run"
    result = invoke("run", path, "--out", out, "-q", "--cache", tmp_path / "c.sqlite")
    assert result.exit_code == 2, result.output
    _check_message(result.stderr, path, text, field, needles, detail)
    assert "nothing was run" in result.stderr
    assert fake.chat_calls == 0 and fake.requests == []
    assert not (out / "run.sqlite").exists()


def test_every_problem_is_reported_at_once(fake, write_matrix):
    m = base_matrix(fake.base_url, max_turns=0, repeats=0, colour="red")
    path = write_matrix(dump(m))
    result = invoke("validate", path)
    assert result.exit_code == 2
    for field in ("max_turns", "repeats", "colour"):
        assert f": {field}:" in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["validate", "run"])
def test_installed_command_rejects_invalid_matrix(command, fake, write_matrix, tmp_path):
    text = _unknown_persona(fake.base_url)
    path = write_matrix(text)
    args = [str(SIMBENCH_BIN), command, str(path)]
    if command == "run":
        args += ["--out", str(tmp_path / "run"), "-q", "--cache", str(tmp_path / "c.sqlite")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    _check_message(proc.stderr, path, text, "personas[1]", ["no_such_persona"], "no_such_persona")
    assert fake.chat_calls == 0
    assert not (tmp_path / "run" / "run.sqlite").exists()


def test_missing_matrix_file_exits_2(tmp_path):
    result = invoke("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "nope.yaml" in result.stderr


def test_valid_matrix_validates_and_counts_sessions(fake, write_matrix):
    m = base_matrix(fake.base_url, personas=["impatient", "confused_novice"], repeats=3)
    path = write_matrix(dump(m))
    result = invoke("validate", path)
    assert result.exit_code == 0, result.output
    # 2 variants x 1 topic x 2 personas x 3 repeats
    assert "= 12 session(s)" in result.stdout
    assert fake.chat_calls == 0


def test_sample_ids_depend_on_names_not_order(fake):
    m = base_matrix(fake.base_url, personas=["impatient", "confused_novice"], repeats=2)
    m["topics"].append({"name": "linear equations", "opening": "How do I solve 3x + 5 = 20?"})
    first = parse_matrix(dump(m), "a.yaml")
    m["topics"].reverse()
    m["personas"].reverse()
    m["tutor"]["variants"] = dict(reversed(list(m["tutor"]["variants"].items())))
    second = parse_matrix(dump(m), "b.yaml")
    ids = lambda matrix: {(s.variant, s.topic, s.persona, s.repeat): s.sample_id for s in matrix.samples()}
    assert ids(first) == ids(second)
    assert len(set(ids(first).values())) == 2 * 2 * 2 * 2


def test_builtin_names_resolve(fake):
    m = base_matrix(fake.base_url, topics=["adding_fractions"], personas=["confused_novice"])
    matrix = parse_matrix(dump(m), "m.yaml")
    assert matrix.topics[0].opening and matrix.topics[0].reference
    assert matrix.personas[0].name == "confused_novice" and matrix.personas[0].description
