"""The Redis job backend (``JOB_QUEUE_URL``): jobs, their events and their queue kept in Redis
(:class:`~comfy_sidecar.jobs.redis.store.RedisJobs`) for every replica.

Any replica takes a submission (checked without side effects: nothing is downloaded, written
or asked of ComfyUI; :meth:`~comfy_sidecar.pipeline.run.Pipeline.check`) and answers for any
job. Each replica claims jobs (:meth:`RedisJobs.claim`) only while its dispatcher has a free
slot and no local job waits for one, at most as many as its instances hold, so work goes to
whichever replica is free; it runs them through the job lifecycle with a :class:`_Run`
attempt that mirrors the run's events to Redis in order (retrying while Redis is away, so
nothing a replica did is lost across a Redis restart), spills large outputs to the upload
target or JOB_OUTPUT_URL, and writes the end once (:meth:`RedisJobs.take_end`: the first
attempt to end a job wins, a later one's outcome is discarded). Each run is one attempt; a
job handed out for the ``max_attempts``-th time more fails, listing them. Leases are renewed
by a heartbeat; a cancel reaches the replica running the job through pub/sub.

Every method that a route calls raises :class:`~comfy_sidecar.errors.Unavailable` (503,
``Retry-After``) while Redis cannot be reached: nothing is accepted that Redis did not store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from redis.exceptions import RedisError

from comfy_sidecar.config.keys import KeyPolicy
from comfy_sidecar.errors import Conflict, Interrupted, OutputsTooLarge, Unavailable
from comfy_sidecar.jobs.backend import Spawn
from comfy_sidecar.jobs.lifecycle import JobLifecycle
from comfy_sidecar.jobs.model import (
    DifferentBody,
    JobEvent,
    JobStatus,
    JobView,
    iso,
    job_links,
    ms_of,
    now_ms,
)
from comfy_sidecar.jobs.record import JobRecord
from comfy_sidecar.jobs.redis.quotas import RedisQuotas
from comfy_sidecar.jobs.redis.store import Claim, Loaded, RedisJobs, RedisOutput
from comfy_sidecar.jobs.spec import AfterEnd, JobSpec
from comfy_sidecar.observability import tracing
from comfy_sidecar.observability.logs import TRACEPARENT
from comfy_sidecar.pipeline.run import JobResult
from comfy_sidecar.schemas import PromptRequest

log = logging.getLogger("comfy_sidecar.jobs.worker")

__all__ = ["RedisBackend"]

T = TypeVar("T")

#: Seconds between retries of a Redis write while Redis is unreachable.
RETRY_S = 0.5

Check = Callable[[PromptRequest], Awaitable[None]]
"""``check(request)``: refuse a submission with the 4xx a caller's mistake gets, with no side
effect (:meth:`~comfy_sidecar.pipeline.run.Pipeline.check`)."""


def _unreachable(exc: BaseException) -> Unavailable:
    return Unavailable(f"the job queue (Redis) is unreachable: {exc}")


async def guarded(call: Awaitable[T]) -> T:
    """``await call``, a Redis failure raised as :class:`Unavailable`."""
    try:
        return await call
    except (RedisError, OSError) as exc:
        raise _unreachable(exc) from None


class Slots:
    """What the backend needs of the dispatcher: free slots, waiting jobs, and word when a slot
    comes free (``dispatcher.freed``)."""

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher

    def when_freed(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a slot comes free."""
        self.dispatcher.freed.append(listener)

    def room(self, held: int) -> bool:
        """True when this replica may claim one more job while holding ``held``."""
        dispatcher = self.dispatcher
        capacity = dispatcher.per_instance * sum(
            1 for instance in dispatcher.instances if instance.accepting
        )
        return dispatcher.free_slots() > 0 and not dispatcher.waiting and held < capacity


