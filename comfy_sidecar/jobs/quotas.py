"""Per-key quotas (``API_KEYS_FILE``): how many jobs an API key may have in flight, submit per
minute and have waiting. Checked by :meth:`JobLifecycle.admit
<comfy_sidecar.jobs.lifecycle.JobLifecycle.admit>`, the one admission place, through a
:class:`Quotas`: :class:`LocalQuotas` in-process (this module), ``RedisQuotas``
(:mod:`comfy_sidecar.jobs.redis.quotas`) with JOB_QUEUE_URL, where the counters live in Redis so
the limits hold across replicas.

A job admitted under a key's quotas takes a :class:`Hold`:

- ``max_concurrent_jobs``: the key's jobs admitted and not ended (waiting or running, a sync
  ``/prompt`` included) — held from admission until the job ends, however it ends (completed,
  failed, cancelled, timed out, refused while preparing);
- ``max_queue``: those of them not yet running (:meth:`Hold.started` gives that place back);
- ``jobs_per_minute``: admissions in the last 60 s (a sliding window: a place frees 60 s after
  the admission that took it).

Past a limit the admission raises :class:`~comfy_sidecar.errors.RateLimited` (429, the reason
and ``Retry-After`` in it), and nothing is taken.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from typing import Protocol

from comfy_sidecar.config.keys import KeyPolicy
from comfy_sidecar.errors import RateLimited

__all__ = [
    "CONCURRENCY_RETRY_S",
    "NO_HOLD",
    "WINDOW_S",
    "Hold",
    "LocalQuotas",
    "Quotas",
    "refused",
]

#: The jobs_per_minute window, in seconds.
WINDOW_S = 60.0
#: ``Retry-After`` of a refusal by max_concurrent_jobs or max_queue: a job may end any moment.
CONCURRENCY_RETRY_S = 1


def refused(key: KeyPolicy, reason: str, retry_after_s: float) -> RateLimited:
    """The :class:`~comfy_sidecar.errors.RateLimited` for ``key`` past its quota ``reason``
    (a :class:`KeyPolicy` field name), to retry after ``retry_after_s`` seconds."""
    limit = getattr(key, reason)
    what = {
        "max_concurrent_jobs": f"{limit} job(s) in flight",
        "jobs_per_minute": f"{limit} job(s) submitted in the last minute",
        "max_queue": f"{limit} job(s) waiting to run",
    }[reason]
    return RateLimited(
        f"API key {key.name!r} has {what} ({reason}: {limit}); try again later",
        key=key.name,
        reason=reason,
        limit=limit,
        retry_after_s=max(1, math.ceil(retry_after_s)),
    )


class Hold(Protocol):
    """One admitted job's places in its key's quotas. Both calls are idempotent, return at
    once and never raise (a backend that must write elsewhere does it in the background, and
    what it fails to write expires)."""

    def started(self) -> None:
        """The job left the queue (it runs now): give back its ``max_queue`` place."""

    def release(self) -> None:
        """The job ended (or was refused after admission): give back every place it holds."""


class _NoHold:
    """The hold of a job whose key has no quota (or that has no key): nothing to give back."""

    def started(self) -> None:
        """Nothing held."""

    def release(self) -> None:
        """Nothing held."""


#: The hold of a job no quota counts.
NO_HOLD: Hold = _NoHold()


class Quotas(Protocol):
    """Where a key's quotas are counted."""

    async def take(self, key: KeyPolicy, job_id: str, *, runs_here: bool = True) -> Hold:
        """Admit job ``job_id`` under ``key``'s quotas, atomically (check and count in one
        step): its :class:`Hold`, or :class:`~comfy_sidecar.errors.RateLimited` when a quota
        is reached (nothing taken). ``runs_here``: the job runs on this replica (``/prompt``,
        the in-process job APIs) and this process releases its hold; False: a job of the shared
        queue, whose hold is released by whichever replica ends it (only a refusal after the
        admission releases it here)."""
        ...


class _LocalHold:
    def __init__(self, quotas: LocalQuotas, name: str) -> None:
        self.quotas = quotas
        self.name = name
        self.waiting = True
        self.held = True

    def started(self) -> None:
        if self.held and self.waiting:
            self.waiting = False
            self.quotas.waiting[self.name] -= 1

    def release(self) -> None:
        self.started()
        if self.held:
            self.held = False
            self.quotas.active[self.name] -= 1


class LocalQuotas:
    """The quotas of an in-process sidecar, counted in memory (a :class:`Quotas`); ``clock``
    (monotonic seconds) times the jobs_per_minute window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        #: Jobs admitted and not ended, by key name.
        self.active: collections.Counter[str] = collections.Counter()
        #: Jobs admitted and not yet running, by key name.
        self.waiting: collections.Counter[str] = collections.Counter()
        #: Admission times in the last minute, oldest first, by key name.
        self.window: dict[str, collections.deque[float]] = {}

    async def take(self, key: KeyPolicy, job_id: str, *, runs_here: bool = True) -> Hold:
        """See :meth:`Quotas.take` (every in-process job runs here)."""
        if not key.limited:
            return NO_HOLD
        name = key.name
        if key.max_concurrent_jobs is not None and self.active[name] >= key.max_concurrent_jobs:
            raise refused(key, "max_concurrent_jobs", CONCURRENCY_RETRY_S)
        if key.max_queue is not None and self.waiting[name] >= key.max_queue:
            raise refused(key, "max_queue", CONCURRENCY_RETRY_S)
        if key.jobs_per_minute is not None:
            now = self.clock()
            window = self.window.setdefault(name, collections.deque())
            while window and window[0] <= now - WINDOW_S:
                window.popleft()
            if len(window) >= key.jobs_per_minute:
                raise refused(key, "jobs_per_minute", window[0] + WINDOW_S - now)
            window.append(now)
        self.active[name] += 1
        self.waiting[name] += 1
        return _LocalHold(self, name)
