"""``run_async``: ``asyncio.run`` for simbench's sync entry points, also where a loop already runs.

A notebook (Jupyter, VS Code) runs its own event loop in the thread that calls ``run_matrix``, and
``asyncio.run`` refuses to start a second one there. The coroutine then runs on a thread of its own,
with the caller's context variables (OpenInference attributes among them), and the caller waits. An
interrupt of the wait (the notebook's stop button) cancels the coroutine and waits for it to wind
down, so nothing keeps calling models after the cell has stopped.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    return _run_on_own_thread(coro)


def _run_on_own_thread(coro: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.new_event_loop()
    task = loop.create_task(coro)  # created here, so it runs in a copy of the caller's context
    finished = threading.Event()
    outcome: dict[str, Any] = {}

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            outcome["value"] = loop.run_until_complete(task)
        except BaseException as exc:  # handed to the caller's thread, which raises it
            outcome["error"] = exc
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                finished.set()

    # An Event, not Thread.join: a KeyboardInterrupt inside join() marks the thread stopped while it
    # still runs (CPython's bpo-45274 handling), and a second join() would return at once.
    threading.Thread(target=target, name="simbench-run", daemon=True).start()
    try:
        _wait(finished)
    except BaseException:
        try:
            loop.call_soon_threadsafe(task.cancel)
        except RuntimeError:  # the loop closed in between: the coroutine has ended already
            pass
        _wait(finished)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _wait(event: threading.Event) -> None:
    # Short waits: a signal sent to another thread is only handled (raised here) when this thread
    # next runs Python code.
    while not event.wait(0.1):
        pass
