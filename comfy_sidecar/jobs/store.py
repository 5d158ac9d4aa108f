"""The job store: every job from submission to expiry, with its event log for status and SSE.

One :class:`JobRecord` per job, whatever submitted it (``/prompt``, ``/jobs``, a workflow
endpoint, an adapter, the warmup). The record holds what ``GET /jobs/{id}`` shows — status,
timestamps, progress, outputs' metadata, the error body, stats — and an append-only log of
events (``status``, ``progress``, ``output``, ``done``; ``preview`` kept out of the log) with
increasing ids, which Server-Sent Events replay from ``Last-Event-ID`` with no gap and no
duplicate. Subscribers wait on one future per record that each append resolves.

Ended jobs are kept ``retention_s`` seconds, at most ``max_jobs`` of them; their output files
live under ``jobs_dir/<id>/`` and are deleted with the record. The store is in memory: a
restarted sidecar starts empty (and clears ``jobs_dir``).

Status names are those of ComfyUI's own ``/api/jobs``: pending, in_progress, completed,
failed, cancelled, timed_out.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import shutil
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

import msgspec

from comfy_sidecar import metrics
from comfy_sidecar.jobs.progress import EndedProgress, Progress

log = logging.getLogger("comfy_sidecar.jobs")


#: The file that marks a directory as the store's own (so start-up may empty it).
MARKER = ".comfy-sidecar-jobs"


class JobStatus(enum.StrEnum):
    """Where a job is (ComfyUI ``/api/jobs`` names). The last four are terminal."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        """True once the job has ended."""
        return self not in (JobStatus.PENDING, JobStatus.IN_PROGRESS)


def iso(ms: int | None) -> str | None:
    """``ms`` since the epoch as an ISO 8601 UTC timestamp with milliseconds, or None."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def now_ms() -> int:
    """Milliseconds since the epoch."""
    return int(time.time() * 1000)


class OutputInfo(msgspec.Struct, kw_only=True):
    """One output file of a job. ``url`` is the upload URL, or ``/jobs/{id}/outputs/{n}`` for a
    retained file, or None when the file was answered inline (``/prompt``) and is gone."""

    node_id: str
    filename: str
    media_type: str
    mime_type: str
    size_bytes: int
    url: str | None


@dataclass(slots=True)
class JobEvent:
    """One entry of a job's event log: ``id`` increases by one per event of the job;
    ``data`` is the JSON text of the event's body."""

    id: int
    type: str
    data: bytes


#: zlib's preset dictionary for sealed logs: the keys and common values of the events'
#: bodies, so even a short log compresses (to about half of what it takes without).
SEAL_DICTIONARY = (
    b'status {"status":"pending"}\nstatus {"status":"in_progress"}\nprogress {"progress":0.0,'
    b'"progress_value":0.0,"progress_max":0.0,"nodes_total":0,"nodes_done":0,"nodes_cached":0,'
    b'"current_node":null,"current_node_type":null}\noutput {"node_id":"","filename":"",'
    b'"media_type":"image","mime_type":"image/png","size_bytes":0,"url":null}\ndone {"id":"",'
    b'"status":"completed","endpoint":"prompt","created_at":"","started_at":"","completed_at":'
    b'"","prompt_id":"","instance":"0","queue_position":null,"last_event_time":"","progress":'
    b'100.0,"progress_value":0.0,"progress_max":0.0,"nodes_total":0,"nodes_done":0,'
    b'"nodes_cached":0,"current_node":null,"current_node_type":null,"urls":{"self":"/jobs/",'
    b'"events":"/jobs//events","cancel":"/jobs//cancel"},"outputs":[],"error":null,"stats":'
    b'{"comfy_execution":{"start":,"end":,"duration":,"nodes":{}},"preprocess_time":0,'
    b'"comfy_round_trip_time":0,"postprocess_time":0,"upload_time":0,"total_time":0}}'
)


class SealedEvents(Sequence[JobEvent]):
    """An ended job's event log, compressed: one zlib blob of ``<type> <JSON>`` lines (the
    JSON of an event is one line). Read like the list it replaces (``len``, an index, a
    slice); each read decompresses the blob, so a replay takes one slice. A retained job's
    log is mostly repeated keys: the 11 events of a small job take about 0.6 KB instead of
    4 KB, and JOB_RETENTION_MAX (1,000) ended jobs stay in memory (bench/rss_bench.py)."""

    __slots__ = ("_blob", "_count")

    def __init__(self, events: Sequence[JobEvent]) -> None:
        # Logged events are numbered 1, 2, ... (JobRecord.publish): the position is the id.
        self._count = len(events)
        packer = zlib.compressobj(zdict=SEAL_DICTIONARY)
        lines = b"\n".join(e.type.encode() + b" " + e.data for e in events)
        self._blob = packer.compress(lines) + packer.flush()

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> JobEvent: ...
    @overload
    def __getitem__(self, index: slice) -> list[JobEvent]: ...
    def __getitem__(self, index: int | slice) -> JobEvent | list[JobEvent]:
        lines = zlib.decompressobj(zdict=SEAL_DICTIONARY).decompress(self._blob).split(b"\n")
        events = [
            JobEvent(n, kind.decode(), data)
            for n, (kind, _, data) in enumerate((line.partition(b" ") for line in lines), 1)
        ]
        return events[index]


