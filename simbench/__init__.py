"""simbench: simulate whole conversations with LLM-played users, judge every session, report what fails.

The public surface is the CLI, the matrix format, the run file and summary.json (see docs/).
From Python: ``load_matrix`` then ``run_matrix``.
"""

__version__ = "0.1.0"

__all__ = ["Matrix", "MatrixError", "ModelEndpoint", "RunError", "RunOutcome", "ToolCall", "TurnContext", "TutorReply",
           "load_matrix", "rebuild_report", "run_matrix", "__version__"]

_LAZY = {
    "Matrix": "matrix", "MatrixError": "matrix", "load_matrix": "matrix",
    "ModelEndpoint": "agent", "ToolCall": "agent", "TurnContext": "agent", "TutorReply": "agent",
    "RunError": "pipeline", "RunOutcome": "pipeline", "rebuild_report": "pipeline", "run_matrix": "pipeline",
}


def __getattr__(name: str):
    # Imported on first use: the pipeline pulls in pandas and phoenix.evals, which `simbench validate`
    # and `--help` do not need.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'simbench' has no attribute {name!r}")
