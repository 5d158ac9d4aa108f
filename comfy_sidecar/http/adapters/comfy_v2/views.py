"""The job model as the Comfy API v2 shows it: a :class:`~comfy_sidecar.jobs.model.JobView`
becomes a v2 ``Job`` (:func:`v2_job`), its events become v2 Server-Sent Events
(:class:`EventMapper`). Pure mapping: no backend is asked anything here but what the caller
passes.

Statuses (``jobs/model.py`` -> v2): ``pending`` -> ``queued``, ``in_progress`` ->
``running`` (``canceling`` once a cancel reached it), ``completed`` -> ``succeeded``,
``failed`` -> ``failed``, ``cancelled`` -> ``canceled``, ``timed_out`` (PROMPT_TIMEOUT_S) ->
``expired``. ``progress`` is the job model's progress (:mod:`comfy_sidecar.jobs.progress`) as a
complete snapshot, ``value`` its percent / 100 (monotonic, 1 only once the job succeeded).
Outputs are assets: output ``n`` of job ``j`` is the asset ``j.n``
(:func:`~comfy_sidecar.http.adapters.comfy_v2.assets.output_asset_id`, served by the asset
routes), its ``url`` a signed content URL (:class:`~comfy_sidecar.assets.signing.UrlSigner`),
absolute against the request's origin (comfy-sdk types it ``AnyUrl``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec

from comfy_sidecar.assets.signing import UrlSigner
from comfy_sidecar.http.adapters.comfy_v2.assets import output_asset_id
from comfy_sidecar.http.adapters.comfy_v2.models import (
    Job,
    JobError,
    JobListItem,
    JobUrls,
    Output,
    OutputType,
    Progress,
    V2Status,
)
from comfy_sidecar.jobs.model import JobStatus, JobView, OutputInfo, iso, ms_of, now_ms

__all__ = [
    "ENDPOINT",
    "EventMapper",
    "job_error",
    "job_urls",
    "output_type",
    "progress_of",
    "v2_job",
    "v2_list_item",
    "v2_output",
    "v2_status",
]

#: The job model's ``endpoint`` of a job submitted through the v2 API (the metrics' label).
ENDPOINT = "comfy_v2"

STATUS: dict[JobStatus, V2Status] = {
    JobStatus.PENDING: "queued",
    JobStatus.IN_PROGRESS: "running",
    JobStatus.COMPLETED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "canceled",
    JobStatus.TIMED_OUT: "expired",
}

#: The job model's media types (``pipeline/outputs.py`` ``media_type_of``) that are v2 ones.
MEDIA_TYPES: dict[str, OutputType] = {
    "image": "image",
    "video": "video",
    "audio": "audio",
    "text": "text",
}


def v2_status(view: JobView) -> V2Status:
    """The v2 status of ``view`` (see the module docstring)."""
    if not view.ended and view.cancel_requested is True:
        return "canceling"
    return STATUS[view.status]


def _whole(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number > 0 else None


def progress_of(fields: Mapping[str, Any]) -> Progress:
    """A v2 progress snapshot from the job model's progress fields (a view's body or a
    ``progress`` event's): ``value`` = ``progress`` / 100, the running node, its class and
    its ``step`` of ``steps`` (ComfyUI's ``progress`` frames), and a ``message`` such as
    ``KSampler 21/50``."""
    percent = float(fields.get("progress") or 0.0)
    node = fields.get("current_node")
    class_type = fields.get("current_node_type")
    steps = _whole(fields.get("progress_max"))
    step = int(float(fields.get("progress_value") or 0)) if steps is not None else None
    message = None
    if class_type:
        message = f"{class_type} {step}/{steps}" if steps is not None else str(class_type)
    return Progress(
        value=max(0.0, min(1.0, round(percent / 100.0, 4))),
        nodes_done=int(fields.get("nodes_done") or 0),
        nodes_total=int(fields.get("nodes_total") or 0),
        current_node=None if node is None else str(node),
        current_node_class=None if class_type is None else str(class_type),
        step=step,
        steps=steps,
        message=message,
    )


def job_error(view: JobView) -> JobError | None:
    """The v2 ``JobError`` of an ended job (None for one that succeeded or runs): ``code``
    ``canceled``, ``timeout``, ComfyUI's refusal ``invalid_workflow``, the sidecar's
    ``reason`` (``comfyui_exited``, ``out_of_memory``, ...), ``node_execution_error`` for a
    node that raised, else ``execution_failed``; ComfyUI's exception message, node, class and
    traceback (server paths scrubbed by the pipeline)."""
    if not view.ended or view.status is JobStatus.COMPLETED:
        return None
    body = dict(view.error or {})
    message = str(body.pop("exception_message", None) or body.get("error") or view.status.value)
    body.pop("error", None)
    node_id = body.pop("node_id", None)
    class_type = body.pop("node_type", None)
    trace = body.pop("traceback", None)
    if isinstance(trace, list):
        trace = "".join(str(line) for line in trace)
    reason = body.get("reason")
    if view.status is JobStatus.CANCELLED:
        code = "canceled"
    elif view.status is JobStatus.TIMED_OUT:
        code = "timeout"
    elif "node_errors" in body:
        code = "invalid_workflow"
    elif isinstance(reason, str) and reason:
        code = reason
    elif node_id is not None:
        code = "node_execution_error"
    else:
        code = "execution_failed"
    for name in ("id", "location"):
        body.pop(name, None)
    return JobError(
        code=code,
        message=message,
        node_id=None if node_id is None else str(node_id),
        class_type=None if class_type is None else str(class_type),
        traceback=None if trace is None else str(trace),
        details=body or None,
    )


def output_type(output: OutputInfo) -> OutputType:
    """The v2 output kind of ``output``: its media type (``image``, ``video``, ``audio``,
    ``text``), ``latent`` for ComfyUI's ``.latent`` files, else ``file``."""
    if output.filename.lower().endswith(".latent"):
        return "latent"
    return MEDIA_TYPES.get(output.media_type, "file")


def v2_output(
    job_id: str, index: int, output: OutputInfo, signer: UrlSigner, origin: str
) -> Output:
    """Output ``index`` of job ``job_id`` as a v2 ``Output`` with a content URL signed now."""
    asset_id = output_asset_id(job_id, index)
    signed = signer.sign(asset_id)
    return Output(
        node_id=output.node_id,
        name=output.filename,
        type=output_type(output),
        content_type=output.mime_type,
        size_bytes=output.size_bytes,
        id=asset_id,
        hash=output.hash if isinstance(output.hash, str) else None,
        url=signed.absolute(origin),
        url_expires_at=signed.expires_at_text,
        job_id=job_id,
    )


def job_urls(job_id: str, prefix: str = "/api/v2") -> JobUrls:
    """The job's host-relative links under the v2 mount point."""
    root = f"{prefix}/jobs/{job_id}"
    return JobUrls(self=root, events=f"{root}/events", cancel=f"{root}/cancel")


def v2_job(
    view: JobView,
    signer: UrlSigner,
    origin: str,
    retention_s: float,
    *,
    status: V2Status | None = None,
) -> Job:
    """``view`` as a v2 ``Job`` (see the module docstring). ``retention_s`` (JOB_RETENTION_S)
    gives ``expires_at``: the job's end plus the retention, or, while it has not ended, now
    plus the retention (it is kept at least that long). ``status`` overrides the mapped one
    (a cancel just sent: ``canceling``)."""
    created = ms_of(view.created_at) or now_ms()
    started = ms_of(view.started_at)
    completed = ms_of(view.completed_at)
    base = completed if completed is not None else int(time.time() * 1000)
    expires = base + int(retention_s * 1000)
    fields = msgspec.to_builtins(view)
    state = status or v2_status(view)
    return Job(
        id=view.id,
        status=state,
        created_at=iso(created) or "",
        started_at=iso(started),
        completed_at=iso(completed),
        expires_at=iso(expires) or "",
        queue_position=view.queue_position if state == "queued" else None,
        progress=progress_of(fields),
        outputs=[
            v2_output(view.id, index, output, signer, origin)
            for index, output in enumerate(view.outputs)
        ],
        error=job_error(view),
        urls=job_urls(view.id),
        metrics={
            "queue_ms": None if started is None else max(0, started - created),
            "execution_ms": None
            if started is None or completed is None
            else max(0, completed - started),
        },
        metadata=view.metadata if isinstance(view.metadata, dict) else None,
    )


def v2_list_item(view: JobView, signer: UrlSigner, origin: str, retention_s: float) -> JobListItem:
    """A ``GET /api/v2/jobs`` entry: :func:`v2_job` with ``create_time`` and ``update_time``."""
    job = v2_job(view, signer, origin, retention_s)
    updated = view.last_event_time or view.completed_at or view.started_at or view.created_at
    return JobListItem(
        **msgspec.structs.asdict(job),
        create_time=job.created_at,
        update_time=iso(ms_of(updated)) or job.created_at,
    )


class EventMapper:
    """Turns one job's events (:class:`~comfy_sidecar.jobs.model.JobEvent` types ``status``,
    ``progress``, ``output``, ``preview``, ``done``) into v2 SSE events ``(name, data)``:
    ``status`` ``{status, queue_position}``, ``progress`` (a ``Progress``), ``output`` (an
    ``Output``), ``preview`` ``{node_id, content_type, data_base64}`` and ``log`` ``{level,
    message}`` (a cancel that reached the running job; the error a job failed with). The
    ``done`` event becomes what the stream ends with: the outputs not sent yet, the last
    progress, the error's ``log``, then the terminal ``status``. Each output is sent once;
    a ``status`` only when it changes."""

    def __init__(self, job_id: str, signer: UrlSigner, origin: str) -> None:
        self.job_id = job_id
        self.signer = signer
        self.origin = origin
        self.sent_outputs: set[int] = set()
        self.last_status: str | None = None

    def status(self, state: str, queue_position: int | None = None) -> list[tuple[str, Any]]:
        """A ``status`` event, unless ``state`` is the last one sent."""
        if state == self.last_status:
            return []
        self.last_status = state
        return [("status", {"status": state, "queue_position": queue_position})]

    def output(self, index: int, output: OutputInfo) -> list[tuple[str, Any]]:
        """An ``output`` event for output ``index``, unless it was sent."""
        if index in self.sent_outputs:
            return []
        self.sent_outputs.add(index)
        return [("output", v2_output(self.job_id, index, output, self.signer, self.origin))]

    def snapshot(self, view: JobView) -> list[tuple[str, Any]]:
        """Where the job is now, as events (a stream's start without ``Last-Event-ID``):
        its status (with its queue position), its progress once it runs, its outputs so far;
        for an ended job, what :meth:`ended` sends."""
        if view.ended:
            return self.ended(view)
        events = self.status(v2_status(view), view.queue_position)
        if view.status is not JobStatus.PENDING:
            events.append(("progress", progress_of(msgspec.to_builtins(view))))
        for index, output in enumerate(view.outputs):
            events += self.output(index, output)
        return events

    def logged(self, kind: str, data: Any) -> list[tuple[str, Any]]:
        """The v2 events of one logged job event ``kind`` with its decoded body ``data``
        (``output`` events are mapped by the caller, who knows their index)."""
        if kind == "status" and isinstance(data, dict):
            if data.get("cancel_requested"):
                return [
                    *self.status("canceling"),
                    (
                        "log",
                        {
                            "level": "info",
                            "message": "cancel requested: the job stops at the next node",
                        },
                    ),
                ]
            state = STATUS.get(JobStatus(data.get("status", "pending")), "queued")
            return self.status(state)
        if kind == "progress" and isinstance(data, dict):
            return [("progress", progress_of(data))]
        return []

    def ended(self, view: JobView) -> list[tuple[str, Any]]:
        """What the stream ends with for the job's final ``view``."""
        events: list[tuple[str, Any]] = []
        for index, output in enumerate(view.outputs):
            events += self.output(index, output)
        events.append(("progress", progress_of(msgspec.to_builtins(view))))
        error = job_error(view)
        if error is not None and view.status is not JobStatus.CANCELLED:
            events.append(("log", {"level": "error", "message": f"{error.code}: {error.message}"}))
        self.last_status = None  # the terminal status is always sent
        events += self.status(v2_status(view))
        return events

    @staticmethod
    def preview(data: Mapping[str, Any]) -> tuple[str, Any]:
        """A live ``preview`` event's v2 body."""
        return (
            "preview",
            {
                "node_id": str(data.get("node_id") or ""),
                "content_type": str(data.get("mime_type") or "image/jpeg"),
                "data_base64": str(data.get("data") or ""),
            },
        )
