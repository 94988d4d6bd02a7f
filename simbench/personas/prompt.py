"""The student's role-play prompt, built from a persona and a topic.

Kept apart from the simulator (which sends it) so the matrix can size the embedded model's context
with the real prompt, and so every built-in persona can be rendered against every topic in a test.
It reads plain attributes, so it needs neither the matrix module nor the simulator.
"""

from __future__ import annotations

from typing import Any, Optional

STOP_MARKER = "[END]"
# The fake test server (tests/fake_openai.py) recognises student requests by this phrase.
ROLE_PLAY_MARKER = "role-playing a student"
MISCONCEPTION_FROM_TOPIC = "topic"


def persona_misconception(persona: Any, topic: Any) -> Optional[str]:
    """The wrong belief this persona holds about this topic, if any.

    ``misconception: topic`` takes the topic's first listed misconception (none when the topic lists
    none); any other text is the belief itself; no field means no misconception.
    """
    wanted = getattr(persona, "misconception", None)
    if not wanted:
        return None
    if wanted.strip().lower() == MISCONCEPTION_FROM_TOPIC:
        listed = getattr(topic, "misconceptions", None) or []
        return listed[0] if listed else None
    return wanted


def student_system_prompt(persona: Any, topic: Any) -> str:
    """The role-play instructions for the simulated student (every persona field is used)."""
    lines = [
        f"You are {ROLE_PLAY_MARKER} in a tutoring chat about {topic.name}. "
        "You are the student, not the tutor: never explain the topic and never solve it for the tutor. "
        "Know only what this student would know.",
        f"Who you are: {persona.description}",
    ]
    if persona.traits:
        lines.append("Your traits:" + "".join(f"\n- {t}" for t in persona.traits))
    misconception = persona_misconception(persona, topic)
    if misconception:
        lines.append(f"What you believe, and hold on to until the tutor shows you why it is wrong: {misconception}")
    if getattr(persona, "writing_style", None):
        lines.append(f"How you write: {persona.writing_style}")
    lines.append(f"When the tutor helps well, how you react: {persona.reacts_to_good}.")
    lines.append(f"When the tutor is unclear or unhelpful, how you react: {persona.reacts_to_bad}.")
    if getattr(persona, "patience", None):
        lines.append(f"Your patience: after {persona.patience} tutor replies that do not help you, you give up.")
    lines.append(
        "Stay in character. Real students are not always polite and do not understand everything at once: "
        "you understand step by step, and only what the tutor has really made clear."
    )
    lines.append(f"Your first message was: \"{topic.opening}\"")
    lines.append(f"Reply length: {persona.reply_length}. Write only your next message as the student, with no name prefix.")
    lines.append(f"When {persona.stop_when}, write your last message and end it with {STOP_MARKER}.")
    return "\n".join(lines)
