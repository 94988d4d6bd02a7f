"""The built-in persona and topic libraries, user persona/topic files, and the student prompt built from them."""

from __future__ import annotations

import pytest
import yaml

from conftest import base_matrix, invoke
from simbench.matrix import MatrixError, Persona, Topic, load_matrix, parse_matrix
from simbench.personas import builtin_personas
from simbench.personas.prompt import ROLE_PLAY_MARKER, STOP_MARKER, persona_misconception, student_system_prompt
from simbench.scenarios import builtin_topics

SUBJECTS = {"arithmetic", "algebra", "science", "programming", "writing"}
# The ways real students make tutors fail that the library must cover (issue 7), by persona.
FAILURE_MODES = {
    "confused_novice": "misconception held firmly",
    "impatient": "impatience that grows",
    "overconfident": "overconfidence",
    "answer_seeker": "pushing for the answer",
    "anxious": "anxiety and low confidence",
    "drifter": "drifting off topic",
    "terse": "one-word replies",
    "rambler": "long rambling replies",
    "non_native_speaker": "a non-native speaker",
    "homework_outsourcer": "getting the tutor to do the homework",
    "rule_breaker": "getting the tutor to break its rules",
}


def _all_builtins_matrix(url: str) -> dict:
    return base_matrix(url, personas=sorted(builtin_personas()), topics=sorted(builtin_topics()))


def test_every_builtin_persona_and_topic_validates(fake):
    matrix = parse_matrix(yaml.safe_dump(_all_builtins_matrix(fake.base_url)))
    assert {p.name for p in matrix.personas} == set(builtin_personas())
    assert len(matrix.personas) >= 10
    assert set(FAILURE_MODES) <= set(builtin_personas())
    for persona in matrix.personas:
        assert persona.description and persona.traits, persona.name
        # every built-in states its own reactions, stop signal and reply length (not the generic defaults)
        for field in ("reacts_to_good", "reacts_to_bad", "stop_when", "reply_length"):
            assert builtin_personas()[persona.name].get(field), (persona.name, field)


def test_topic_library_covers_the_subjects_with_misconceptions(fake):
    matrix = parse_matrix(yaml.safe_dump(_all_builtins_matrix(fake.base_url)))
    assert {t.subject for t in matrix.topics} == SUBJECTS
    for topic in matrix.topics:
        assert topic.opening and topic.reference and topic.goal, topic.name
        assert topic.misconceptions, topic.name
    names = [t.name for t in matrix.topics]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("persona_name", sorted(builtin_personas()))
def test_every_persona_prompt_renders_for_every_topic(persona_name):
    persona = Persona(name=persona_name, **builtin_personas()[persona_name])
    for key, fields in builtin_topics().items():
        topic = Topic(**fields)
        prompt = student_system_prompt(persona, topic)
        assert ROLE_PLAY_MARKER in prompt and STOP_MARKER in prompt
        assert topic.name in prompt and topic.opening in prompt
        for text in [persona.description, persona.reacts_to_good, persona.reacts_to_bad, persona.stop_when,
                     persona.reply_length, *persona.traits]:
            assert text in prompt, (persona_name, key, text)
        if persona.writing_style:
            assert persona.writing_style in prompt
        if persona.patience:
            assert f"after {persona.patience} tutor replies" in prompt
        if persona.misconception == "topic":
            assert topic.misconceptions[0] in prompt, (persona_name, key)
        else:
            assert not any(m in prompt for m in topic.misconceptions), (persona_name, key)


def test_misconception_from_topic_or_literal_or_none():
    topic = Topic(name="t", opening="o", misconceptions=["first wrong idea", "second"])
    bare = Topic(name="t", opening="o")
    assert persona_misconception(Persona(name="a", description="d", misconception="topic"), topic) == "first wrong idea"
    assert persona_misconception(Persona(name="a", description="d", misconception="topic"), bare) is None
    assert persona_misconception(Persona(name="a", description="d", misconception="2/5 is right"), bare) == "2/5 is right"
    assert persona_misconception(Persona(name="a", description="d"), topic) is None


def test_extends_overrides_fields_and_keeps_the_rest(fake):
    m = base_matrix(fake.base_url, personas=[
        {"name": "very_impatient", "extends": "impatient", "reply_length": "two or three words", "patience": 1},
    ])
    persona = parse_matrix(yaml.safe_dump(m)).personas[0]
    base = builtin_personas()["impatient"]
    assert persona.reply_length == "two or three words" and persona.patience == 1
    assert persona.description == base["description"] and persona.traits == base["traits"]


def test_persona_and_topic_files_are_read_relative_to_the_matrix(fake, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "people.yaml").write_text(yaml.safe_dump({
        "night_owl": {"description": "Studies at 3am, tired and slow.", "traits": ["yawns"], "patience": 2},
        "stubborn_novice": {"extends": "confused_novice", "reply_length": "one word"},
    }))
    (tmp_path / "lib" / "topics.yaml").write_text(yaml.safe_dump({
        "mean": {"name": "the mean", "subject": "statistics", "opening": "What is the mean of 2, 4, 9?",
                 "misconceptions": ["the mean is the middle number"]},
    }))
    m = base_matrix(fake.base_url, personas=["terse", {"file": "lib/people.yaml"}],
                    topics=[{"file": "lib/topics.yaml"}, "seasons"])
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(m))
    matrix = load_matrix(tmp_path / "m.yaml")
    assert [p.name for p in matrix.personas] == ["terse", "night_owl", "stubborn_novice"]
    stubborn = matrix.persona("stubborn_novice")
    assert stubborn.reply_length == "one word" and stubborn.misconception == "topic"
    assert [t.name for t in matrix.topics] == ["the mean", "why there are seasons"]
    prompt = student_system_prompt(stubborn, matrix.topic("the mean"))
    assert "the mean is the middle number" in prompt


def test_a_bad_persona_file_names_its_own_file_line_and_field(fake, tmp_path):
    people = tmp_path / "people.yaml"
    people.write_text("good:\n  description: fine\nbad:\n  description: has a typo\n  reply_lenght: short\n")
    m = base_matrix(fake.base_url, personas=[{"file": "people.yaml"}, {"file": "missing.yaml"}])
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(m))
    result = invoke("validate", path)
    assert result.exit_code == 2, result.output
    assert f"{people}:5: bad.reply_lenght: unknown field" in result.stderr
    assert "missing.yaml" in result.stderr and "cannot read" in result.stderr
    with pytest.raises(MatrixError):
        load_matrix(path)


def test_extending_an_unknown_persona_is_an_error(fake, write_matrix):
    m = base_matrix(fake.base_url, personas=[{"name": "x", "extends": "impatiant"}])
    result = invoke("validate", write_matrix(m))
    assert result.exit_code == 2
    assert "personas[0].extends: unknown persona 'impatiant'" in result.stderr
