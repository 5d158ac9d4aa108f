"""The in-process job store: every job this replica keeps, from submission to expiry.

One :class:`~comfy_sidecar.jobs.record.JobRecord` per job, whatever submitted it
(``/prompt``, ``/jobs``, a workflow endpoint, an adapter, the warmup). Ended jobs are kept
``retention_s`` seconds, at most ``max_jobs`` of them; their output files live under
``jobs_dir/<id>/`` and are deleted with the record. The store is in memory: a restarted
sidecar starts empty (and clears ``jobs_dir``).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from comfy_sidecar.jobs.model import DifferentBody, JobStatus, JobView, labels_match, now_ms
from comfy_sidecar.jobs.progress import Progress
from comfy_sidecar.jobs.record import JobRecord
from comfy_sidecar.observability import metrics

__all__ = ["MARKER", "DifferentBody", "JobRecord", "JobStatus", "JobStore", "UnknownJob"]

log = logging.getLogger("comfy_sidecar.jobs")


#: The file that marks a directory as the store's own (so start-up may empty it).
MARKER = ".comfy-sidecar-jobs"


class UnknownJob(LookupError):
    """No job with this id is retained."""


class JobStore:
    """Jobs by id, newest last; ended jobs expire after ``retention_s`` seconds (at most
    ``max_jobs`` kept). ``jobs_dir`` holds retained output files, one folder per job."""

    def __init__(self, jobs_dir: str | Path, retention_s: float, max_jobs: int) -> None:
        self.dir = Path(jobs_dir)
        self.retention_s = retention_s
        self.max_jobs = max_jobs
        self._jobs: dict[str, JobRecord] = {}
        #: The ended jobs in the order they ended: their expiry times ascend (one retention
        #: for all), so expiry looks at the oldest few, never at every job.
        self._ended: dict[str, JobRecord] = {}
        self._seq = 0
        self._order: dict[str, int] = {}
        #: Used Idempotency-Keys: key -> (job id, monotonic expiry), oldest first.
        self._keys: dict[str, tuple[str, float]] = {}

    def clear_leftovers(self) -> None:
        """Remove what a previous sidecar left in ``jobs_dir`` (the store starts empty).

        Only a directory the store made (it holds the :data:`MARKER` file) or an empty one is
        used; raises ValueError for any other non-empty directory, so a mistyped JOBS_DIR never
        deletes anyone's files, and OSError when it cannot be created.
        """
        marker = self.dir / MARKER
        if self.dir.is_dir() and not marker.exists() and any(self.dir.iterdir()):
            raise ValueError(f"{self.dir} is not empty and is not a comfy-sidecar jobs directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        for child in self.dir.iterdir():
            if child.name == MARKER:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        marker.write_text("comfy-sidecar jobs directory: emptied at every start-up\n")

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[JobRecord]:
        return iter(list(self._jobs.values()))

    def get(self, job_id: str) -> JobRecord:
        """The retained job ``job_id``. Raises :class:`UnknownJob`."""
        self.expire()
        try:
            return self._jobs[job_id]
        except KeyError:
            raise UnknownJob(job_id) from None

    def find(self, job_id: str) -> JobRecord | None:
        """The retained job ``job_id``, or None."""
        return self._jobs.get(job_id)

    def add(self, record: JobRecord) -> tuple[JobRecord, bool]:
        """Store ``record``; returns (the stored record, created).

        An id already retained with the same ``fingerprint`` returns that job (created False);
        with a different fingerprint raises :class:`DifferentBody`.
        """
        self.expire()
        existing = self._jobs.get(record.id)
        if existing is not None:
            if existing.fingerprint != record.fingerprint or not record.fingerprint:
                raise DifferentBody(record.id)
            return existing, False
        self._seq += 1
        self._order[record.id] = self._seq
        self._jobs[record.id] = record
        record.publish("status", {"status": record.status.value})
        return record, True

    def queue_position(self, record: JobRecord) -> int | None:
        """How many pending jobs go before ``record``: those of a higher priority, and the
        older ones of its own (0: it is next); None once it runs or ended."""
        if record.status is not JobStatus.PENDING or self._jobs.get(record.id) is not record:
            return None
        place = (-record.priority, self._order[record.id])
        return sum(
            1
            for other in self._jobs.values()
            if other.status is JobStatus.PENDING
            and (-other.priority, self._order[other.id]) < place
        )

    def view(self, record: JobRecord) -> JobView:
        """``record``'s :class:`~comfy_sidecar.jobs.model.JobView`, with its current queue
        position."""
        record.queue_position = self.queue_position(record)
        return record.view()

    def job_dir(self, job_id: str) -> Path:
        """Where job ``job_id``'s retained output files go (created on demand)."""
        path = self.dir / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    # --- Idempotency-Keys (Comfy API v2) -------------------------------------------------

    def claim_key(
        self, key: str, job_id: str, ttl_s: float, now: float | None = None
    ) -> str | None:
        """Mark ``key`` used by job ``job_id`` for ``ttl_s`` seconds; returns None, or the id
        of the job that used it already (then nothing changes). Keys past their time are
        forgotten as new ones come, so at most the keys of the last ``ttl_s`` are held."""
        now = time.monotonic() if now is None else now
        while self._keys:
            oldest = next(iter(self._keys))
            if self._keys[oldest][1] > now:
                break
            del self._keys[oldest]
        held = self._keys.get(key)
        if held is not None and held[1] > now:
            return held[0]
        self._keys[key] = (job_id, now + ttl_s)
        return None

    def free_key(self, key: str, job_id: str) -> None:
        """Undo :meth:`claim_key` of job ``job_id`` (its submission was refused)."""
        held = self._keys.get(key)
        if held is not None and held[0] == job_id:
            del self._keys[key]

    # --- transitions ----------------------------------------------------------------------

    def set_status(self, record: JobRecord, status: JobStatus) -> None:
        """Move a job that has not ended to ``status`` and publish it."""
        if record.status.terminal or record.status is status:
            return
        record.status = status
        if status is JobStatus.IN_PROGRESS:
            metrics.key_job_started(record.owner)
            if record.started_ms is None:
                record.started_ms = now_ms()
        record.publish("status", {"status": status.value})

    def finish(
        self,
        record: JobRecord,
        status: JobStatus,
        *,
        error: dict[str, Any] | None = None,
        stats: dict[str, Any] | None = None,
    ) -> bool:
        """End a job (once; later calls return False), publish ``done`` with its final body
        and start its retention clock."""
        if record.status.terminal:
            return False
        was_running = record.status is JobStatus.IN_PROGRESS
        record.status = status
        metrics.job_ended(status.value, record.endpoint)
        metrics.key_job_ended(record.owner, status.value, was_running)
        record.completed_ms = now_ms()
        record.error = error
        record.stats = stats
        record.queue_position = None
        if status is JobStatus.COMPLETED and isinstance(record.progress, Progress):
            record.progress.complete()
        record.expires_at = time.monotonic() + self.retention_s
        if self._jobs.get(record.id) is record:  # not a stand-in of a job kept elsewhere
            self._ended[record.id] = record
        record.publish("done", record.view())
        record.seal()
        self._enforce_max()
        return True

    # --- listing and expiry ---------------------------------------------------------------

    def page(
        self,
        status: JobStatus | None,
        limit: int,
        cursor: int | None,
        owner: str | None = None,
        *,
        endpoint: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> tuple[list[JobRecord], int | None]:
        """Newest first: up to ``limit`` jobs (with ``status``, submitted with the API key
        named ``owner``, submitted through ``endpoint`` and carrying every label of
        ``metadata``, when given) older than ``cursor`` (an opaque sequence number from a
        previous page). Returns (jobs, next cursor or None)."""
        self.expire()
        found: list[JobRecord] = []
        for record in reversed(self._jobs.values()):
            seq = self._order[record.id]
            if cursor is not None and seq >= cursor:
                continue
            if status is not None and record.status is not status:
                continue
            if owner is not None and record.owner != owner:
                continue
            if endpoint is not None and record.endpoint != endpoint:
                continue
            if not labels_match(record.metadata, metadata):
                continue
            found.append(record)
            if len(found) > limit:
                break
        more = len(found) > limit
        found = found[:limit]
        return found, (self._order[found[-1].id] if more and found else None)

    def expire(self, now: float | None = None) -> int:
        """Drop ended jobs past their retention; returns how many went. Costs what expires
        (each request of the job APIs calls it), not the number of jobs kept."""
        now = time.monotonic() if now is None else now
        gone: list[JobRecord] = []
        for record in self._ended.values():
            if record.expires_at > now:
                break
            gone.append(record)
        for record in gone:
            self.drop(record)
        return len(gone)

    def _enforce_max(self) -> None:
        """Past ``max_jobs`` ended jobs, drop the oldest submitted of them."""
        excess = len(self._ended) - self.max_jobs
        if excess <= 0:
            return
        oldest: list[JobRecord] = []
        for record in self._jobs.values():
            if record.status.terminal:
                oldest.append(record)
                if len(oldest) == excess:
                    break
        for record in oldest:
            self.drop(record)

    def drop(self, record: JobRecord) -> None:
        """Forget ``record`` and delete its retained files."""
        if record.status is JobStatus.IN_PROGRESS and self._jobs.get(record.id) is record:
            metrics.key_job_ended(record.owner, None, True)  # never ended here: not counted
        if self._jobs.get(record.id) is record:
            self._jobs.pop(record.id)
            self._ended.pop(record.id, None)
            self._order.pop(record.id, None)
        if record.files:
            shutil.rmtree(self.dir / record.id, ignore_errors=True)
            record.files = []

    def close(self) -> None:
        """Forget everything and delete every retained file."""
        for record in list(self._jobs.values()):
            self.drop(record)
