"""An http tutor's app for the length of a run: started by its ``start`` command (when it has one)
on a free port, waited for, checked reachable, and stopped with its whole process group after."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx2

from ..children import dies_with_parent, free_port, stop_group
from ..matrix import PORT_PLACEHOLDER, HttpSpec

APP_LOG = "tutor-app.log"


class AppError(Exception):
    """The app could not be started or does not answer. ``exit_code`` as the run's."""

    def __init__(self, message: str, exit_code: int = 3):
        super().__init__(message)
        self.exit_code = exit_code


def probe_url(spec: HttpSpec, base_url: str) -> str:
    """What is asked to see the app is up: ``/models`` of an OpenAI-compatible app, else its base URL."""
    return base_url.rstrip("/") + "/models" if spec.protocol == "openai" else base_url


def _answers(url: str, headers: dict[str, str]) -> Optional[int]:
    """The HTTP status the app gives ``url``, or None when nothing answers."""
    try:
        return httpx2.get(url, headers=headers, timeout=5).status_code
    except httpx2.HTTPError:
        return None


@contextlib.contextmanager
def running_app(spec: HttpSpec, folder: Optional[Path], log_dir: Path, headers: dict[str, str],
                env: dict[str, str]) -> Iterator[str]:
    """The app's base URL, with the app started first if the spec has a ``start`` command (in the
    matrix's folder, ``{port}`` filled in, ``PORT`` and ``env`` set, ``python`` being simbench's own).
    Raises AppError when it does not come up or answer; refuses (exit 2) a key it rejects."""
    port = free_port() if PORT_PLACEHOLDER in spec.base_url else None
    base_url = spec.base_url.replace(PORT_PLACEHOLDER, str(port)) if port else spec.base_url
    process = None
    log_path = log_dir / APP_LOG
    try:
        if spec.start:
            process = _start(spec, port, folder, log_path, env)
            _wait_until_up(spec, base_url, process, log_path, headers)
        status = _answers(probe_url(spec, base_url), headers)
        if status is None:
            raise AppError(f"the tutor app at {base_url} is unreachable (is it running? start it, or give "
                           "tutor.http.start so simbench starts it)")
        if status in (401, 403):
            raise AppError(f"the tutor app at {base_url} refused the request (HTTP {status}): check tutor.http.headers", 2)
        if status >= 500:
            raise AppError(f"the tutor app at {base_url} is failing: GET {probe_url(spec, base_url)} answered HTTP {status}")
        yield base_url
    finally:
        if process is not None:
            stop_group(process, grace_s=5)


def _start(spec: HttpSpec, port: Optional[int], folder: Optional[Path], log_path: Path,
           env: dict[str, str]) -> subprocess.Popen:
    command = spec.start.replace(PORT_PLACEHOLDER, str(port)) if port else spec.start
    argv = shlex.split(command)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable  # the venv simbench runs in, whatever PATH says
    environment = {**os.environ, **env}
    if port:
        environment["PORT"] = str(port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(argv, cwd=folder, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=dies_with_parent(signal.SIGTERM))
    except OSError as exc:
        raise AppError(f"tutor.http.start: cannot run {command!r}: {exc.strerror or exc}", 2) from None
    finally:
        log.close()


def _wait_until_up(spec: HttpSpec, base_url: str, process: subprocess.Popen, log_path: Path,
                   headers: dict[str, str]) -> None:
    deadline = time.monotonic() + spec.startup_timeout
    url = probe_url(spec, base_url)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AppError(f"the tutor app exited with code {process.returncode} while starting; see {log_path}")
        if _answers(url, headers) is not None:
            return
        time.sleep(0.2)
    raise AppError(f"the tutor app did not answer {url} within {spec.startup_timeout:g} s "
                   f"(tutor.http.startup_timeout); see {log_path}")
