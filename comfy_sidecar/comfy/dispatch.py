"""The dispatcher: jobs wait in the sidecar until an instance is ready and has a free slot.

Each instance holds at most ``per_instance`` jobs (default 2, so the next prompt is already in
ComfyUI's queue when one ends and the GPU does not idle between them). A waiting job goes,
highest ``priority`` first (an API key's, a plain int: this module knows nothing of keys) and in
arrival order within one priority, to the ready instance with the fewest jobs; ties go round
robin. An instance that restarts, recycles or reconnects simply stops being ready: jobs keep
waiting here instead of being refused, and :meth:`Dispatcher.poke` hands them out again when it
is back.

This is the sidecar-side queue that ai-dock's wrapper keeps per backend
(``COMFYUI_BACKENDS``) and that comfyui-api does not have (it forwards straight to ComfyUI).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from comfy_sidecar.errors import Unavailable


class Slotted(Protocol):
    """What the dispatcher needs of an instance."""

    @property
    def name(self) -> str:
        """The instance's label (``"0"``, ``"1"``, …)."""
        ...

    @property
    def accepting(self) -> bool:
        """True while the instance is ready to be given new jobs."""
        ...


class Signals(Protocol):
    """Where the dispatcher hears that an instance may take jobs again."""

    def on_ready(self, listener: Callable[[Any], None]) -> None: ...
    def on_connected(self, listener: Callable[[Any], None]) -> None: ...


class Dispatcher:
    """Hands instances out to waiting jobs; ``per_instance`` slots each. With ``signals`` it
    hands slots out again whenever an instance becomes ready or its websocket reconnects;
    ``clock`` (monotonic seconds) times how long jobs wait."""

    def __init__(
        self,
        instances: Sequence[Slotted],
        per_instance: int = 2,
        signals: Signals | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instances = list(instances)
        self.per_instance = max(1, per_instance)
        self.in_flight: dict[str, int] = {i.name: 0 for i in self.instances}
        #: Waiting jobs in the order they get slots: ``(-priority, arrival, future)``.
        self._waiters: list[tuple[int, int, asyncio.Future[Slotted]]] = []
        self._arrivals = itertools.count()
        self._clock = clock
        #: When each waiter started waiting (``clock()`` seconds).
        self._since: dict[asyncio.Future[Slotted], float] = {}
        self._next = 0
        #: Set by :meth:`close`: why no job will get a slot any more.
        self._closed: str | None = None
        #: Called whenever a slot comes free (the Redis backend claims another job then).
        self.freed: list[Callable[[], None]] = []
        if signals is not None:
            signals.on_ready(lambda _instance: self.poke())
            signals.on_connected(lambda _instance: self.poke())

    @property
    def waiting(self) -> int:
        """Jobs waiting for a slot."""
        return sum(1 for _, _, w in self._waiters if not w.done())

    @property
    def oldest_wait_s(self) -> float:
        """Seconds the longest-waiting job has waited for a slot so far; 0 when none waits.
        (``comfyui_jobs_waiting_oldest_seconds``: alert when jobs wait too long.)"""
        since = [self._since[w] for _, _, w in self._waiters if not w.done()]
        return max(0.0, self._clock() - min(since)) if since else 0.0

    @property
    def running(self) -> int:
        """Jobs holding a slot."""
        return sum(self.in_flight.values())

    def free_slots(self) -> int:
        """Slots free on instances that accept work now."""
        return sum(
            max(0, self.per_instance - self.in_flight[i.name])
            for i in self.instances
            if i.accepting
        )

    def _pick(self) -> Slotted | None:
        best: Slotted | None = None
        count = len(self.instances)
        for offset in range(count):
            instance = self.instances[(self._next + offset) % count]
            load = self.in_flight[instance.name]
            if not instance.accepting or load >= self.per_instance:
                continue
            if best is None or load < self.in_flight[best.name]:
                best = instance
        if best is not None:
            self._next = (self.instances.index(best) + 1) % count
            self.in_flight[best.name] += 1
        return best

    async def acquire(self, priority: int = 0) -> Slotted:
        """Wait for a slot, behind the waiting jobs of a ``priority`` as high or higher and
        ahead of those of a lower one; returns the instance holding it. The caller must
        :meth:`release` it. Cancelling the wait gives nothing up. Raises
        :class:`~comfy_sidecar.errors.Unavailable` once the dispatcher is closed."""
        if self._closed is not None:
            raise Unavailable(self._closed)
        if not any(not w.done() for _, _, w in self._waiters):
            instance = self._pick()
            if instance is not None:
                return instance
        waiter: asyncio.Future[Slotted] = asyncio.get_running_loop().create_future()
        entry = (-priority, next(self._arrivals), waiter)
        bisect.insort(self._waiters, entry, key=lambda item: item[:2])
        self._since[waiter] = self._clock()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed a slot just as the wait was cancelled
            raise
        finally:
            self._since.pop(waiter, None)
            try:
                self._waiters.remove(entry)
            except ValueError:
                pass

    def release(self, instance: Slotted) -> None:
        """Give back ``instance``'s slot and hand it to the next waiting job."""
        if self.in_flight.get(instance.name, 0) > 0:
            self.in_flight[instance.name] -= 1
        self.poke()
        for listener in self.freed:
            listener()

    def close(self, reason: str) -> None:
        """No instance will take jobs any more (the sidecar stops, or every instance gave up):
        every waiting job, and every later :meth:`acquire`, raises
        :class:`~comfy_sidecar.errors.Unavailable` (503) with ``reason`` — instead of waiting
        until the HTTP server cancels it."""
        self._closed = reason
        for _, _, waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_exception(Unavailable(reason))

    def poke(self) -> None:
        """Hand free slots to waiting jobs, highest priority first (call when an instance
        becomes ready)."""
        for _, _, waiter in list(self._waiters):
            if waiter.done():
                continue
            instance = self._pick()
            if instance is None:
                return
            waiter.set_result(instance)
