"""The job backend as one caller sees it: its API key's jobs only, when JOBS_VISIBLE_TO=owner.

The HTTP layer hands every route (``/jobs``, the Modal, simple Modal, ai-dock and Comfy API v2
adapters) a :class:`CallerJobs` over the one backend, made per request from the request's key
policy. It stamps the key's policy on every job submitted (its name owns the job, its quotas
admit it, its priority places it), and with ``owner_only`` it answers for the caller's own jobs
only: another key's job is not found (``get``, ``wait``, ``cancel``, ``follow``, ``output``,
``estimate`` answer as for an unknown id: 404 on every route, the same as a job that never
existed), and pages list the caller's jobs alone (each backend's ``page`` filters by owner, so a
page is full and its cursor exact). Without keys (no caller) everything is visible.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from comfy_sidecar.config.keys import KeyPolicy
from comfy_sidecar.jobs.backend import JobBackend, OutputBlob, Spawn
from comfy_sidecar.jobs.model import JobEvent, JobStatus, JobView
from comfy_sidecar.jobs.spec import JobSpec

__all__ = ["CallerJobs"]


class CallerJobs:
    """``backend`` as the caller with API key policy ``key`` (None: no key) sees it (a
    :class:`~comfy_sidecar.jobs.backend.JobBackend`); ``owner_only``: JOBS_VISIBLE_TO=owner."""

    def __init__(self, backend: JobBackend, key: KeyPolicy | None, owner_only: bool) -> None:
        self.backend = backend
        self.key = key
        #: Whose jobs the caller sees (None: everyone's).
        self.owner = key.name if owner_only and key is not None else None

    def _visible(self, view: JobView | None) -> JobView | None:
        if view is None or self.owner is None or view.owner == self.owner:
            return view
        return None

    async def _sees(self, job_id: str) -> bool:
        return self.owner is None or self._visible(await self.backend.get(job_id)) is not None

    @property
    def problem(self) -> str | None:
        """The backend's problem."""
        return self.backend.problem

    async def start(self, spawn: Spawn) -> None:
        """The runtime starts the backend itself."""
        await self.backend.start(spawn)

    async def stop(self) -> None:
        """The runtime stops the backend itself."""
        await self.backend.stop()

    async def wait_idle(self, timeout_s: float) -> bool:
        """The backend's."""
        return await self.backend.wait_idle(timeout_s)

    async def close(self) -> None:
        """The runtime closes the backend itself."""
        await self.backend.close()

    async def submit(self, spec: JobSpec) -> JobView:
        """Submit ``spec`` as the caller's job (its key's policy stamped on it)."""
        return await self.backend.submit(msgspec.structs.replace(spec, key=self.key))

    async def get(self, job_id: str) -> JobView | None:
        """The job's view, None when it is not the caller's to see."""
        return self._visible(await self.backend.get(job_id))

    async def wait(self, job_id: str, wait_s: float) -> JobView | None:
        """As the backend's, for the caller's jobs."""
        if not await self._sees(job_id):
            return None
        return self._visible(await self.backend.wait(job_id, wait_s))

    async def follow(
        self, job_id: str, after: int, heartbeat_s: float, previews: bool = False
    ) -> AsyncIterator[JobEvent | None]:
        """The job's events; none for a job that is not the caller's."""
        if not await self._sees(job_id):
            return
        async for event in self.backend.follow(job_id, after, heartbeat_s, previews):
            yield event

    async def cancel(self, job_id: str) -> tuple[bool, JobView] | None:
        """Cancel the caller's job; None for another's."""
        if not await self._sees(job_id):
            return None
        return await self.backend.cancel(job_id)

    async def page(
        self, status: JobStatus | None, limit: int, cursor: int | None, owner: str | None = None
    ) -> tuple[list[JobView], int | None]:
        """A page of the jobs the caller sees."""
        return await self.backend.page(status, limit, cursor, self.owner or owner)

    async def waiting(self) -> int:
        """Every caller's waiting jobs (a count: it names no job)."""
        return await self.backend.waiting()

    async def estimate(self, job_id: str | None) -> int | None:
        """The backend's estimate; None for a job that is not the caller's."""
        if job_id is not None and not await self._sees(job_id):
            return None
        return await self.backend.estimate(job_id)

    async def output(self, job_id: str, index: int) -> OutputBlob | None:
        """The caller's job's output; None for another's."""
        if not await self._sees(job_id):
            return None
        return await self.backend.output(job_id, index)
