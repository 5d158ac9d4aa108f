"""One job's live record on the replica that runs it (or keeps it, in-process): status,
timestamps, progress, outputs' metadata, the error body, stats, and an append-only log of
events (``status``, ``progress``, ``output``, ``done``; ``preview`` kept out of the log) with
increasing ids, which Server-Sent Events replay from ``Last-Event-ID`` with no gap and no
duplicate. Subscribers wait on one future per record that each append resolves.

A backend may attach a ``sink`` that is given every event as it is appended (the Redis backend
mirrors a running job's events to Redis with it).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import msgspec

from comfy_sidecar.jobs.model import (
    JobEvent,
    JobStatus,
    JobView,
    OutputInfo,
    decode_view,
    iso,
    job_links,
    now_ms,
)
from comfy_sidecar.jobs.progress import EndedProgress, Progress

__all__ = ["JobRecord", "SealedEvents"]

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
    """One job as this replica holds it. Times are ms since the epoch. Once the job ended its
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
    #: Also given every event, live previews included (the Redis backend mirrors a job to
    #: Redis with it).
    sink: Callable[[JobRecord, JobEvent], None] | None = None
    #: The name of the API key that submitted the job (None: no key), and its priority.
    owner: str | None = None
    priority: int = 0
    #: Set by the Redis backend: the replica and the attempts the view carries.
    replica: str | None = None
    attempts: list[dict[str, Any]] | None = None
    _changed: asyncio.Future[None] | None = None
    _live: JobEvent | None = None
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
        """The job has ended, its ``done`` event (its final view) published: keep the event
        log compressed, the progress as its percent, and the stats only in that view
        (:meth:`view` reads it from there); nothing is published after this."""
        if isinstance(self.events, list):
            self.events = SealedEvents(self.events)
        if isinstance(self.progress, Progress):
            self.progress = self.progress.ended()
        self.stats = None
        self._changed = self._live = None

    # --- views ----------------------------------------------------------------------------

    def view(self) -> JobView:
        """The job's :class:`JobView` (without outputs' data); once the job has ended (its log
        sealed), the view its ``done`` event carries, with its links and the time of that
        event."""
        if isinstance(self.events, SealedEvents):
            done = decode_view(self.events[-1].data)
            done.last_event_time = iso(self.last_event_ms)
            done.urls = job_links(self.id)
            return done
        progress = self.progress
        if isinstance(progress, Progress):
            fields = progress.view()
        else:
            fields = {"progress": 100.0 if self.status is JobStatus.COMPLETED else 0.0}
        view = JobView(
            id=self.id,
            status=self.status,
            endpoint=self.endpoint,
            created_at=iso(self.created_ms),
            started_at=iso(self.started_ms),
            completed_at=iso(self.completed_ms),
            prompt_id=self.prompt_id,
            instance=self.instance,
            queue_position=self.queue_position,
            last_event_time=iso(self.last_event_ms),
            urls=job_links(self.id),
            outputs=list(self.outputs),
            error=self.error,
            stats=self.stats,
            **fields,
        )
        if self.owner is not None:
            view.owner = self.owner
        if self.replica is not None:
            view.replica = self.replica
        if self.attempts is not None:
            view.attempts = self.attempts
        return view
