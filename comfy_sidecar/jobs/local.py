"""The in-process job backend (no ``JOB_QUEUE_URL``): the job APIs' jobs live in this process's
:class:`~comfy_sidecar.jobs.store.JobStore`, run here through the job lifecycle, and their
output files are kept under ``JOBS_DIR`` for the retention. A restarted sidecar starts empty.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from comfy_sidecar.jobs.backend import Spawn
from comfy_sidecar.jobs.lifecycle import JobLifecycle
from comfy_sidecar.jobs.model import JobEvent, JobStatus, JobView
from comfy_sidecar.jobs.record import JobRecord
from comfy_sidecar.jobs.spec import JobSpec
from comfy_sidecar.jobs.store import JobStore
from comfy_sidecar.storage.files import read_slice

__all__ = ["ESTIMATE_SAMPLE", "FileOutput", "LocalBackend", "estimated_wait_s"]

#: Completed jobs the wait estimate averages over (the most recent ones).
ESTIMATE_SAMPLE = 20


@dataclass
class FileOutput:
    """A retained output file on this replica's disk (an :class:`OutputBlob`)."""

    path: Path
    size: int
    filename: str
    mime_type: str

    def chunks(self, first: int, last: int) -> AsyncIterator[bytes]:
        """Bytes ``first``..``last`` of the file, streamed."""
        return read_slice(self.path, first, last)

    async def read(self) -> bytes:
        """The whole file (off the event loop)."""
        import asyncio

        return await asyncio.to_thread(self.path.read_bytes)


def estimated_wait_s(store: JobStore, record: JobRecord | None = None) -> int | None:
    """Seconds until ``record`` (or a job submitted now) is likely done: the mean run time of
    the last completed jobs times the jobs ahead of it plus one. None before any job ran."""
    durations: list[int] = []
    pending = 0
    for other in reversed(list(store)):
        if other is record:
            pending = 0  # count only the jobs ahead of it
            continue
        if other.status in (JobStatus.PENDING, JobStatus.IN_PROGRESS):
            pending += 1
        elif (
            other.status is JobStatus.COMPLETED
            and other.started_ms is not None
            and other.completed_ms is not None
            and len(durations) < ESTIMATE_SAMPLE
        ):
            durations.append(other.completed_ms - other.started_ms)
    if not durations:
        return None
    if record is not None and record.status.terminal:
        return 0
    mean_s = sum(durations) / len(durations) / 1000
    return max(1, round(mean_s * (pending + 1)))


class LocalBackend:
    """The job API over this process's store (a :class:`~comfy_sidecar.jobs.backend
    .JobBackend`)."""

    def __init__(self, lifecycle: JobLifecycle) -> None:
        self.lifecycle = lifecycle
        self.store = lifecycle.store

    @property
    def problem(self) -> str | None:
        """Never a problem: memory is always there."""
        return None

    async def start(self, spawn: Spawn) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        """Nothing to give back: the jobs in flight finish in the drain."""

    async def wait_idle(self, timeout_s: float) -> bool:
        """Nothing to persist."""
        return True

    async def close(self) -> None:
        """Nothing to close."""

    def _find(self, job_id: str) -> JobRecord | None:
        self.store.expire()
        return self.store.find(job_id)

    async def submit(self, spec: JobSpec) -> JobView:
        """Admit, prepare now (downloads included: a caller's mistake is a 4xx and nothing is
        kept), then run in the background (:meth:`JobLifecycle.submit`)."""
        record = await self.lifecycle.submit(spec)
        return self.store.view(record)

    async def get(self, job_id: str) -> JobView | None:
        """The job's view, or None."""
        record = self._find(job_id)
        return None if record is None else self.store.view(record)

    async def wait(self, job_id: str, wait_s: float) -> JobView | None:
        """The view once the job ended or ``wait_s`` passed."""
        record = self._find(job_id)
        if record is None:
            return None
        if wait_s > 0:
            await record.wait_ended(wait_s)
        return self.store.view(record)

    def follow(
        self, job_id: str, after: int, heartbeat_s: float, previews: bool = False
    ) -> AsyncIterator[JobEvent | None]:
        """The record's events (see :meth:`JobRecord.follow`)."""
        record = self.store.get(job_id)
        return record.follow(after, heartbeat_s, previews)

    async def cancel(self, job_id: str) -> tuple[bool, JobView] | None:
        """Interrupt the job wherever it is on this replica (:meth:`JobLifecycle.cancel`)."""
        record = self._find(job_id)
        if record is None:
            return None
        cancelled = await self.lifecycle.cancel(record)
        return cancelled, self.store.view(record)

    async def page(
        self, status: JobStatus | None, limit: int, cursor: int | None, owner: str | None = None
    ) -> tuple[list[JobView], int | None]:
        """A page of the store, newest first (``owner``'s jobs only, when given)."""
        records, following = self.store.page(status, limit, cursor, owner)
        return [self.store.view(record) for record in records], following

    async def waiting(self) -> int:
        """Jobs of the store not yet running."""
        return sum(1 for record in self.store if record.status is JobStatus.PENDING)

    async def estimate(self, job_id: str | None) -> int | None:
        """:func:`estimated_wait_s` over the store."""
        record = self._find(job_id) if job_id is not None else None
        return estimated_wait_s(self.store, record)

    async def output(self, job_id: str, index: int) -> FileOutput | None:
        """Retained output ``index`` (a file under JOBS_DIR), or None."""
        record = self._find(job_id)
        if record is None or not 0 <= index < len(record.files):
            return None
        path = record.files[index]
        try:
            size = path.stat().st_size
        except OSError:
            return None
        output = record.outputs[index]
        return FileOutput(path, size, output.filename, output.mime_type)
