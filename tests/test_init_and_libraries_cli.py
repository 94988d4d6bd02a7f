"""`simbench personas`, `simbench topics` and `simbench init` through the real CLI."""

from __future__ import annotations

import yaml

from conftest import invoke
from simbench.matrix import load_matrix
from simbench.personas import builtin_personas
from simbench.scenarios import builtin_topics


def test_personas_list_names_every_builtin():
    result = invoke("personas", "list")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == list(builtin_personas())


def test_personas_show_prints_yaml_that_loads_back_and_the_prompt():
    result = invoke("personas", "show", "confused_novice", "--topic", "seasons")
    assert result.exit_code == 0, result.output
    yaml_part, _, prompt = result.stdout.partition("# the student prompt")
    assert yaml.safe_load(yaml_part) == {"confused_novice": builtin_personas()["confused_novice"]}
    # the persona takes the topic's first misconception
    assert builtin_topics()["seasons"]["misconceptions"][0] in prompt


def test_show_unknown_names_exit_2_with_the_known_ones():
    for args in (("personas", "show", "nobody"), ("topics", "show", "nothing"), ("personas", "show", "terse", "--topic", "x")):
        result = invoke(*args)
        assert result.exit_code == 2, args
        assert "unknown" in result.stderr and "built-in" in result.stderr


def test_topics_list_and_show():
    result = invoke("topics", "list")
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == list(builtin_topics())
    shown = invoke("topics", "show", "comma_splice")
    assert yaml.safe_load(shown.stdout) == {"comma_splice": builtin_topics()["comma_splice"]}


def test_init_writes_a_starter_that_validates_on_the_embedded_model(tmp_path):
    path = tmp_path / "new" / "matrix.yaml"
    result = invoke("init", path)
    assert result.exit_code == 0, result.output
    assert path.read_text().lstrip().startswith("#")  # commented for a new user
    validated = invoke("validate", path)
    assert validated.exit_code == 0, validated.output
    matrix = load_matrix(path)
    assert matrix.uses_local() and {matrix.model_spec(name).provider for name in matrix.model_names_in_use()} == {"local"}
    assert matrix.tutor.model_names() == ["local"]
    assert not matrix.gates  # nothing the embedded model cannot pass
    # it shows a custom judge, which runs
    assert matrix.judges.custom and set(matrix.judges.custom) <= set(matrix.judges.use)


def test_init_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "matrix.yaml"
    path.write_text("mine")
    result = invoke("init", path)
    assert result.exit_code == 2 and "exists" in result.stderr
    assert path.read_text() == "mine"
    assert invoke("init", path, "--force").exit_code == 0
    assert path.read_text() != "mine"
