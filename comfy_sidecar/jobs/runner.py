"""Jobs through the pipeline: each request's :class:`JobRecord` follows its pipeline job.

A :class:`JobTracker` binds one record to one pipeline job: ComfyUI's frames move its status and
progress, and the end of the job (outputs, or the error body the API answers with) finishes it.
Every request runs through one: ``/prompt`` (sync and comfyui-api's async forms), the workflow
endpoints, the warmup, ``/jobs`` and the job adapters. :class:`JobService` is what the job
routes use: submit (the job runs in the background, its outputs kept under ``JOBS_DIR``),
cancel, and the path of a retained output.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import os
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_sidecar import metrics
from comfy_sidecar.errors import Conflict, Interrupted, SidecarError, TimedOut, internal_message
from comfy_sidecar.jobs.progress import Progress, nodes_to_run
from comfy_sidecar.jobs.store import (
    DifferentBody,
    JobRecord,
    JobStatus,
    JobStore,
    OutputInfo,
)

if TYPE_CHECKING:
    from comfy_sidecar.jobs.shared import SharedJobs
    from comfy_sidecar.pipeline.outputs import OutputFile
    from comfy_sidecar.pipeline.run import PendingJob

log = logging.getLogger("comfy_sidecar.jobs")

#: Frames that move progress.
PROGRESS_FRAMES = frozenset(
    {"execution_cached", "executing", "executed", "progress", "progress_state"}
)

MEDIA_TYPES = ("image", "video", "audio", "text")


def media_type_of(mime: str) -> str:
    """``image``, ``video``, ``audio``, ``text`` or ``other`` for a MIME type."""
    major = mime.split("/", 1)[0]
    for media_type in MEDIA_TYPES:  # the constant: retained jobs share it
        if major == media_type:
            return media_type
    return "other"


def mime_type_of(filename: str) -> str:
    """The MIME type of ``filename`` by its extension (``application/octet-stream`` if
    unknown)."""
    guessed, _ = mimetypes.guess_type(filename)
    return guessed or "application/octet-stream"


def status_for(exc: BaseException) -> JobStatus:
    """The job status an exception ends a job with: an interrupt is ``cancelled``,
    PROMPT_TIMEOUT_S is ``timed_out``, anything else ``failed``."""
    if isinstance(exc, Interrupted):
        return JobStatus.CANCELLED
    if isinstance(exc, TimedOut):
        return JobStatus.TIMED_OUT
    return JobStatus.FAILED


def error_body(exc: BaseException, job_id: str) -> dict[str, Any]:
    """The body the API answers ``exc`` with (``/prompt``'s), for a job's ``error``."""
    if isinstance(exc, SidecarError):
        return exc.body()
    return {"error": internal_message(exc), "id": job_id}


class JobTracker:
    """Keeps one :class:`JobRecord` in step with its pipeline job."""

    def __init__(self, store: JobStore, record: JobRecord) -> None:
        self.store = store
        self.record = record

    def attach(self, pending: PendingJob, output_nodes: set[str]) -> None:
        """The job is registered and preprocessed: follow its frames from now on.
        ``output_nodes`` are the node ids known to be output nodes (for the nodes to run)."""
        record = self.record
        prompt = pending.prompt
        class_types = {
            node_id: str(node.get("class_type", ""))
            for node_id, node in prompt.items()
            if isinstance(node, Mapping)
        }
        record.prompt_id = pending.job.prompt_id
        record.progress = Progress(class_types, nodes_to_run(prompt, output_nodes))
        pending.job.listener = self.on_frame

    def on_frame(self, kind: str, data: Mapping[str, Any]) -> None:
        """One ComfyUI frame of this job."""
        record = self.record
        if record.status.terminal:
            return
        if kind == "preview":  # live only: not kept in the event log, sent with ?previews=true
            image = data.get("image")
            if isinstance(image, bytes):
                body = {
                    "node_id": data.get("node_id"),
                    "mime_type": data.get("mime_type"),
                    "data": base64.b64encode(image).decode("ascii"),
                }
                record.publish("preview", body, log_it=False)
        elif kind == "sidecar_queued":  # sent to an instance (again, after it lost the job)
            record.prompt_id = str(data.get("prompt_id"))
            record.instance = str(data.get("instance"))
        elif kind == "execution_start":
            self.store.set_status(record, JobStatus.IN_PROGRESS)
        elif kind in PROGRESS_FRAMES and isinstance(record.progress, Progress):
            if record.status is JobStatus.PENDING:
                self.store.set_status(record, JobStatus.IN_PROGRESS)
            if record.progress.apply(kind, data):
                record.publish("progress", record.progress.view())

    def completed(
        self,
        files: list[OutputFile],
        urls: list[str] | None,
        stats: dict[str, Any],
        *,
        retain: bool,
    ) -> None:
        """The job succeeded with ``files`` (uploaded to ``urls`` when given). ``retain``
        moves each file under ``JOBS_DIR/<id>/`` so ``GET /jobs/{id}/outputs/{n}`` serves it;
        the caller's list then no longer owns them."""
        record = self.record
        outputs: list[OutputInfo] = []
        kept: list[Path] = []
        for index, item in enumerate(files):
            mime = mime_type_of(item.filename)
            size = item.size
            if urls is not None:
                url: str | None = urls[index]
            elif retain:
                target = self.store.job_dir(record.id) / f"{index}-{item.filename}"
                _move(item.path, target)
                kept.append(target)
                url = f"/jobs/{record.id}/outputs/{index}"
            else:
                url = None
            outputs.append(
                OutputInfo(
                    node_id=item.node_id,
                    filename=item.filename,
                    media_type=media_type_of(mime),
                    mime_type=mime,
                    size_bytes=size,
                    url=url,
                )
            )
        if retain and urls is None:
            files.clear()
        record.outputs = outputs
        record.files = kept
        for output in outputs:
            record.publish("output", output)
        metrics.job_completed(stats)
        self.store.finish(record, JobStatus.COMPLETED, stats=stats)

    def failed(self, exc: BaseException) -> None:
        """The job ended with ``exc`` (the error the API answers with)."""
        status = status_for(exc)
        self.store.finish(self.record, status, error=error_body(exc, self.record.id))

    def forget(self) -> None:
        """The request was refused before it became a job (a caller's mistake): drop the
        record, so nothing of it is kept."""
        self.store.drop(self.record)


def _move(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError:
        shutil.move(str(source), str(target))


def open_job(
    store: JobStore, job_id: str, endpoint: str, fingerprint: bytes = b""
) -> tuple[JobTracker, bool]:
    """A tracker for a new job ``job_id`` from ``endpoint``; (tracker, created).

    With a ``fingerprint`` (the job APIs), a retained job with the same id and body is
    returned (created False) and another body raises :class:`Conflict`. Without one
    (``/prompt``, workflows, warmup) a job that has ended is replaced, as comfyui-api lets an
    id be reused, and one still running raises :class:`Conflict`.
    """
    record = JobRecord(id=job_id, endpoint=endpoint, fingerprint=fingerprint)
    existing = store.find(job_id)
    if existing is not None and not fingerprint:
        if not existing.status.terminal:
            raise Conflict(f"a job with id {job_id!r} is already running", location="id", id=job_id)
        store.drop(existing)
    try:
        stored, created = store.add(record)
    except DifferentBody:
        raise Conflict(
            f"a job with id {job_id!r} exists with a different body", location="id", id=job_id
        ) from None
    return JobTracker(store, stored), created


class JobService:
    """What the job routes use: :meth:`submit`, :meth:`cancel`, :meth:`output_path`."""

    def __init__(
        self, store: JobStore, delivery: Any, admit: Callable[[], None] = lambda: None
    ) -> None:
        self.store = store
        self.delivery = delivery
        self.admit = admit
        #: Set when jobs live in Redis (JOB_QUEUE_URL): the routes go through it instead.
        self.shared: SharedJobs | None = None

    async def submit(self, request: Any, *, endpoint: str, fingerprint: bytes) -> JobRecord:
        """Check and preprocess ``request`` (a :class:`~comfy_sidecar.schemas.PromptRequest`)
        now, then run it in the background; its outputs are kept under ``JOBS_DIR`` (or
        uploaded when it names an upload target) and its webhooks fire as for ``/prompt``.
        Returns the job (the retained one for a resubmission). Raises what ``/prompt`` raises
        before its answer; then nothing of the job is kept."""
        existing = self.store.find(request.id) if request.id else None
        if existing is None or existing.fingerprint != fingerprint:
            self.admit()  # a resubmission of a retained job needs no room
        record: JobRecord = await self.delivery.submit(request, endpoint, fingerprint)
        return record

    async def cancel(self, record: JobRecord) -> bool:
        """Cancel a job that has not ended; False (nothing done) when it has."""
        if record.status.terminal:
            return False
        interrupted: bool = await self.delivery.pipeline.interrupt(record.id)
        if interrupted:
            await record.wait_ended(10.0)
        return interrupted or record.status is JobStatus.CANCELLED

    def when_ended(
        self, record: JobRecord, callback: Callable[[JobRecord], Awaitable[None]]
    ) -> None:
        """Run ``callback(record)`` once ``record`` has ended (a background task of the
        sidecar's, cancelled with it): what the job adapters send their webhooks and clean up
        their per-job files with. An exception from ``callback`` is logged, never raised."""

        async def watch() -> None:
            while not record.status.terminal:
                await record.changed()
            try:
                await callback(record)
            except Exception:
                log.exception("job %s: after-end callback failed", record.id)

        self.delivery.spawn(watch())

    def output_path(self, record: JobRecord, index: int) -> Path | None:
        """The retained file of output ``index``, or None."""
        if not 0 <= index < len(record.files):
            return None
        path = record.files[index]
        return path if path.is_file() else None