@dataclass(slots=True)
class JobRecord:
    """One job as the store holds it. Times are ms since the epoch. Once the job ended its
    event log is a :class:`SealedEvents` and its progress an
    :class:`~comfy_sidecar.jobs.progress.EndedProgress` (:meth:`seal`)."""

    id: str
    endpoint: str
    fingerprint: bytes = b""
    status: JobStatus = JobStatus.PENDING
    created_ms: int = field(default_factory=now_ms)
    started_ms: int | None = None
    completed_ms: int | None = None
    last_event_ms: int | None = None
    prompt_id: str | None = None
    instance: str | None = None
    progress: Progress | EndedProgress | None = None
    queue_position: int | None = None
    outputs: list[OutputInfo] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    error: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    events: list[JobEvent] | SealedEvents = field(default_factory=list)
    retain_outputs: bool = True
    #: Also given every event, live previews included (the shared queue mirrors a job to
    #: Redis with it).
    sink: Callable[[JobRecord, JobEvent], None] | None = None
    _changed: asyncio.Future[None] | None = None
    expires_at: float = 0.0  # monotonic seconds, set when the job ends

    # --- events ---------------------------------------------------------------------------

    def publish(self, kind: str, body: Any, *, log_it: bool = True) -> JobEvent:
        """Append an event (``log_it`` False: previews, sent live but not replayed) and wake
        every subscriber. Once the job has ended (its log sealed after ``done``) nothing is
        published: no subscriber reads past ``done``."""
        event = JobEvent(len(self.events) + 1, kind, msgspec.json.encode(body))
        if not isinstance(self.events, list):
            return event
        if log_it:
            self.events.append(event)
        if self.sink is not None:  # previews too: the sink tells them apart by type
            self.sink(self, event)
        self.last_event_ms = now_ms()
        self._wake(event if not log_it else None)
        return event

    _live: JobEvent | None = None

    def _wake(self, live: JobEvent | None) -> None:
        self._live = live
        changed = self._changed
        self._changed = None
        if changed is not None and not changed.done():
            changed.set_result(None)

    def changed(self) -> asyncio.Future[None]:
        """A future that resolves at the next event."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    async def wait_ended(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for the job to end; True when it has."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.status.terminal:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(asyncio.shield(self.changed()), remaining)
            except TimeoutError:
                return False
        return True

    async def follow(
        self, after: int = 0, heartbeat_s: float = 15.0, previews: bool = False
    ) -> AsyncIterator[JobEvent | None]:
        """Events with ids above ``after``, as they come; None every ``heartbeat_s`` seconds
        of silence. Ends after the ``done`` event."""
        sent = after
        while True:
            while sent < len(self.events):
                for event in self.events[sent:]:  # one read of a sealed log, not one per event
                    sent += 1
                    yield event
                    if event.type == "done":
                        return
            if self.status.terminal and sent >= len(self.events):
                return
            waiter = self.changed()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), heartbeat_s)
            except TimeoutError:
                yield None
                continue
            live = self._live
            if previews and live is not None:
                yield live

    def seal(self) -> None:
        """The job has ended, its ``done`` event (its final body) published: keep the event
        log compressed, the progress as its last view, and the stats only in that body
        (:meth:`view` reads it from there); nothing is published after this."""
        if isinstance(self.events, list):
            self.events = SealedEvents(self.events)
        if isinstance(self.progress, Progress):
            self.progress = self.progress.ended()
        self.stats = None
        self._changed = self._live = None

    # --- views ----------------------------------------------------------------------------

    def view(self, base_url: str = "") -> dict[str, Any]:
        """The ``GET /jobs/{id}`` body (without outputs' data); once the job has ended (its
        log sealed), the body its ``done`` event carries, with the links for ``base_url``
        and the time of that event."""
        if isinstance(self.events, SealedEvents):
            done: dict[str, Any] = msgspec.json.decode(self.events[-1].data)
            done["last_event_time"] = iso(self.last_event_ms)
            done["urls"] = urls(self.id, base_url)
            return done
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.status.value,
            "endpoint": self.endpoint,
            "created_at": iso(self.created_ms),
            "started_at": iso(self.started_ms),
            "completed_at": iso(self.completed_ms),
            "prompt_id": self.prompt_id,
            "instance": self.instance,
            "queue_position": self.queue_position,
            "last_event_time": iso(self.last_event_ms),
        }
        body.update(
            self.progress.view()
            if isinstance(self.progress, Progress)  # an EndedProgress is read from done
            else {
                "progress": 100.0 if self.status is JobStatus.COMPLETED else 0.0,
                "progress_value": 0.0,
                "progress_max": 0.0,
                "nodes_total": 0,
                "nodes_done": 0,
                "nodes_cached": 0,
                "current_node": None,
                "current_node_type": None,
            }
        )
        body["urls"] = urls(self.id, base_url)
        body["outputs"] = [msgspec.to_builtins(o) for o in self.outputs]
        body["error"] = self.error
        body["stats"] = self.stats
        return body

    def summary(self, base_url: str = "") -> dict[str, Any]:
        """A listing entry: the view without outputs, error details or stats."""
        body = self.view(base_url)
        for key in ("outputs", "stats"):
            body.pop(key)
        if self.error is not None:
            body["error"] = {"error": self.error.get("error")}
        return body


def urls(job_id: str, base_url: str = "") -> dict[str, str]:
    """``{self, events, cancel}`` links of a job."""
    root = f"{base_url}/jobs/{job_id}"
    return {"self": root, "events": f"{root}/events", "cancel": f"{root}/cancel"}


class UnknownJob(LookupError):
    """No job with this id is retained."""


class DifferentBody(Exception):
    """A job with this id exists with a different request body."""


class JobStore:
    """Jobs by id, newest last; ended jobs expire after ``retention_s`` seconds (at most
    ``max_jobs`` kept). ``jobs_dir`` holds retained output files, one folder per job."""

    def __init__(self, jobs_dir: str | Path, retention_s: float, max_jobs: int) -> None:
        self.dir = Path(jobs_dir)
        self.retention_s = retention_s
        self.max_jobs = max_jobs
        self._jobs: dict[str, JobRecord] = {}
        self._seq = 0
        self._order: dict[str, int] = {}

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
        """0 for the oldest pending job, 1 for the next, …; None once it runs or ended."""
        if record.status is not JobStatus.PENDING:
            return None
        position = 0
        for other in self._jobs.values():
            if other is record:
                return position
            if other.status is JobStatus.PENDING:
                position += 1
        return None

    def view(self, record: JobRecord) -> dict[str, Any]:
        """``record``'s ``GET /jobs/{id}`` body, with its current queue position."""
        record.queue_position = self.queue_position(record)
        return record.view()

    def job_dir(self, job_id: str) -> Path:
        """Where job ``job_id``'s retained output files go (created on demand)."""
        path = self.dir / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    # --- transitions ----------------------------------------------------------------------

    def set_status(self, record: JobRecord, status: JobStatus) -> None:
        """Move a job that has not ended to ``status`` and publish it."""
        if record.status.terminal or record.status is status:
            return
        record.status = status
        if status is JobStatus.IN_PROGRESS and record.started_ms is None:
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
        record.status = status
        metrics.job_ended(status.value, record.endpoint)
        record.completed_ms = now_ms()
        record.error = error
        record.stats = stats
        record.queue_position = None
        if status is JobStatus.COMPLETED and isinstance(record.progress, Progress):
            record.progress.complete()
        record.expires_at = time.monotonic() + self.retention_s
        record.publish("done", record.view())
        record.seal()
        self._enforce_max()
        return True

    # --- listing and expiry ---------------------------------------------------------------

    def page(
        self, status: JobStatus | None, limit: int, cursor: int | None
    ) -> tuple[list[JobRecord], int | None]:
        """Newest first: up to ``limit`` jobs (with ``status``, when given) older than
        ``cursor`` (an opaque sequence number from a previous page). Returns (jobs, next
        cursor or None)."""
        self.expire()
        found: list[JobRecord] = []
        for record in reversed(self._jobs.values()):
            seq = self._order[record.id]
            if cursor is not None and seq >= cursor:
                continue
            if status is not None and record.status is not status:
                continue
            found.append(record)
            if len(found) > limit:
                break
        more = len(found) > limit
        found = found[:limit]
        return found, (self._order[found[-1].id] if more and found else None)

    def expire(self, now: float | None = None) -> int:
        """Drop ended jobs past their retention; returns how many went."""
        now = time.monotonic() if now is None else now
        gone = [r for r in self._jobs.values() if r.status.terminal and r.expires_at <= now]
        for record in gone:
            self.drop(record)
        return len(gone)

    def _enforce_max(self) -> None:
        ended = [r for r in self._jobs.values() if r.status.terminal]
        for record in ended[: max(0, len(ended) - self.max_jobs)]:
            self.drop(record)

    def drop(self, record: JobRecord) -> None:
        """Forget ``record`` and delete its retained files."""
        self._jobs.pop(record.id, None)
        self._order.pop(record.id, None)
        if record.files:
            shutil.rmtree(self.dir / record.id, ignore_errors=True)
            record.files = []

    def close(self) -> None:
        """Forget everything and delete every retained file."""
        for record in list(self._jobs.values()):
            self.drop(record)
