"""The replica's side of the shared queue: claim jobs while an instance slot is free, run them
here, mirror their events and end to Redis, heartbeat their leases, obey cancels.

A job is claimed (:meth:`RedisJobs.claim`) only while the dispatcher has a free slot and no
local job waits for one, and at most as many as the instances hold, so work goes to whichever
replica is free. Each run is one attempt; a job handed out for the ``max_attempts``-th time
more fails, listing them. The run's :class:`JobRecord` (in this replica's store) gets a sink
that copies every logged event to Redis in order, retrying while Redis is away, so nothing a
replica did is lost across a Redis restart; the end is written once (:meth:`RedisJobs.finish`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from redis.exceptions import RedisError

from comfy_sidecar.errors import OutputsTooLarge
from comfy_sidecar.jobs.after import nothing
from comfy_sidecar.jobs.backend import SharedQueue
from comfy_sidecar.jobs.redis_store import Claim
from comfy_sidecar.jobs.runner import error_body
from comfy_sidecar.jobs.store import JobEvent, JobRecord, JobStatus, iso, now_ms

if TYPE_CHECKING:
    from comfy_sidecar.dispatch import Dispatcher
    from comfy_sidecar.pipeline.deliver import Delivery
    from comfy_sidecar.pipeline.run import JobResult

log = logging.getLogger("comfy_sidecar.jobs.worker")

T = TypeVar("T")

#: Seconds between retries of a Redis write while Redis is unreachable.
RETRY_S = 0.5


class QueueWorker:
    """Claims, runs and reports the shared queue's jobs on this replica."""

    def __init__(
        self,
        jobs: SharedQueue,
        delivery: Delivery,
        dispatcher: Dispatcher,
        spawn: Callable[[Awaitable[Any]], Any],
        inline_mb: float,
        spill_to: Callable[[str], Any] | None = None,
        after_end: Callable[[str, dict[str, Any]], Awaitable[None]] = nothing,
    ) -> None:
        self.jobs = jobs
        self.delivery = delivery
        self.dispatcher = dispatcher
        self.spawn = spawn
        self.inline_mb = inline_mb  # JOB_INLINE_OUTPUT_MB
        self.inline_bytes = int(inline_mb * 1024 * 1024)
        #: ``spill_to(job_id)``: the upload block under JOB_OUTPUT_URL for that job, if set.
        self.spill_to = spill_to
        #: ``after_end(job_id, view)``: the adapter's webhook of a job this replica ended
        #: (:class:`~comfy_sidecar.jobs.after.AfterEnds`).
        self.after_end = after_end
        self.held: dict[str, Claim] = {}  # entry id -> claim
        self.running: set[str] = set()  # job ids
        self.releasing: set[str] = set()  # job ids given back unstarted at SIGTERM
        self._lost: set[str] = set()  # held entries whose lease another replica took
        self.stopping = False
        self.problem: str | None = None  # why Redis cannot be used now
        self._idle = asyncio.Event()  # set while no claim is held
        self._idle.set()

    # --- loops ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Claim jobs until :meth:`stop`; never raises (Redis errors are retried)."""
        self.spawn(self._heartbeat())
        self.spawn(self._cancels())
        grouped = False
        while not self.stopping:
            if not self._room():
                await asyncio.sleep(0.05)
                continue
            try:
                if not grouped:
                    await self.jobs.ensure_group()
                    grouped = True
                claim = await self.jobs.claim(1.0)
                self.problem = None
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(RETRY_S)
                continue
            if claim is not None:
                if self.stopping:
                    await self._retry(functools.partial(self.jobs.release, claim.entry))
                    return
                self.held[claim.entry] = claim
                self._idle.clear()
                self.spawn(self._attempt(claim))

    async def stop(self) -> None:
        """Claim nothing more (SIGTERM). Jobs already executing go on; those claimed but not
        started (preprocessing, waiting for a slot, or still in ComfyUI's queue) are
        interrupted here and given back to the stream at once (:meth:`SharedQueue.release`),
        so another replica takes them without waiting for the lease. A job that starts
        executing in the instant between the check and the interrupt is interrupted and runs
        again elsewhere (at least once)."""
        self.stopping = True
        pipeline = self.delivery.pipeline
        for claim in list(self.held.values()):
            if claim.job_id in self.running and pipeline.unstarted(claim.job_id):
                self.releasing.add(claim.job_id)
                await pipeline.interrupt(claim.job_id)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds until no claimed job is left (its end written to
        Redis and its entry acknowledged); True when none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return not self.held

    def _room(self) -> bool:
        capacity = self.dispatcher.per_instance * sum(
            1 for instance in self.dispatcher.instances if instance.accepting
        )
        return (
            self.dispatcher.free_slots() > 0
            and not self.dispatcher.waiting
            and len(self.held) < capacity
        )

    def _down(self, exc: BaseException) -> None:
        if self.problem is None:
            log.warning("the job queue (Redis) is unreachable: %s", exc)
        self.problem = f"the job queue (Redis) is unreachable: {exc}"

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` until Redis answers."""
        while True:
            try:
                result = await call()
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(RETRY_S)
                continue
            self.problem = None
            return result

    async def _heartbeat(self) -> None:
        interval = max(0.1, self.jobs.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                lost = await self.jobs.heartbeat(list(self.held))
            except (RedisError, OSError) as exc:
                self._down(exc)
                continue
            for entry in lost:
                claim = self.held.get(entry)
                if claim is not None and entry not in self._lost:
                    self._lost.add(entry)
                    log.warning(
                        "job %s: lease lost (another replica took it over); this run goes on "
                        "but ends the job only if it finishes first",
                        claim.job_id,
                    )
            self._lost &= set(self.held)

    async def _cancels(self) -> None:
        while True:
            try:
                async for job_id in self.jobs.cancels():
                    if job_id in self.running:
                        await self.delivery.pipeline.interrupt(job_id)
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(RETRY_S)

    # --- one attempt ----------------------------------------------------------------------

    async def _attempt(self, claim: Claim) -> None:
        try:
            ended = await self._run_claimed(claim)
            if ended:
                await self._retry(lambda: self.jobs.ack(claim.entry))
            else:  # given back unstarted (SIGTERM): no heartbeat may renew it from here on
                self.held.pop(claim.entry, None)
                await self._retry(lambda: self.jobs.release(claim.entry, claim.job_id))
                log.info("job %s: given back to the queue unstarted", claim.job_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: queue attempt failed", claim.job_id)
        finally:
            self.held.pop(claim.entry, None)
            self.releasing.discard(claim.job_id)
            if not self.held:
                self._idle.set()

    async def _run_claimed(self, claim: Claim) -> bool:
        """Run ``claim``'s job here; False when it was given back unstarted instead."""
        from comfy_sidecar.schemas import PromptRequest

        job_id = claim.job_id
        jobs = self.jobs
        ended, raw, attempts, stored = await self._retry(lambda: jobs.load(job_id))
        if ended or raw is None:
            return True
        request = msgspec.json.decode(raw, type=PromptRequest)
        if len(attempts) >= jobs.max_attempts:
            await self._give_up(request, job_id, attempts)
            return True
        if self.stopping:
            return False
        attempts = await self._retry(lambda: jobs.begin_attempt(job_id))
        token = f"{jobs.replica}:{claim.entry}:{uuid.uuid4().hex[:8]}"
        stored = stored or {}
        mirror = Mirror(self, job_id, attempts, _ms(stored.get("created_at")))

        async def gate() -> bool:
            """May this attempt end the job? Not when it is being given back, nor when
            another attempt (a take-over, a cancel) ended it first."""
            won = job_id not in self.releasing and await self._retry(
                lambda: jobs.take_end(job_id, token)
            )
            mirror.lost = not won
            return won

        self.running.add(job_id)
        try:
            record = await self.delivery.run_claimed(
                request, stored.get("endpoint") or "jobs", mirror.bind, gate, self._spill
            )
        except Exception as exc:  # refused before it ran: the caller's mistake, reported
            if job_id in self.releasing:  # interrupted while it downloaded its inputs
                return False
            view = await self._retry(lambda: jobs.get(job_id)) or {"id": job_id}
            view.update(
                status=JobStatus.FAILED.value,
                completed_at=iso(now_ms()),
                error=error_body(exc, job_id),
                attempts=attempts,
            )
            if await self._retry(lambda: jobs.finish(job_id, view, [], token)):
                await self.delivery.send_failure(request, view["error"])
                await self.after_end(job_id, view)
            return True
        finally:
            self.running.discard(job_id)
        await mirror.drained()
        if job_id in self.releasing:
            self.delivery.store.drop(record)
            return False
        if mirror.lost:
            log.warning("job %s: ended by another replica first; this run is discarded", job_id)
            self.delivery.store.drop(record)
            return True
        await self._finish(record, attempts, token)
        return True

    async def _give_up(self, request: Any, job_id: str, attempts: list[dict[str, Any]]) -> None:
        """Fail job ``job_id`` (``request``: its PromptRequest) after JOB_MAX_ATTEMPTS runs,
        listing them, and send its failure webhook (once: only if this ends it)."""
        view = await self._retry(lambda: self.jobs.get(job_id)) or {"id": job_id}
        error = {
            "error": f"the job was taken over {len(attempts)} time(s) without ending "
            f"(JOB_MAX_ATTEMPTS={self.jobs.max_attempts})",
            "id": job_id,
            "attempts": attempts,
        }
        view.update(
            status=JobStatus.FAILED.value,
            completed_at=iso(now_ms()),
            error=error,
            attempts=attempts,
        )
        if await self._retry(lambda: self.jobs.finish(job_id, view, [])):
            await self.delivery.send_failure(request, error)
            await self.after_end(job_id, view)

    def _spill(self, result: JobResult) -> tuple[str, Any] | None:
        """Where outputs of a job that names no upload target go when they exceed
        JOB_INLINE_OUTPUT_MB (see :data:`~comfy_sidecar.pipeline.deliver.Spill`): under
        ``JOB_OUTPUT_URL/<job id>/``, or nowhere: :class:`OutputsTooLarge`."""
        size = sum(item.size for item in result.files)
        if size <= self.inline_bytes:
            return None
        if self.spill_to is None:
            raise OutputsTooLarge(
                f"the job's outputs ({size} bytes) exceed JOB_INLINE_OUTPUT_MB "
                f"({self.inline_mb:g} MB), the job names no upload target, and JOB_OUTPUT_URL "
                "is not set: set "
                "JOB_OUTPUT_URL, raise JOB_INLINE_OUTPUT_MB, or give the job an upload target",
                id=result.job.id,
                size_bytes=size,
            )
        return "JOB_OUTPUT_URL", self.spill_to(result.job.id)

    async def _finish(self, record: JobRecord, attempts: list[dict[str, Any]], token: str) -> None:
        """Write the end of ``record`` to Redis (its retained files inline: larger ones were
        uploaded, see :meth:`_spill`), then forget it here."""
        view = self.view(record, attempts)
        outputs = [await asyncio.to_thread(path.read_bytes) for path in record.files]
        if not await self._retry(lambda: self.jobs.finish(record.id, view, outputs, token)):
            log.warning("job %s: ended by another replica first; this run is discarded", record.id)
        else:
            await self.after_end(record.id, view)
        self.delivery.store.drop(record)

    def view(self, record: JobRecord, attempts: list[dict[str, Any]]) -> dict[str, Any]:
        """``record``'s body as Redis keeps it: with ``replica`` and ``attempts``."""
        body = record.view()
        body["replica"] = self.jobs.replica
        body["attempts"] = attempts
        return body


def _ms(when: Any) -> int | None:
    """An ISO 8601 time of a job body as ms since the epoch (None if absent or unreadable)."""
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(when)).timestamp() * 1000) if when else None
    except ValueError:
        return None


class Mirror:
    """Copies one running job's logged events to Redis, in order, retrying while Redis is
    away. The ``done`` event is left to :meth:`QueueWorker._finish` (written once)."""

    def __init__(
        self,
        worker: QueueWorker,
        job_id: str,
        attempts: list[dict[str, Any]],
        created_ms: int | None = None,
    ) -> None:
        self.worker = worker
        self.job_id = job_id
        self.attempts = attempts
        self.created_ms = created_ms  # when it was submitted (ms since the epoch)
        self.queue: asyncio.Queue[tuple[JobRecord, JobEvent] | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        #: Set when this attempt may not end the job: nothing more is written.
        self.lost = False

    def bind(self, record: JobRecord) -> None:
        """Start mirroring ``record`` (its sink is set; its current status is written). Its
        ``created_at`` stays the submission's, not this claim's."""
        if self.created_ms is not None:
            record.created_ms = self.created_ms
        record.sink = self.push
        self.task = asyncio.ensure_future(self._write())
        self.push(record, JobEvent(0, "status", msgspec.json.encode({"status": "pending"})))

    def push(self, record: JobRecord, event: JobEvent) -> None:
        """One event of the job (from :meth:`JobRecord.publish`). A ``preview`` is sent live
        to followers on every replica (best effort: never retried, never kept)."""
        if self.lost or event.type == "done":
            return
        if event.type == "preview":
            self.worker.spawn(self._preview(event.data))
        else:
            self.queue.put_nowait((record, event))

    async def _preview(self, data: bytes) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.worker.jobs.preview(self.job_id, data)

    async def drained(self) -> None:
        """Wait until every event pushed so far is in Redis."""
        self.queue.put_nowait(None)
        if self.task is not None:
            await self.task

    async def _write(self) -> None:
        """Write the queued events, coalesced: every event queued while the previous write
        was under way goes in one round trip (:meth:`SharedQueue.emit`: in order, then the
        job's body as it is now)."""
        jobs = self.worker.jobs
        ending = False
        while not ending:
            batch: list[tuple[JobRecord, JobEvent]] = []
            item = await self.queue.get()
            while True:
                if item is None:
                    ending = True
                    break
                batch.append(item)
                if self.queue.empty():
                    break
                item = self.queue.get_nowait()
            if not batch or self.lost:
                continue
            events = [(e.type, msgspec.Raw(e.data)) for _, e in batch if e.id]
            view = self.worker.view(batch[-1][0], self.attempts)
            await self.worker._retry(functools.partial(jobs.emit, self.job_id, events, view))
