"""The built-in session judges: what each one asks, its labels, which labels pass, what it needs.

Templates use phoenix.evals' ``{name}`` variables; values arrive as dataframe columns and are never
pre-rendered into the text, so braces in a transcript cannot break the template.
Variables: ``{transcript}``, ``{topic}``, ``{opening}``, ``{reference}``, ``{goal}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

# Columns of a judge row besides the template variables: what a pre-filter may read.
PREFILTER_TEXTS = {"transcript": "transcript", "tutor": "tutor_text", "student": "student_text"}


@dataclass(frozen=True)
class Prefilter:
    """A cheap rule that picks the sessions an (expensive) judge reads; the others record ``skipped``.

    Every condition given must hold on the chosen text: ``regex`` must match somewhere in it
    (Python ``re.search``), and its length must lie within ``min_chars``..``max_chars``.
    """

    text: Literal["transcript", "tutor", "student"] = "transcript"
    regex: Optional[str] = None
    min_chars: Optional[int] = None
    max_chars: Optional[int] = None

    def reason_to_skip(self, row: dict) -> Optional[str]:
        """None when the session is selected; otherwise why it is not (recorded with ``skipped``)."""
        value = str(row.get(PREFILTER_TEXTS[self.text]) or "")
        if self.regex is not None and not re.search(self.regex, value):
            return f"pre-filter: no match for /{self.regex}/ in the {self.text} text"
        if self.min_chars is not None and len(value) < self.min_chars:
            return f"pre-filter: the {self.text} text has {len(value)} characters, fewer than {self.min_chars}"
        if self.max_chars is not None and len(value) > self.max_chars:
            return f"pre-filter: the {self.text} text has {len(value)} characters, more than {self.max_chars}"
        return None


@dataclass(frozen=True)
class JudgeDefinition:
    """A session judge. ``choices`` maps labels to scores; ``passing`` defaults to the top-scored labels;
    ``prefilter`` (optional) picks the sessions it reads."""

    name: str
    template: str
    choices: dict[str, float]
    requires: tuple[str, ...] = ()
    direction: Literal["maximize", "minimize"] = "maximize"
    passing: Optional[frozenset[str]] = field(default=None)
    prefilter: Optional[Prefilter] = None
    per_turn: bool = False
    """True: one verdict per tutor turn (rows carry ``turn``, ``reply``, ``context``), aggregated per session."""

    def pass_labels(self) -> frozenset[str]:
        if self.passing is not None:
            return self.passing
        best = max(self.choices.values()) if self.direction == "maximize" else min(self.choices.values())
        return frozenset(label for label, score in self.choices.items() if score == best)


_HEADER = (
    "You are an expert reviewer of tutoring conversations. Read the WHOLE conversation between a "
    "student and an AI tutor about {topic}, then answer one question about the session as a whole.\n\n"
    "<conversation>\n{transcript}\n</conversation>\n\n"
)

COHERENCE = JudgeDefinition(
    name="coherence",
    template=_HEADER
    + "Question: is the tutor coherent across the whole session? A coherent tutor stays consistent with "
    "what it said before, answers what the student actually wrote, and keeps to the question. An incoherent "
    "tutor contradicts itself, ignores or misreads the student's messages, repeats itself without progress, "
    "or drifts away from the question.\n"
    'Answer "coherent" or "incoherent", with a one-sentence explanation.',
    choices={"coherent": 1.0, "incoherent": 0.0},
)

GOAL_COMPLETION = JudgeDefinition(
    name="goal_completion",
    template=_HEADER
    + "The learning goal of this session: {goal}\n"
    "Question: by the end of the session, has the student reached this goal? Count only what the student "
    "shows in their own messages (a correct attempt, a correct explanation in their own words), not what the "
    "tutor said.\n"
    'Answer "met" or "not_met", with a one-sentence explanation.',
    choices={"met": 1.0, "not_met": 0.0},
    requires=("goal",),
)

FRUSTRATION = JudgeDefinition(
    name="frustration",
    template=_HEADER
    + "Question: does the student end the session frustrated? Look for irritation, complaints, giving up, "
    "sarcasm, or replies that grow shorter and sharper as the session goes on.\n"
    'Answer "not_frustrated" or "frustrated", with a one-sentence explanation.',
    choices={"not_frustrated": 1.0, "frustrated": 0.0},
)

CORRECTNESS = JudgeDefinition(
    name="correctness",
    template=_HEADER
    + "A correct reference answer: {reference}\n"
    "Question: is everything the tutor states about the subject correct? An incorrect tutor states a false "
    "fact or method, or confirms a wrong answer from the student. Holding back the answer is not incorrect.\n"
    'Answer "correct" or "incorrect", with a one-sentence explanation.',
    choices={"correct": 1.0, "incorrect": 0.0},
    requires=("reference",),
)

BUILTIN = {j.name: j for j in (COHERENCE, GOAL_COMPLETION, FRUSTRATION, CORRECTNESS)}
"""The built-in judges of the tutor (the default ``judges.use``)."""

# A judge of the *student*: LLM student simulators break character, solve the problem themselves or
# stop for no reason of their persona, and such a session says nothing about the tutor.
SIMULATOR_FIDELITY = JudgeDefinition(
    name="simulator_fidelity",
    template=(
        "You are checking a SIMULATED student in a tutoring conversation about {topic}. A language model "
        "played the student and was told to play this persona:\n{persona}\n\n"
        "<conversation>\n{transcript}\n</conversation>\n\n"
        "Question: did the simulated student stay a believable student of this persona for the whole "
        "session? It is out of character if it acts as the tutor (explains or teaches the topic), solves the "
        "problem or states the full correct answer on its own before the tutor has led it there, knows what "
        "this student should not know, drops the persona's traits (for example long polished replies from a "
        "terse student), or ends the session for a reason its persona would not. Being wrong, confused, rude, "
        "slow or off topic is in character when the persona says so.\n"
        'Answer "in_character" or "out_of_character", with a one-sentence explanation.'
    ),
    choices={"in_character": 1.0, "out_of_character": 0.0},
    requires=("persona",),
)
SIMULATOR_JUDGES = {SIMULATOR_FIDELITY.name: SIMULATOR_FIDELITY}
"""Built-in judges of the simulated student. A session one of them fails is a simulator error: it
leaves every tutor rate and, in comparisons, its pair drops out on both sides."""
SIMULATOR_JUDGE = SIMULATOR_FIDELITY.name
