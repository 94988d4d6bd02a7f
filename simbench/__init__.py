"""simbench: simulate whole conversations with LLM-played users, judge every session, report what fails.

The public surface is the CLI, the matrix format, the run file and summary.json (see docs/).
From Python: ``load_matrix`` then ``run_matrix``.
"""

__version__ = "0.1.0"

from .matrix import Matrix, MatrixError, load_matrix  # noqa: E402
from .pipeline import RunError, RunOutcome, rebuild_report, run_matrix  # noqa: E402

__all__ = ["Matrix", "MatrixError", "RunError", "RunOutcome", "load_matrix", "rebuild_report", "run_matrix", "__version__"]
