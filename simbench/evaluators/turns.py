"""Per-turn judges: one verdict per tutor turn, aggregated into one verdict per session.

A per-turn judge reads one tutor reply in its context ("does this reply reveal the answer?"). Its
turn verdicts are stored per span (the turn's tutor span); the session gets one ordinary judgement,
so rates, gates, comparisons and the report treat it like any session judge:

- ``failing_turn`` (a fail) when any turn failed; the explanation names the first failing turn;
- ``no_failing_turn`` (a pass) when every turn was judged and passed;
- ``error`` when no turn failed but some turn has no verdict (error), ``skipped`` when every turn
  was skipped or the session has no tutor turn.

The score is the share of judged turns that passed.
"""

from __future__ import annotations

from typing import Optional

from ..records import Judgement

FAILING_TURN, NO_FAILING_TURN = "failing_turn", "no_failing_turn"


def aggregate_turns(session_id: str, judge: str, judge_model: str, judge_sample: int,
                    turns: list[Judgement]) -> Judgement:
    """The session verdict of a per-turn judge from its turn verdicts (any order)."""
    turns = sorted(turns, key=lambda j: j.turn or 0)
    judged = [t for t in turns if t.status == "ok"]
    failed = [t for t in judged if not t.passed]

    def verdict(status: str, **fields) -> Judgement:
        return Judgement(session_id, judge, judge_model, judge_sample, status, **fields)

    share: Optional[float] = (len(judged) - len(failed)) / len(judged) if judged else None
    if failed:
        first = failed[0]
        return verdict("ok", label=FAILING_TURN, score=share, passed=False,
                       explanation=f"first failing turn: {first.turn} of {len(turns)} ({first.label}: "
                                   f"{first.explanation or ''}); failing turns: "
                                   f"{', '.join(str(t.turn) for t in failed)}"[:1000])
    errors = [t for t in turns if t.status == "error"]
    if errors:
        return verdict("error", error=f"{len(errors)} of {len(turns)} turn(s) have no verdict; "
                                      f"turn {errors[0].turn}: {errors[0].error}"[:1000])
    if not judged:
        reason = turns[0].error if turns else "the session has no tutor turn"
        return verdict("skipped", error=f"no turn judged: {reason}"[:1000])
    return verdict("ok", label=NO_FAILING_TURN, score=share, passed=True,
                   explanation=f"all {len(judged)} turn(s) passed")


def first_failing_turn(turns: list[Judgement]) -> Optional[int]:
    """The first turn a judge failed, if any."""
    failed = [t.turn for t in turns if t.status == "ok" and not t.passed and t.turn is not None]
    return min(failed) if failed else None
