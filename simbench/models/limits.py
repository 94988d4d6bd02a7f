"""Per-model limits shared by every role that calls the model: concurrency, rpm, tpm, and back-off.

One ``ModelLimiter`` per logical model, so tutor, student and judge calls to one provider share one
budget. Concurrency adapts (AIMD): sustained 429s cut it, a run of successes wins it back. ``rpm``
and ``tpm`` are sliding one-minute windows that are never exceeded (tokens are estimated before a
request is sent and corrected with the answer's usage).
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

WINDOW_S = 60.0


@dataclass
class RunCounters:
    """Live counts shown on the progress bars."""

    retries: int = 0
    rate_limited: int = 0
    failed_calls: int = 0


class AdaptiveLimit:
    """A semaphore whose capacity can shrink and grow while tasks wait on it.

    ``release`` and ``resize`` are synchronous: a task cancelled while releasing (phoenix.evals
    cancels tasks at its timeout) can never leak a slot.
    """

    def __init__(self, capacity: int):
        self.maximum = capacity
        self.capacity = capacity
        self.in_use = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self) -> None:
        if self.in_use < self.capacity and not self._waiters:
            self.in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the slot is handed over by _wake (in_use already counted)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # woken and cancelled at once: give the slot back
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def resize(self, capacity: int) -> None:
        self.capacity = max(1, min(self.maximum, capacity))
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)


class SlidingWindow:
    """At most ``limit`` units in any ``WINDOW_S`` seconds."""

    def __init__(self, limit: int, clock=time.monotonic):
        self.limit = limit
        self.clock = clock
        self.events: collections.deque[tuple[float, float]] = collections.deque()
        self.total = 0.0
        self._lock = asyncio.Lock()

    def _expire(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - WINDOW_S:
            self.total -= self.events.popleft()[1]

    async def take(self, units: float) -> list:
        """Wait until ``units`` fit in the window, then record them; returns the event for ``adjust``."""
        units = min(units, self.limit)  # one request larger than the limit still goes, alone
        async with self._lock:
            while True:
                now = self.clock()
                self._expire(now)
                if self.total + units <= self.limit:
                    event = [now, units]
                    self.events.append(event)  # type: ignore[arg-type]
                    self.total += units
                    return event
                # re-check at least twice a second: adjust() may have made room meanwhile
                await asyncio.sleep(min(0.5, max(0.01, self.events[0][0] + WINDOW_S - now)))

    def adjust(self, event: list, units: float) -> None:
        """Replace an estimate with the real count once the answer says how many tokens it used."""
        if event in self.events:
            self.total += units - event[1]
            event[1] = units


@dataclass
class ModelLimiter:
    """Everything that decides when a request to one model may go out, and how long to back off."""

    name: str
    concurrency: int
    rpm: Optional[int] = None
    tpm: Optional[int] = None
    max_retries: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    counters: RunCounters = field(default_factory=RunCounters)

    def __post_init__(self) -> None:
        self.limit = AdaptiveLimit(self.concurrency)
        self.requests = SlidingWindow(self.rpm) if self.rpm else None
        self.tokens = SlidingWindow(self.tpm) if self.tpm else None
        self._recent_429: collections.deque[float] = collections.deque()
        self._successes = 0

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[Optional[list]]:
        """Hold one concurrency slot (after the rpm/tpm windows admit the request)."""
        if self.requests is not None:
            await self.requests.take(1)
        event = await self.tokens.take(estimated_tokens) if self.tokens is not None else None
        await self.limit.acquire()
        try:
            yield event
        finally:
            self.limit.release()

    def used_tokens(self, event: Optional[list], tokens: int) -> None:
        if self.tokens is not None and event is not None:
            self.tokens.adjust(event, tokens)

    def on_success(self) -> None:
        self._successes += 1
        if self.limit.capacity < self.limit.maximum and self._successes >= self.limit.capacity:
            self._successes = 0
            self.limit.resize(self.limit.capacity + 1)

    def on_rate_limited(self) -> None:
        """Three 429s within ten seconds count as sustained: cut concurrency by a quarter."""
        self.counters.rate_limited += 1
        now = time.monotonic()
        self._recent_429.append(now)
        while self._recent_429 and self._recent_429[0] < now - 10:
            self._recent_429.popleft()
        if len(self._recent_429) >= 3:
            self._recent_429.clear()
            self._successes = 0
            self.limit.resize(int(self.limit.capacity * 0.75))

    def backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        """Seconds to wait before retry ``attempt`` (1-based): Retry-After if given, else exponential; with jitter."""
        if retry_after is not None:
            return retry_after + random.uniform(0, min(1.0, 0.1 + retry_after * 0.1))
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After in seconds (the HTTP-date form is rare from model APIs and is ignored)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
