"""Without xllamacpp (no wheel for the platform, or `pip install simbench` without `[local]`), a run
on the embedded model stops before any model call with a message that says what to install and what
else to run. xllamacpp is hidden from a child interpreter (``sys.modules[name] = None`` makes
importlib treat it as absent); simbench's own code runs unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HIDE_SERVER = "import sys; sys.modules['xllamacpp'] = None; from simbench.cli import main; main()"

LOCAL_MATRIX = """
name: needs-the-embedded-model
tutor:
  variants:
    only: "You teach {{ topic.name }}."
topics: [adding_fractions]
personas: [impatient]
max_turns: 1
"""


def _simbench_without_xllamacpp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE_SERVER, *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_a_run_on_the_embedded_model_without_xllamacpp_says_what_to_install(tmp_path: Path) -> None:
    matrix = tmp_path / "m.yaml"
    matrix.write_text(LOCAL_MATRIX)
    out = tmp_path / "run"
    result = _simbench_without_xllamacpp("run", str(matrix), "--out", str(out), "-q", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "pip install 'simbench[local]'" in result.stderr
    for alternative in ("Ollama", "llama-server", "vLLM"):
        assert alternative in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # a failed start leaves no run directory behind


def test_validate_does_not_need_the_embedded_model(tmp_path: Path) -> None:
    matrix = tmp_path / "m.yaml"
    matrix.write_text(LOCAL_MATRIX)
    result = _simbench_without_xllamacpp("validate", str(matrix), cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