class RedisBackend:
    """The job API over Redis (a :class:`~comfy_sidecar.jobs.backend.JobBackend`); see the
    module docstring. ``check`` refuses a bad submission, ``slots`` says when to claim,
    ``inline_mb`` is JOB_INLINE_OUTPUT_MB and ``spill_to(job_id)`` the upload block under
    JOB_OUTPUT_URL (None when it is not set); ``quotas`` (the lifecycle's, in Redis) has the
    places of the jobs running here renewed with the lease heartbeat."""

    def __init__(
        self,
        jobs: RedisJobs,
        lifecycle: JobLifecycle,
        slots: Slots,
        check: Check,
        *,
        inline_mb: float,
        spill_to: Callable[[str], Any] | None = None,
        quotas: RedisQuotas | None = None,
    ) -> None:
        self.jobs = jobs
        self.quotas = quotas
        self.lifecycle = lifecycle
        self.slots = slots
        self.check = check
        self.inline_mb = inline_mb
        self.inline_bytes = int(inline_mb * 1024 * 1024)
        self.spill_to = spill_to
        self.held: dict[str, Claim] = {}  # claim name (stream and entry) -> claim
        self.running: set[str] = set()  # job ids
        self.releasing: set[str] = set()  # job ids given back unstarted at SIGTERM
        self._lost: set[str] = set()  # held entries whose lease another replica took
        self.stopping = False
        self._problem: str | None = None  # why Redis cannot be used now
        self._idle = asyncio.Event()  # set while no claim is held
        self._idle.set()
        self._room = asyncio.Event()
        self._work = asyncio.Event()  # a job was submitted or given back somewhere
        self._spawn: Spawn = asyncio.ensure_future
        slots.when_freed(self.poke)

    # --- the job API ----------------------------------------------------------------------

    @property
    def problem(self) -> str | None:
        """Why Redis cannot be used now (``/ready``'s detail), or None."""
        return self._problem

    async def submit(self, spec: JobSpec) -> JobView:
        """Check the job without side effects (unless its id is kept: a resubmission or a
        409), admit it under its API key's quotas (counted in Redis, released by whichever
        replica ends it), store it and append it to the work stream of its priority. Raises
        :class:`Conflict` for a kept id with another body.

        Traced as ``job.submit`` (PRODUCER, continuing the request's ``traceparent``), whose
        context is stored with the job: the replica that claims it continues this trace."""
        root = tracing.job_span(
            "job.submit",
            TRACEPARENT.get(),
            {"job.endpoint": spec.endpoint, "job.id": spec.id},
            kind="producer",
        )
        with root:
            carried = root.traceparent or TRACEPARENT.get()
            return await self._submit(msgspec.structs.replace(spec, traceparent=carried))

    async def _submit(self, spec: JobSpec) -> JobView:
        await self.lifecycle.check_after(spec)
        admission = None
        if await guarded(self.jobs.get(spec.id)) is None:
            admission = await self.lifecycle.admit(spec.request, key=spec.key, runs_here=False)
            try:
                await self.check(spec.request)
            except BaseException:
                self.lifecycle.undo(admission)
                raise
        view = JobView(
            id=spec.id,
            status=JobStatus.PENDING,
            endpoint=spec.endpoint,
            created_at=iso(now_ms()),
            urls=job_links(spec.id),
            attempts=[],
        )
        if spec.metadata is not None:
            view.metadata = spec.metadata
        if spec.owner is not None:
            view.owner = spec.owner
        after = None if spec.after is None else msgspec.json.encode(spec.after)
        key = None if spec.key is None else msgspec.json.encode(spec.key)
        created = False
        try:
            stored, created = await guarded(
                self.jobs.enqueue(
                    view,
                    msgspec.json.encode(spec.request),
                    spec.fingerprint,
                    after,
                    key,
                    spec.priority,
                    idempotency=spec.idempotency_key,
                    partner=spec.partner_key,
                    trace=spec.traceparent,
                )
            )
        except DifferentBody:
            raise Conflict(
                f"a job with id {spec.id!r} exists with a different body",
                location="id",
                id=spec.id,
            ) from None
        finally:
            if admission is not None and not created:  # refused, or kept already
                self.lifecycle.undo(admission)
        return stored

    async def get(self, job_id: str) -> JobView | None:
        """The job's view; a pending one carries its ``queue_position`` in the shared stream
        (0: next to be claimed; None once claimed)."""
        view = await guarded(self.jobs.get(job_id))
        if view is not None and view.status is JobStatus.PENDING:
            view.queue_position = await guarded(self.jobs.position(job_id))
        return view

    async def wait(self, job_id: str, wait_s: float) -> JobView | None:
        """Waits on the job's event stream (a blocking read) for its ``done``, then reads the
        view once: no polling."""
        view = await self.get(job_id)
        if view is None or view.ended or wait_s <= 0:
            return view
        events = self.jobs.follow(job_id, 0, heartbeat_s=wait_s)
        try:
            async with asyncio.timeout(wait_s):
                async for event in events:
                    if event is not None and event.type == "done":
                        break
        except TimeoutError:
            pass
        except (RedisError, OSError) as exc:
            raise _unreachable(exc) from None
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        return await self.get(job_id)

    def follow(
        self, job_id: str, after: int, heartbeat_s: float, previews: bool = False
    ) -> AsyncIterator[JobEvent | None]:
        """The job's event stream in Redis, from any replica; previews by pub/sub."""
        return self.jobs.follow(job_id, after, heartbeat_s, previews)

    async def last_event_id(self, job_id: str) -> int:
        """The job hash's ``seq`` (the id of its last event in Redis)."""
        return await guarded(self.jobs.last_event_id(job_id))

    async def cancel(self, job_id: str) -> tuple[bool, JobView] | None:
        """A pending job ends ``cancelled`` at once, through the lifecycle's failure routine
        (its failure webhook and adapter webhook sent from here); a running one is
        interrupted by the replica running it (which sends them)."""
        view = await self.get(job_id)
        if view is None:
            return None
        if view.ended:
            return False, view
        if view.status is JobStatus.PENDING:
            error = Interrupted("the job was cancelled before it ran", id=job_id)
            loaded = await guarded(self.jobs.load(job_id))
            spec = _spec_of(loaded, view.endpoint)
            attempt = _End(self, job_id, cancel=True)
            record = _record_of(view)
            await self.lifecycle.end_failed(spec, record, error, attempt)
            if attempt.won:
                return True, await self.get(job_id) or view
        await guarded(self.jobs.request_cancel(job_id))
        final = await self.wait(job_id, 10.0) or view
        return final.status is JobStatus.CANCELLED, final

    async def page(
        self,
        status: JobStatus | None,
        limit: int,
        cursor: int | None,
        owner: str | None = None,
        *,
        endpoint: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> tuple[list[JobView], int | None]:
        """A page of every replica's jobs, newest first (``owner``'s only, when given)."""
        return await guarded(
            self.jobs.page(status, limit, cursor, owner, endpoint=endpoint, metadata=metadata)
        )

    async def prompt(self, job_id: str) -> dict[str, Any] | None:
        """The prompt of the request kept in the job's hash."""
        raw = await guarded(self.jobs.request(job_id))
        if raw is None:
            return None
        request = msgspec.json.decode(raw, type=PromptRequest)
        found: dict[str, Any] = msgspec.to_builtins(request.prompt)
        return found

    async def waiting(self) -> int:
        """Jobs in the shared stream claimed by no replica yet."""
        return await guarded(self.jobs.waiting())

    async def estimate(self, job_id: str | None) -> int | None:
        """Unknown: no replica knows the others' run times."""
        return None

    async def output(self, job_id: str, index: int) -> RedisOutput | None:
        """An output kept inline in Redis (outputs uploaded to JOB_OUTPUT_URL have only
        their ``url``), streamed from Redis."""
        view = await self.get(job_id)
        if view is None or not 0 <= index < len(view.outputs):
            return None
        blob = await guarded(self.jobs.output(job_id, index))
        if blob is None:
            return None
        blob.filename = view.outputs[index].filename
        blob.mime_type = view.outputs[index].mime_type
        return blob

    # --- the replica's side: claim, run, report -------------------------------------------

    async def start(self, spawn: Spawn) -> None:
        """Start claiming jobs, heartbeating leases and obeying cancels (tasks owned by
        ``spawn``)."""
        self._spawn = spawn
        spawn(self._claim_loop())
        spawn(self._heartbeat())
        spawn(self._notices())

    def poke(self) -> None:
        """A slot may have come free: look for a job to claim now."""
        self._room.set()

    async def _claim_loop(self) -> None:
        """Claim jobs until :meth:`stop`; never raises (Redis errors are retried). With no job
        to claim, waits for word of one (:meth:`_notices`) or at most a second."""
        grouped = False
        while not self.stopping:
            if not self.slots.room(len(self.held)):
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), 0.05)
                continue
            try:
                if not grouped:
                    await self.jobs.ensure_group()
                    grouped = True
                self._work.clear()
                claim = await self.jobs.claim()
                self._problem = None
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(RETRY_S)
                continue
            if claim is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), 1.0)
                continue
            if self.stopping:
                await self._retry(functools.partial(self.jobs.release, claim))
                return
            self.held[claim.name] = claim
            self._idle.clear()
            self._spawn(self._attempt(claim))

    async def stop(self) -> None:
        """Claim nothing more (SIGTERM). Jobs already executing go on; those claimed but not
        started (preparing, waiting for a slot, or still in ComfyUI's queue) are interrupted
        here and given back to the stream at once (:meth:`RedisJobs.release`), so another
        replica takes them without waiting for the lease. A job that starts executing in the
        instant between the check and the interrupt is interrupted and runs again elsewhere
        (at least once)."""
        self.stopping = True
        self._room.set()
        pipeline = self.lifecycle.pipeline
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

    async def close(self) -> None:
        """Close the connections."""
        await self.jobs.close()

    def _down(self, exc: BaseException) -> None:
        if self._problem is None:
            log.warning("the job queue (Redis) is unreachable: %s", exc)
        self._problem = f"the job queue (Redis) is unreachable: {exc}"

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` until Redis answers."""
        while True:
            try:
                result = await call()
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(RETRY_S)
                continue
            self._problem = None
            return result

    async def _heartbeat(self) -> None:
        """Renew the leases of the jobs held here, and the quota places of the jobs running
        here, every third of a lease."""
        interval = max(0.1, self.jobs.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                lost = await self.jobs.heartbeat(list(self.held.values()))
                if self.quotas is not None:
                    await self.quotas.refresh()
            except (RedisError, OSError) as exc:
                self._down(exc)
                continue
            for claim in lost:
                if claim.name in self.held and claim.name not in self._lost:
                    self._lost.add(claim.name)
                    log.warning(
                        "job %s: lease lost (another replica took it over); this run goes on "
                        "but ends the job only if it finishes first",
                        claim.job_id,
                    )
            self._lost &= set(self.held)

    async def _notices(self) -> None:
        """Obey cancels of the jobs running here; claim when a job was submitted."""
        while True:
            try:
                async for job_id in self.jobs.notices():
                    if job_id is None:
                        self._work.set()
                    elif job_id in self.running:
                        record = self.lifecycle.store.find(job_id)
                        if record is not None:
                            self.lifecycle.request_cancel(record)
                        await self.lifecycle.pipeline.interrupt(job_id)
            except (RedisError, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(RETRY_S)

    async def _attempt(self, claim: Claim) -> None:
        try:
            ended, owner, began = await self._run_claimed(claim)
            if ended:
                await self._retry(lambda: self.jobs.ack(claim))
            else:  # given back unstarted (SIGTERM): no heartbeat may renew it from here on
                self.held.pop(claim.name, None)
                await self._retry(lambda: self.jobs.release(claim, owner, began=began))
                log.info("job %s: given back to the queue unstarted", claim.job_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: queue attempt failed", claim.job_id)
        finally:
            self.held.pop(claim.name, None)
            self.releasing.discard(claim.job_id)
            if not self.held:
                self._idle.set()
            self._room.set()

    async def _run_claimed(self, claim: Claim) -> tuple[bool, str | None, bool]:
        """Run ``claim``'s job here: (True, ...) once it ended; (False, its key's name,
        whether an attempt was recorded) when it is to be given back unstarted instead."""
        job_id = claim.job_id
        jobs = self.jobs
        loaded: Loaded = await self._retry(lambda: jobs.load(job_id))
        if loaded.ended or loaded.request is None:
            return True, None, False
        stored = loaded.view
        spec = _spec_of(loaded, (stored.endpoint if stored is not None else None) or "jobs")
        if len(loaded.attempts) >= jobs.max_attempts:
            await self._give_up(spec, stored, loaded.attempts)
            return True, spec.owner, False
        if self.stopping:
            return False, spec.owner, False
        attempts = await self._retry(lambda: jobs.begin_attempt(job_id, spec.owner))
        created_ms = ms_of(stored.created_at) if stored is not None else None
        attempt = _Run(self, claim, attempts, created_ms)
        self.running.add(job_id)
        try:
            record = await self.lifecycle.run(spec, attempt)
        finally:
            self.running.discard(job_id)
            await attempt.mirror.drained()
        self.lifecycle.store.drop(record)
        if job_id in self.releasing:
            return False, spec.owner, True
        if attempt.lost:
            log.warning("job %s: ended by another replica first; this run is discarded", job_id)
        return True, spec.owner, True

    async def _give_up(
        self, spec: JobSpec, stored: JobView | None, attempts: list[dict[str, Any]]
    ) -> None:
        """Fail the job after JOB_MAX_ATTEMPTS runs, listing them, through the lifecycle's
        failure routine (its webhooks sent once: only if this ends it)."""
        job_id = spec.id
        error = {
            "error": f"the job was taken over {len(attempts)} time(s) without ending "
            f"(JOB_MAX_ATTEMPTS={self.jobs.max_attempts})",
            "id": job_id,
            "attempts": attempts,
        }
        record = _record_of(stored, job_id, spec.endpoint)
        record.attempts = attempts
        await self.lifecycle.end_failed(spec, record, error, _End(self, job_id))

    def _spill(self, result: JobResult, kept: int = 0) -> tuple[str, Any] | None:
        """Where outputs of a job that names no upload target go when they exceed
        JOB_INLINE_OUTPUT_MB (with the ``kept`` bytes of its outputs already in Redis): under
        ``JOB_OUTPUT_URL/<job id>/``, or nowhere: :class:`OutputsTooLarge`."""
        size = kept + sum(item.size for item in result.files)
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


def _spec_of(loaded: Loaded, endpoint: str) -> JobSpec:
    """The :class:`JobSpec` of a job kept in Redis (as its submitter made it: its labels from
    its stored view, its partner key from its own key)."""
    metadata = loaded.view.metadata if loaded.view is not None else None
    return JobSpec(
        request=msgspec.json.decode(loaded.request or b'{"prompt": {}}', type=PromptRequest),
        endpoint=endpoint,
        fingerprint=loaded.fingerprint,
        after=None if loaded.after is None else msgspec.json.decode(loaded.after, type=AfterEnd),
        key=None if loaded.key is None else msgspec.json.decode(loaded.key, type=KeyPolicy),
        metadata=metadata if isinstance(metadata, dict) else None,
        partner_key=loaded.partner_key,
        traceparent=loaded.trace,
    )


def _record_of(view: JobView | None, job_id: str = "", endpoint: str = "jobs") -> JobRecord:
    """A record standing in for a job kept in Redis that no replica runs (to end it through
    the lifecycle): its id, endpoint, owner, submission time, replica and attempts."""
    if view is None:
        return JobRecord(id=job_id, endpoint=endpoint)
    record = JobRecord(id=view.id, endpoint=view.endpoint)
    if isinstance(view.owner, str):
        record.owner = view.owner
    record.created_ms = ms_of(view.created_at) or record.created_ms
    if isinstance(view.attempts, list):
        record.attempts = view.attempts
    if isinstance(view.replica, str):
        record.replica = view.replica
    return record


class _End:
    """The Redis side of ending a job no replica runs (cancelled while pending, or out of
    attempts): the end is claimed with a fresh token, then written."""

    def __init__(self, backend: RedisBackend, job_id: str, *, cancel: bool = False) -> None:
        self.backend = backend
        self.job_id = job_id
        self.cancel = cancel
        self.token = f"{backend.jobs.replica}:{uuid.uuid4().hex}"
        self.won = False

    def bind(self, record: JobRecord) -> None:
        """Nothing runs: nothing to mirror."""

    def spill(self, result: JobResult) -> tuple[str, Any] | None:
        """Nothing runs: no outputs."""
        return None

    async def keep(self, index: int, path: Path) -> bool:
        """Nothing runs: no outputs."""
        return False

    async def may_end(self) -> bool:
        """True when this claim ends the job (SET NX)."""
        self.won = await guarded(self.backend.jobs.take_end(self.job_id, self.token))
        return self.won

    async def ended(self, view: JobView, files: Sequence[Path]) -> bool:
        """Write the end; a cancel also tells any replica that claimed the job meanwhile."""
        view.queue_position = None
        written = await guarded(self.backend.jobs.finish(self.job_id, view, [], self.token))
        if self.cancel:
            await guarded(self.backend.jobs.request_cancel(self.job_id))
        return written


class _Run:
    """One run of a claimed job on this replica: its record mirrored to Redis, its large
    outputs spilled, its end claimed with the attempt's token and written."""

    def __init__(
        self,
        backend: RedisBackend,
        claim: Claim,
        attempts: list[dict[str, Any]],
        created_ms: int | None,
    ) -> None:
        self.backend = backend
        self.claim = claim
        self.job_id = claim.job_id
        self.attempts = attempts
        self.created_ms = created_ms
        self.token = f"{backend.jobs.replica}:{claim.entry}:{uuid.uuid4().hex[:8]}"
        self.mirror = Mirror(backend, self.job_id)
        #: Set when this attempt may not end the job: nothing more is written.
        self.lost = False
        #: Outputs written to Redis while the job ran (:meth:`keep`): indexes and bytes.
        self.kept: set[int] = set()
        self.kept_bytes = 0

    def bind(self, record: JobRecord) -> None:
        """Mirror ``record`` from now on; its ``created_at`` stays the submission's."""
        if self.created_ms is not None:
            record.created_ms = self.created_ms
        record.replica = self.backend.jobs.replica
        record.attempts = self.attempts
        self.mirror.bind(record)

    def spill(self, result: JobResult) -> tuple[str, Any] | None:
        """Outputs over JOB_INLINE_OUTPUT_MB go to JOB_OUTPUT_URL."""
        return self.backend._spill(result, self.kept_bytes)

    async def keep(self, index: int, path: Path) -> bool:
        """Write the output to Redis now, unless it would take the job past
        JOB_INLINE_OUTPUT_MB (it goes with the end then) or this run lost its lease."""
        size = path.stat().st_size
        if self.lost or self.mirror.lost or self.kept_bytes + size > self.backend.inline_bytes:
            return False
        jobs = self.backend.jobs
        await self.backend._retry(lambda: jobs.keep_output(self.job_id, index, path))
        self.kept.add(index)
        self.kept_bytes += size
        return True

    async def may_end(self) -> bool:
        """Not when the job is being given back, nor when another attempt (a take-over, a
        cancel) ended it first."""
        backend = self.backend
        won = self.job_id not in backend.releasing and await backend._retry(
            lambda: backend.jobs.take_end(self.job_id, self.token)
        )
        self.lost = self.mirror.lost = not won
        return won

    async def ended(self, view: JobView, files: Sequence[Path]) -> bool:
        """Write the end to Redis once the mirrored events are in (retained files streamed
        inline: larger ones were spilled)."""
        backend = self.backend
        await self.mirror.drained()
        unwritten = [None if i in self.kept else path for i, path in enumerate(files)]
        written = await backend._retry(
            lambda: backend.jobs.finish(self.job_id, view, unwritten, self.token)
        )
        if not written:
            log.warning("job %s: ended by another replica first; this run is discarded", view.id)
        return written


class Mirror:
    """Copies one running job's logged events to Redis, in order, retrying while Redis is
    away. The ``done`` event is left to :meth:`RedisJobs.finish` (written once)."""

    def __init__(self, backend: RedisBackend, job_id: str) -> None:
        self.backend = backend
        self.job_id = job_id
        self.queue: asyncio.Queue[tuple[JobRecord, JobEvent] | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        #: Set when this attempt may not end the job: nothing more is written.
        self.lost = False

    def bind(self, record: JobRecord) -> None:
        """Start mirroring ``record`` (its sink is set; its current status is written)."""
        record.sink = self.push
        self.task = asyncio.ensure_future(self._write())
        self.push(record, JobEvent(0, "status", msgspec.json.encode({"status": "pending"})))

    def push(self, record: JobRecord, event: JobEvent) -> None:
        """One event of the job (from :meth:`JobRecord.publish`). A ``preview`` is sent live
        to followers on every replica (best effort: never retried, never kept)."""
        if self.lost or event.type == "done":
            return
        if event.type == "preview":
            self.backend._spawn(self._preview(event.data))
        else:
            self.queue.put_nowait((record, event))

    async def _preview(self, data: bytes) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.backend.jobs.preview(self.job_id, data)

    async def drained(self) -> None:
        """Wait until every event pushed so far is in Redis (and stop mirroring)."""
        task, self.task = self.task, None
        if task is not None:
            self.queue.put_nowait(None)
            await task

    async def _write(self) -> None:
        """Write the queued events, coalesced: every event queued while the previous write
        was under way goes in one round trip (:meth:`RedisJobs.emit`: in order, then the
        job's body as it is now)."""
        jobs = self.backend.jobs
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
            view = batch[-1][0].view()
            await self.backend._retry(functools.partial(jobs.emit, self.job_id, events, view))
