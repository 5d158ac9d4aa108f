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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from comfy_sidecar.jobs.model import (
    JobEvent,
    JobStatus,
    JobView,
    OutputInfo,
    iso,
    job_links,
    now_ms,
)
from comfy_sidecar.jobs.progress import Progress

__all__ = ["JobRecord"]


@dataclass
class JobRecord:
    """One job as this replica holds it. Times are ms since the epoch."""

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
    progress: Progress | None = None
    queue_position: int | None = None
    outputs: list[OutputInfo] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    error: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    events: list[JobEvent] = field(default_factory=list)
    #: Also given every event, live previews included (the Redis backend mirrors a job to
    #: Redis with it).
    sink: Callable[[JobRecord, JobEvent], None] | None = None
    #: Set by the Redis backend: the replica and the attempts the view carries.
    replica: str | None = None
    attempts: list[dict[str, Any]] | None = None
    _changed: asyncio.Future[None] | None = None
    _live: JobEvent | None = None
    expires_at: float = 0.0  # monotonic seconds, set when the job ends

    # --- events ---------------------------------------------------------------------------

    def publish(self, kind: str, body: Any, *, log_it: bool = True) -> JobEvent:
        """Append an event (``log_it`` False: previews, sent live but not replayed) and wake
        every subscriber."""
        event = JobEvent(len(self.events) + 1, kind, msgspec.json.encode(body))
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
                event = self.events[sent]
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

    # --- views ----------------------------------------------------------------------------

    def view(self) -> JobView:
        """The job's :class:`JobView` (without outputs' data)."""
        progress = self.progress
        if progress is not None:
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
        if self.replica is not None:
            view.replica = self.replica
        if self.attempts is not None:
            view.attempts = self.attempts
        return view
