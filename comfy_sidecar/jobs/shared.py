"""What the job routes do when jobs live in Redis (``JOB_QUEUE_URL``): submit to the shared
queue, read, wait for, follow, cancel and list any replica's jobs, fetch their inline outputs.

Every method raises :class:`~comfy_sidecar.errors.Unavailable` (503, with ``Retry-After``)
while Redis cannot be reached, so a caller retries; nothing is accepted that Redis did not
store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from comfy_sidecar.errors import Conflict, Interrupted, Unavailable
from comfy_sidecar.jobs.after import AfterEnd, encode, nothing
from comfy_sidecar.jobs.backend import SharedQueue, unreachable
from comfy_sidecar.jobs.store import DifferentBody, JobEvent, JobRecord, JobStatus, iso, now_ms

T = TypeVar("T")


async def guarded(call: Awaitable[T]) -> T:
    """``await call``, a Redis failure raised as :class:`Unavailable`."""
    try:
        return await call
    except unreachable() as exc:
        raise Unavailable(f"the job queue (Redis) is unreachable: {exc}") from None


class SharedJobs:
    """The job routes' operations over :class:`SharedQueue`. ``check(request)`` is what a
    submission must pass on the replica that takes it, before anything is stored: the
    in-process job API's own preprocessing (URLs guarded, inputs fetched, an output node
    present), raising the same 4xx errors with their ``location``."""

    def __init__(
        self,
        jobs: SharedQueue,
        check: Callable[[Any], Awaitable[None]],
        send_failure: Callable[[Any, dict[str, Any]], Awaitable[None]],
        after_end: Callable[[str, dict[str, Any]], Awaitable[None]] = nothing,
    ) -> None:
        self.jobs = jobs
        self.check = check
        #: ``send_failure(request, error)``: a job's failure webhook (see
        #: :meth:`~comfy_sidecar.pipeline.deliver.Delivery.send_failure`).
        self.send_failure = send_failure
        #: ``after_end(job_id, view)``: its adapter's webhook, for a job ended here
        #: (:class:`~comfy_sidecar.jobs.after.AfterEnds`).
        self.after_end = after_end

    async def submit(
        self,
        request: Any,
        fingerprint: bytes,
        after: AfterEnd | None = None,
        endpoint: str = "jobs",
    ) -> dict[str, Any]:
        """Store the job and append it to the work stream; returns its body. ``after``: the
        adapter's webhook, sent by whichever replica ends the job; ``endpoint``: the API it
        came through (the body's ``endpoint``, the metrics' label). A retained id with the
        same body returns that job; another body raises :class:`Conflict`."""
        import uuid

        if request.id is None:
            request = msgspec.structs.replace(request, id=str(uuid.uuid4()))
            await self.check(request)
        elif await guarded(self.jobs.get(request.id)) is None:
            await self.check(request)  # a kept id is a resubmission (or a 409) instead
        view = JobRecord(id=request.id, endpoint=endpoint).view()
        view["attempts"] = []
        try:
            stored, _ = await guarded(
                self.jobs.enqueue(view, msgspec.json.encode(request), fingerprint, encode(after))
            )
        except DifferentBody:
            raise Conflict(
                f"a job with id {request.id!r} exists with a different body",
                location="id",
                id=request.id,
            ) from None
        return stored

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """Job ``job_id``'s body, or None when it is not kept. A pending one carries its
        ``queue_position`` in the shared stream (0: next to be claimed; None once claimed)."""
        view = await guarded(self.jobs.get(job_id))
        if view is not None and view.get("status") == JobStatus.PENDING.value:
            view["queue_position"] = await guarded(self.jobs.position(job_id))
        return view

    async def waiting(self) -> int:
        """How many jobs wait in the shared stream, claimed by no replica yet."""
        return await guarded(self.jobs.waiting())

    async def wait(self, job_id: str, wait_s: float) -> dict[str, Any] | None:
        """Job ``job_id``'s body once it has ended or ``wait_s`` seconds have passed (None
        when it is not kept). Waits on the job's event stream (:meth:`SharedQueue.follow`, a
        blocking read) for its ``done``, then reads the body once: no polling."""
        view = await self.get(job_id)
        if view is None or JobStatus(view["status"]).terminal or wait_s <= 0:
            return view
        events = self.jobs.follow(job_id, 0, heartbeat_s=wait_s)
        try:
            async with asyncio.timeout(wait_s):
                async for event in events:
                    if event is not None and event.type == "done":
                        break
        except TimeoutError:
            pass
        except unreachable() as exc:
            raise Unavailable(f"the job queue (Redis) is unreachable: {exc}") from None
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        return await self.get(job_id)

    def follow(
        self, job_id: str, after: int, heartbeat_s: float, previews: bool = False
    ) -> AsyncIterator[JobEvent | None]:
        """Job ``job_id``'s events after ``after``, with live ``preview`` events when
        ``previews`` (see :meth:`SharedQueue.follow`)."""
        return self.jobs.follow(job_id, after, heartbeat_s, previews)

    async def cancel(self, job_id: str, view: dict[str, Any]) -> tuple[bool, str]:
        """Cancel job ``job_id`` (body ``view``) wherever it is: a pending one ends
        ``cancelled`` at once (with its failure webhook, as in-process), a running one is
        interrupted by its replica (which sends the webhooks). Its adapter's webhook
        (``after_end``) is sent by whichever replica ends it. Returns (cancelled, status)."""
        from comfy_sidecar.schemas import PromptRequest

        status = JobStatus(view["status"])
        if status.terminal:
            return False, status.value
        if status is JobStatus.PENDING:
            error = Interrupted("the job was cancelled before it ran", id=job_id).body()
            ended = dict(
                view, status=JobStatus.CANCELLED.value, completed_at=iso(now_ms()), error=error
            )
            ended["queue_position"] = None
            if await guarded(self.jobs.finish(job_id, ended, [])):
                await guarded(self.jobs.request_cancel(job_id))
                raw = await guarded(self.jobs.request(job_id))
                if raw is not None:
                    request = msgspec.json.decode(raw, type=PromptRequest)
                    await self.send_failure(request, error)
                await self.after_end(job_id, ended)
                return True, JobStatus.CANCELLED.value
        await guarded(self.jobs.request_cancel(job_id))
        final = await self.wait(job_id, 10.0) or view
        return final["status"] == JobStatus.CANCELLED.value, final["status"]

    async def output(self, job_id: str, index: int) -> bytes | None:
        """Inline output ``index`` of job ``job_id``, or None."""
        return await guarded(self.jobs.output(job_id, index))

    async def page(
        self, status: JobStatus | None, limit: int, cursor: int | None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """A listing page (see :meth:`SharedQueue.page`)."""
        return await guarded(self.jobs.page(status, limit, cursor))
