"""Processes simbench starts (the embedded model server, an http tutor's app): a free port on
127.0.0.1 for each, and no child that outlives simbench, however simbench ends."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
from typing import Callable

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _own_group_dying_with_parent(signum: int) -> None:
    os.setpgid(0, 0)  # its own process group: Ctrl-C in the terminal is simbench's to handle
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):  # not Linux: stopped on exit, Ctrl-C and exceptions only
        pass


def dies_with_parent(signum: int) -> Callable[[], None]:
    """A ``preexec_fn`` for the child: its own process group, and ``signum`` from the kernel when
    simbench dies, even by SIGKILL."""
    return functools.partial(_own_group_dying_with_parent, signum)


def stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the child's process group; SIGKILL if it is still there after ``grace_s``."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
