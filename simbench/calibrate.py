"""``simbench calibrate``: how far to trust each judge dimension, measured on human-labelled sessions.

The labelled transcripts file is validated with its label map before any model call, then judged
by ``simbench judge --transcripts`` on the labelled dimensions only; the run's summary.json and
report carry a ``calibration`` section (reports/calibration.py computes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .evaluators.transcripts import load_transcripts
from .matrix import JudgesSpec, Matrix
from .offline import judge_transcripts
from .pipeline import RunOutcome
from .reports.calibration import MAP_SETTING, MIN_KAPPA_SETTING, LabelMapError, check_labels, kappa_failures, load_label_map
from .reports.summary import judge_choices


@dataclass
class CalibrationOutcome:
    outcome: RunOutcome
    section: dict[str, Any]  # summary.json's "calibration"
    failures: list[str]  # dimensions under --min-kappa


def run_calibration(path: Path, map_path: Optional[Path] = None, matrix: Optional[Matrix] = None, *,
                    min_kappa: Optional[float] = None, run_dir: Optional[Path] = None,
                    cache_path: Optional[Path] = None, progress: bool = True, judge_samples: Optional[int] = None,
                    judge_temperature: Optional[float] = None) -> CalibrationOutcome:
    """Judge a labelled transcripts file and compare the judges with the human labels.

    Raises ``TranscriptError`` or ``LabelMapError`` (input errors, before any model call) and
    ``RunError`` as ``judge_transcripts`` does.
    """
    sessions = load_transcripts(path)
    mapping = load_label_map(map_path)
    judges = matrix.judges if matrix else JudgesSpec()
    problems = check_labels(sessions, mapping, judge_choices(judges.definitions()), str(path),
                            str(map_path) if map_path else "the label map")
    if problems:
        raise LabelMapError(problems)
    # Only the labelled dimensions are judged: the others would cost calls and calibrate nothing.
    labelled = {dim for s in sessions for dim in s.labels}
    judges = judges.model_copy(update={"use": [d for d in judges.use if d in labelled]})
    outcome = judge_transcripts(path, matrix, run_dir, judges=judges, cache_path=cache_path, progress=progress, sessions=sessions,
                                settings={MAP_SETTING: mapping, MIN_KAPPA_SETTING: min_kappa},
                                judge_samples=judge_samples, judge_temperature=judge_temperature)
    section = outcome.summary["calibration"]
    return CalibrationOutcome(outcome, section, kappa_failures(section))
