"""The job backend: where the job APIs' jobs, their events, their queue and their outputs live.
Chosen once at start-up (the way uvicorn picks ``lifespan=on`` or ``off``):

- :class:`~comfy_sidecar.jobs.local.LocalBackend` (default): in this process's memory, run here;
- :class:`~comfy_sidecar.jobs.redis.backend.RedisBackend` (``JOB_QUEUE_URL``): in Redis, run by
  whichever replica has a free instance slot, answered for by every replica.

Both return :class:`~comfy_sidecar.jobs.model.JobView`; routes and adapters never ask which one
runs. Each maps its own failures (Redis's included) to the domain errors of
:mod:`comfy_sidecar.errors`: :class:`~comfy_sidecar.errors.Unavailable` (503, with
``Retry-After``) while its store cannot be reached, :class:`~comfy_sidecar.errors.Conflict`
for an id kept with another body, the pipeline's 4xx errors for a caller's mistake.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from comfy_sidecar.jobs.model import JobEvent, JobStatus, JobView
from comfy_sidecar.jobs.spec import JobSpec

__all__ = ["JobBackend", "OutputBlob", "Spawn"]

Spawn = Callable[[Awaitable[Any]], Any]
"""``spawn(coro)``: run ``coro`` as a task the process owns (cancelled at shutdown)."""


class OutputBlob(Protocol):
    """One retained output file of a job, wherever its bytes are kept: ``size`` in bytes,
    ``mime_type`` and ``filename`` from the job's view."""

    size: int
    filename: str
    mime_type: str

    def chunks(self, first: int, last: int) -> AsyncIterator[bytes]:
        """Bytes ``first``..``last`` (inclusive), in chunks of at most 1 MiB, streamed."""
        ...

    async def read(self) -> bytes:
        """Every byte (for ``?include=data``: outputs kept for a job API are bounded)."""
        ...


@runtime_checkable
class JobBackend(Protocol):
    """The job APIs' jobs (see the module docstring). Every method raises
    :class:`~comfy_sidecar.errors.Unavailable` while the backend's store cannot be reached."""

    @property
    def problem(self) -> str | None:
        """Why jobs cannot be taken or read now (``/ready``'s detail), or None."""
        ...

    async def start(self, spawn: Spawn) -> None:
        """Begin serving (the Redis backend starts claiming jobs, with tasks owned by
        ``spawn``)."""
        ...

    async def stop(self) -> None:
        """Stop taking jobs to run here (SIGTERM): those claimed but not started go back."""
        ...

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds until the jobs this replica runs have their end
        persisted; True when none is left."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

    async def submit(self, spec: JobSpec) -> JobView:
        """Take a job; returns its view (the kept one for a resubmission of a kept id with
        the same fingerprint). Raises :class:`~comfy_sidecar.errors.Conflict` (another
        body), the 4xx :class:`~comfy_sidecar.errors.InputError` of a caller's mistake, and
        the admission errors (:class:`~comfy_sidecar.errors.Overloaded`,
        :class:`~comfy_sidecar.errors.Unavailable`)."""
        ...

    async def get(self, job_id: str) -> JobView | None:
        """Job ``job_id``'s view (``queue_position`` exact while it waits), or None."""
        ...

    async def wait(self, job_id: str, wait_s: float) -> JobView | None:
        """Job ``job_id``'s view once it has ended or ``wait_s`` seconds have passed (None:
        not kept). Waits on the job's events: no polling."""
        ...

    def follow(
        self, job_id: str, after: int, heartbeat_s: float, previews: bool = False
    ) -> AsyncIterator[JobEvent | None]:
        """Job ``job_id``'s events with ids above ``after``, as they come; None every
        ``heartbeat_s`` seconds of silence; live ``preview`` events (id 0) with
        ``previews``. Ends after ``done``. Check that the job exists first (:meth:`get`)."""
        ...

    async def cancel(self, job_id: str) -> tuple[bool, JobView] | None:
        """Cancel job ``job_id`` wherever it is (a waiting one ends ``cancelled`` at once, a
        running one is interrupted where it runs); (cancelled, its view after), or None when
        it is not kept. A job that had ended answers (False, its view)."""
        ...

    async def page(
        self, status: JobStatus | None, limit: int, cursor: int | None, owner: str | None = None
    ) -> tuple[list[JobView], int | None]:
        """Newest first: up to ``limit`` jobs (with ``status``, and submitted with the API key
        named ``owner``, when given) older than ``cursor`` (from a previous page); (views, next
        cursor or None)."""
        ...

    async def waiting(self) -> int:
        """How many jobs wait to be run (claimed by no replica yet)."""
        ...

    async def estimate(self, job_id: str | None) -> int | None:
        """Seconds until job ``job_id`` (or a job submitted now) is likely done, from recent
        run times; None when unknown."""
        ...

    async def output(self, job_id: str, index: int) -> OutputBlob | None:
        """Retained output ``index`` of job ``job_id``, or None."""
        ...
