"""The Modal jobs API (``/v1/jobs``), over the same jobs as ``/jobs``.

Copies the "ComfyUI Modal API" operator guide: ``POST /v1/jobs {workflow, inputs[], media[],
webhook_url, priority}`` answers ``{job_id, status: "queued", created_at, estimated_time}``;
``GET /v1/jobs/{id}`` gives status and progress under its names and, once completed, the outputs
with base64 ``data``; ``DELETE /v1/jobs/{id}`` cancels (the job ends ``failed`` with ``Cancelled
by user``); ``GET /v1/jobs?status=&limit=`` lists newest first. Its status names map ours:
pending → queued, in_progress → running, completed, and failed, cancelled, timed_out → failed.
Webhooks ``job.completed`` and ``job.failed`` (``{event, job_id, timestamp[, error]}``, no
outputs) go to ``webhook_url`` through the webhook dispatcher when the job ends.

Unlike Modal, each job's ``media`` (and ``image_base64``/``image_url`` overrides) are written
into a folder of their own, ``INPUT_DIR/.comfy-sidecar/<job id>-media/``, and the inputs naming
a media item -- the workflow's own values and the values ``raw`` overrides set, since the guide
says a media ``name`` "becomes the filename seen by LoadImage nodes" -- are pointed there, so
two jobs sending ``input.png`` never overwrite each other; the folder is removed when the job
ends (or at once when the request is refused, or at the next start after a crash). Both modes
share one preparation, :func:`prepare_workflow`, with a :class:`MediaSink` for where the media
go.

With JOB_QUEUE_URL every route goes through the shared queue: any replica runs the job and
answers for it, the webhook is sent once by whichever replica ends the job (see
:mod:`comfy_sidecar.jobs.after`), and the media travel in the request instead of a folder on
the receiving replica's disk: each item (and each ``image_base64``/``image_url`` override)
becomes the value of the workflow inputs that name it, a ``data:`` URL (its MIME type from the
item's name) or its URL, which the claiming replica's preprocessing writes or downloads into
``INPUT_DIR/.comfy-sidecar/`` as for ``/prompt``. So in queue mode a media item may only feed
media inputs (``image`` of any node, ``video``/``file`` of the video loaders, ``audio`` of the
audio loaders): naming it in another input is a 400 at ``media.N.name`` (at
``inputs.N.value`` when a ``raw`` override sets that input to its name); an override of type
``image_*`` must set such an input (400 at ``inputs.N.field``); an item given by ``url`` is
not held to the 50 MB limit; ``estimated_time`` is null.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
from litestar import delete, get, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from msgspec import Meta

from comfy_sidecar.errors import InputError, SidecarError
from comfy_sidecar.jobs.after import AfterEnd
from comfy_sidecar.jobs.runner import JobService, mime_type_of
from comfy_sidecar.jobs.shared import SharedJobs
from comfy_sidecar.jobs.store import JobRecord, JobStatus, iso, now_ms
from comfy_sidecar.pipeline.media import decode_base64, sniff_extension
from comfy_sidecar.pipeline.preprocess import (
    INPUTS_SUBDIR,
    MAX_INPUT_NAME_BYTES,
    media_fields,
    write_input,
)
from comfy_sidecar.routes.adapters import (
    estimated_wait_s,
    message_of,
    new_job_id,
    outputs_with_data,
    prompt_request,
    shared_view,
    submit,
    submit_shared,
)
from comfy_sidecar.routes.jobs import job_of, shared_with_data
from comfy_sidecar.routes.prompt import ERROR_RESPONSES
from comfy_sidecar.schemas import ErrorResponse

if TYPE_CHECKING:
    from comfy_sidecar.service import Sidecar
    from comfy_sidecar.storage.cache import Lease

log = logging.getLogger("comfy_sidecar.jobs")

#: Most ``media`` items per job, and most bytes per item (the guide's limits).
MAX_MEDIA_ITEMS = 10
MAX_MEDIA_BYTES = 50 * 1024 * 1024

#: Our status -> the Modal jobs API's.
MODAL_STATUS = {
    JobStatus.PENDING: "queued",
    JobStatus.IN_PROGRESS: "running",
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "failed",
    JobStatus.TIMED_OUT: "failed",
}

PROGRESS_FIELDS = (
    "progress",
    "progress_value",
    "progress_max",
    "nodes_total",
    "nodes_done",
    "nodes_cached",
    "current_node",
    "current_node_type",
    "queue_position",
    "prompt_id",
    "last_event_time",
)


class InputOverride(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Set ``workflow[node].inputs[field]`` before the job runs. ``image_base64``: ``value``
    is base64 (or a ``data:`` URL) of an image, written into the job's media folder;
    ``image_url``: ``value`` is a URL downloaded there; ``raw``: ``value`` as it is."""

    node: Annotated[str | int, Meta(description="Node id (a number is made a string).")]
    field: str
    value: Any = None
    type: Literal["raw", "image_base64", "image_url"] = "raw"


class MediaItem(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A file the workflow names: ``data`` (base64) or ``url``; at most 50 MB."""

    name: Annotated[
        str,
        Meta(
            description="File name the workflow's inputs use, no folders, at most "
            f"{MAX_INPUT_NAME_BYTES} bytes (UTF-8)."
        ),
    ]
    data: str | None = None
    url: str | None = None


class ModalJobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/jobs``."""

    workflow: Annotated[dict[str, Any], Meta(description="ComfyUI API-format workflow.")]
    inputs: list[InputOverride] = []
    media: Annotated[list[MediaItem], Meta(max_length=MAX_MEDIA_ITEMS)] = []
    webhook_url: Annotated[str | None, Meta(description="Gets `job.completed` / `job.failed`.")] = (
        None
    )
    priority: Annotated[int, Meta(description="Reserved; accepted and ignored.")] = 0


class ModalJobAccepted(msgspec.Struct, kw_only=True):
    """``POST /v1/jobs`` answer. ``estimated_time``: seconds, from recent jobs (None before
    any job ran)."""

    job_id: str
    status: str
    created_at: str
    estimated_time: int | None


class ModalCancelled(msgspec.Struct, kw_only=True):
    """``DELETE /v1/jobs/{id}`` answer."""

    job_id: str
    status: str
    message: str


class ModalJobList(msgspec.Struct, kw_only=True):
    """``GET /v1/jobs``: newest first."""

    jobs: list[dict[str, Any]]


class MediaFolder:
    """In-process mode's :class:`MediaSink`: one job's ``INPUT_DIR/.comfy-sidecar/<job
    id>-media/`` folder, holding its media items and image overrides; a value fed from it
    is the file's name relative to INPUT_DIR, which any input may take."""

    def __init__(self, sidecar: Sidecar, job_id: str) -> None:
        self.input_dir = Path(sidecar.settings.input_dir)
        self.name = f"{INPUTS_SUBDIR}/{job_id}-media"
        self.path = self.input_dir / self.name
        self.sidecar = sidecar
        self._lease: Lease | None = None
        self._counter = 0

    def _staging(self) -> Any:
        from comfy_sidecar.pipeline.run import JobStaging

        if self._lease is None:
            self._lease = self.sidecar.storage.lease()
        return JobStaging(self.sidecar.storage, None, self._lease, self.sidecar.settings)

    def _write(self, name: str, data: bytes, location: str) -> str:
        self.path.mkdir(parents=True, exist_ok=True)
        write_input(self.path / name, data, location)
        return f"{self.name}/{name}"

    async def _download(self, url: str, location: str) -> str:
        """Download ``url`` through the storage layer into the folder; its name there."""
        self._counter += 1
        self.path.mkdir(parents=True, exist_ok=True)
        staged: str = await self._staging().input(
            url, f"{self.name}/.download-{self._counter}", location
        )
        if (self.input_dir / staged).stat().st_size > MAX_MEDIA_BYTES:
            raise InputError(f"larger than {MAX_MEDIA_BYTES} bytes", location)
        return staged

    async def media(self, index: int, item: MediaItem, name: str) -> str:
        """Write media item ``index`` as ``<folder>/<name>``; returns that name."""
        where = f"media.{index}"
        if item.url is not None:
            staged = await self._download(item.url, f"{where}.url")
            os.replace(self.input_dir / staged, self.path / name)
            return f"{self.name}/{name}"
        assert item.data is not None
        return self._write(name, _decode(item.data, f"{where}.data"), f"{where}.data")

    async def image(self, index: int, override: InputOverride, value: str) -> str:
        """The image of an ``image_base64``/``image_url`` override, in the folder; its name."""
        where = f"inputs.{index}.value"
        if override.type == "image_url":
            return await self._download(value, where)
        data = _decode(value, where)
        ext = sniff_extension(data[:64])
        if ext is None:
            raise InputError("decoded the base64 but it is not an image", where)
        return self._write(f"input-{index}.{ext}", data, where)

    def check_feeds(
        self, workflow: dict[str, Any], node: str, field: str, location: str, what: str
    ) -> None:
        """Any input may take a file name: nothing to refuse."""

    def remove(self) -> None:
        """Delete the folder and end the download lease (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lease is not None:
            self._lease.release()
            self._lease = None


class InlineMedia:
    """Queue mode's :class:`MediaSink`: nothing is written on the receiving replica; a value
    fed from a media item or an image override is a ``data:`` URL (its MIME type from the
    item's name) or the item's URL, which the claiming replica's preprocessing writes or
    downloads as for ``/prompt`` -- so only a media input (:func:`media_fields`) may take it."""

    async def media(self, index: int, item: MediaItem, name: str) -> str:
        """Media item ``index`` as a value: its URL, or its ``data`` as a ``data:`` URL."""
        if item.url is not None:
            return item.url
        assert item.data is not None
        return _data_url(name, _decode(item.data, f"media.{index}.data"))

    async def image(self, index: int, override: InputOverride, value: str) -> str:
        """An ``image_base64`` override's image as a ``data:`` URL; an ``image_url``'s URL."""
        where = f"inputs.{index}.value"
        if override.type == "image_url":
            return value
        raw = _decode(value, where)
        ext = sniff_extension(raw[:64])
        if ext is None:
            raise InputError("decoded the base64 but it is not an image", where)
        return _data_url(f"input.{ext}", raw)

    def check_feeds(
        self, workflow: dict[str, Any], node: str, field: str, location: str, what: str
    ) -> None:
        """:class:`InputError` at ``location`` unless ``workflow[node].inputs[field]`` (set
        already) is a media input, the only kind preprocessing resolves a URL in."""
        entry = workflow[node]
        if field not in media_fields(str(entry.get("class_type", "")), entry["inputs"]):
            raise InputError(
                f"with JOB_QUEUE_URL {what} can only feed a media input (image; video or file "
                "of a video loader; audio of an audio loader)",
                location,
            )


class MediaSink(Protocol):
    """Where one job's ``media`` items and ``image_*`` overrides go, and what the workflow's
    inputs get instead: :class:`MediaFolder` (in-process) or :class:`InlineMedia` (queue
    mode). Each method raises :class:`InputError` naming ``media.N.*`` or ``inputs.N.*``."""

    async def media(self, index: int, item: MediaItem, name: str) -> str:
        """The value of the inputs naming media item ``index`` (called ``name``)."""
        ...

    async def image(self, index: int, override: InputOverride, value: str) -> str:
        """The value an ``image_base64`` / ``image_url`` override ``index`` sets."""
        ...

    def check_feeds(
        self, workflow: dict[str, Any], node: str, field: str, location: str, what: str
    ) -> None:
        """Refuse (at ``location``) a value from a media item or an image override (``what``)
        in ``workflow[node].inputs[field]``, when this sink's values cannot feed it."""
        ...


def check_media_item(index: int, item: MediaItem) -> str:
    """Media item ``index``'s name; :class:`InputError` at ``media.N.name`` when it is not a
    plain file name or is longer than :data:`MAX_INPUT_NAME_BYTES` UTF-8 bytes (NAME_MAX once
    the atomic writer's ``.part`` is added; checked in queue mode too, where the name is
    only a key), at ``media.N`` unless exactly one of ``data`` and ``url`` is given."""
    name = item.name
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise InputError("must be a file name without folders", f"media.{index}.name")
    if len(name.encode()) > MAX_INPUT_NAME_BYTES:
        raise InputError(
            f"too long: at most {MAX_INPUT_NAME_BYTES} bytes (UTF-8)", f"media.{index}.name"
        )
    if (item.data is None) == (item.url is None):
        raise InputError("give exactly one of `data` and `url`", f"media.{index}")
    return name


def _decode(value: str, location: str) -> bytes:
    """Base64 (or a ``data:...;base64,`` URL) of at most MAX_MEDIA_BYTES bytes."""
    if value.startswith("data:") and ";base64," in value[:200]:
        value = value.split(",", 1)[1]
    if len(value) > (MAX_MEDIA_BYTES // 3 + 1) * 4 + 1024:
        raise InputError(f"larger than {MAX_MEDIA_BYTES} bytes", location)
    data = decode_base64(value)
    if data is None:
        raise InputError("not valid base64", location)
    if len(data) > MAX_MEDIA_BYTES:
        raise InputError(f"larger than {MAX_MEDIA_BYTES} bytes", location)
    return data


def _node_inputs(workflow: dict[str, Any], node: str, location: str) -> dict[str, Any]:
    entry = workflow.get(node)
    if not isinstance(entry, dict):
        raise InputError(f"the workflow has no node {node!r}", location)
    inputs = entry.setdefault("inputs", {})
    if not isinstance(inputs, dict):
        raise InputError(f"node {node!r} has no inputs object", location)
    return inputs


async def prepare_workflow(
    data: ModalJobRequest, sink: MediaSink
) -> tuple[dict[str, Any], dict[str, str]]:
    """The workflow with its media and overrides applied, and where each value fed from a
    media item or an image override came from (``workflow.<node>.inputs.<field>`` ->
    ``media.N`` or ``inputs.N.value``).

    Every input equal to a media item's ``name`` -- in the workflow or set by a ``raw``
    override, as the guide's "becomes the filename seen by LoadImage nodes" allows -- gets
    the sink's value for that item; the overrides apply in order, after the workflow's own
    values were mapped. Raises :class:`InputError` naming ``workflow``, ``inputs.N.*`` or
    ``media.N.*``."""
    workflow = msgspec.json.decode(msgspec.json.encode(data.workflow))  # a copy
    if not isinstance(workflow, dict) or not workflow:
        raise InputError("Invalid workflow format: must be a non-empty JSON object", "workflow")
    targets = [
        _node_inputs(workflow, str(o.node), f"inputs.{i}.node") for i, o in enumerate(data.inputs)
    ]
    fed: dict[str, tuple[int, str]] = {}  # media name -> (its index, the value it becomes)
    for index, item in enumerate(data.media):
        name = check_media_item(index, item)
        if name in fed:
            raise InputError("a media item with this name came earlier", f"media.{index}.name")
        fed[name] = (index, await sink.media(index, item, name))
    origins: dict[str, str] = {}
    for node_id, node in workflow.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for key, value in list(inputs.items()):
            if isinstance(value, str) and value in fed:
                index, inlined = fed[value]
                sink.check_feeds(workflow, node_id, key, f"media.{index}.name", "a media item")
                inputs[key] = inlined
                origins[f"workflow.{node_id}.inputs.{key}"] = f"media.{index}"
    for index, (override, inputs) in enumerate(zip(data.inputs, targets, strict=True)):
        node, field, value = str(override.node), override.field, override.value
        target, where = f"workflow.{node}.inputs.{field}", f"inputs.{index}.value"
        inputs[field] = value
        origins.pop(target, None)
        if override.type == "raw":
            if isinstance(value, str) and value in fed:
                media, inlined = fed[value]
                sink.check_feeds(workflow, node, field, where, "a media item")
                inputs[field] = inlined
                origins[target] = f"media.{media}"
            continue
        if not isinstance(value, str):
            raise InputError("expected a string", where)
        inputs[field] = await sink.image(index, override, value)
        sink.check_feeds(
            workflow, node, field, f"inputs.{index}.field", f"an {override.type} input"
        )
        origins[target] = where
    return workflow, origins


def _data_url(name: str, data: bytes) -> str:
    """Media ``data`` (decoded by :func:`_decode`) as a ``data:`` URL whose MIME type comes
    from ``name`` (:func:`~comfy_sidecar.jobs.runner.mime_type_of`; ``application/octet-stream``
    when unknown: the bytes decide)."""
    return f"data:{mime_type_of(name)};base64,{base64.b64encode(data).decode('ascii')}"


async def _submit_shared(data: ModalJobRequest, shared: SharedJobs) -> ModalJobAccepted:
    """``POST /v1/jobs`` in queue mode: media inline, the webhook stored with the job."""
    workflow, origins = await prepare_workflow(data, InlineMedia())
    request = prompt_request(workflow, new_job_id(), "workflow")
    after = None
    if data.webhook_url is not None:
        after = AfterEnd(kind="modal_jobs", url=data.webhook_url)
    try:
        view = await submit_shared(
            shared, request, "modal_jobs", "workflow", data.webhook_url, after=after
        )
    except SidecarError as exc:  # name the media item, not the input it fed
        where = exc.location or ""
        for field, origin in origins.items():
            if where == field or where.startswith(field + "."):
                exc.location = origin
        raise
    return ModalJobAccepted(
        job_id=view["id"],
        status=MODAL_STATUS[JobStatus(view["status"])],
        created_at=view.get("created_at") or "",
        estimated_time=None,
    )


@post(
    "/v1/jobs",
    summary="Submit a job (Modal jobs API)",
    tags=["modal jobs"],
    status_code=200,
    responses={
        200: ResponseSpec(ModalJobAccepted, description="Queued."),
        400: ERROR_RESPONSES[400],
        503: ERROR_RESPONSES[503],
    },
    description="`{workflow, inputs[], media[], webhook_url, priority}`: `inputs` override "
    "node inputs (`raw`, `image_base64`, `image_url`), `media` (at most 10, 50 MB each) are "
    "files the workflow names. Checked before the answer: a bad field is a 400 naming it.",
)
async def submit_modal_job(
    data: ModalJobRequest, jobs: JobService, state: State
) -> ModalJobAccepted:
    """Submit a job."""
    if data.webhook_url is not None:  # in both modes: the check /jobs' webhook_v2 gets
        await state.sidecar.storage.check_webhook(data.webhook_url, "webhook_url")
    if jobs.shared is not None:  # queue mode: any replica runs it
        return await _submit_shared(data, jobs.shared)
    job_id = new_job_id()
    folder = MediaFolder(state.sidecar, job_id)
    try:
        workflow, _ = await prepare_workflow(data, folder)
        request = prompt_request(workflow, job_id, "workflow")
        record = await submit(jobs, request, "modal_jobs", "workflow", data.webhook_url)
    except BaseException:
        folder.remove()
        raise
    jobs.when_ended(record, _on_end(state.sidecar, folder, data.webhook_url))
    return ModalJobAccepted(
        job_id=record.id,
        status=MODAL_STATUS[record.status],
        created_at=iso(record.created_ms) or "",
        estimated_time=estimated_wait_s(jobs.store, record),
    )


def _on_end(sidecar: Sidecar, folder: MediaFolder, webhook_url: str | None) -> Any:
    async def ended(record: JobRecord) -> None:
        folder.remove()
        if webhook_url is None:
            return
        after = AfterEnd(kind="modal_jobs", url=webhook_url)
        body = webhook_body(record.view(), after)
        await sidecar.webhooks.send_prompt(webhook_url, body, record.id, order_key=record.id)

    return ended


def webhook_body(view: dict[str, Any], after: AfterEnd) -> dict[str, Any]:
    """``job.completed`` / ``job.failed`` (``{event, job_id, timestamp[, error]}``) of a job
    whose final ``GET /jobs/{id}`` body is ``view`` (queue mode's
    :class:`~comfy_sidecar.jobs.after.Format`; ``after`` adds nothing here)."""
    status = JobStatus(view["status"])
    body: dict[str, Any] = {
        "event": "job.completed" if status is JobStatus.COMPLETED else "job.failed",
        "job_id": view["id"],
        "timestamp": view.get("completed_at") or iso(now_ms()),
    }
    if status is not JobStatus.COMPLETED:
        body["error"] = message_of(status, view.get("error"))
    return body


def modal_body(view: dict[str, Any]) -> dict[str, Any]:
    """A job's ``GET /jobs/{id}`` body under the Modal jobs API's names (without outputs)."""
    status = JobStatus(view["status"])
    body: dict[str, Any] = {
        "job_id": view["id"],
        "status": MODAL_STATUS[status],
        "created_at": view["created_at"],
        "started_at": view["started_at"],
        "completed_at": view["completed_at"],
    }
    body.update({name: view.get(name) for name in PROGRESS_FIELDS})
    if status.terminal and status is not JobStatus.COMPLETED:
        body["error"] = message_of(status, view.get("error"))
        body["error_log_tail"] = (view.get("error") or {}).get("comfyui_log_tail") or []
    return body


def modal_view(jobs: JobService, record: JobRecord) -> dict[str, Any]:
    """A job of this replica's store under the Modal jobs API's names (without outputs)."""
    return modal_body(jobs.store.view(record))


def _modal_output(output: dict[str, Any], data: str | None) -> dict[str, Any]:
    return {
        "filename": output["filename"],
        "type": output["media_type"],
        "mime_type": output["mime_type"],
        "size_bytes": output["size_bytes"],
        "node_id": output["node_id"],
        "url": output["url"],
        "data": data,
    }


@get(
    "/v1/jobs/{job_id:str}",
    summary="A job's status, progress and outputs (Modal jobs API)",
    tags=["modal jobs"],
    responses={404: ResponseSpec(ErrorResponse, description="No such job is retained.")},
    description="Status `queued | running | completed | failed`, the progress fields, and once "
    "completed `outputs` with base64 `data` (`filename`, `type`, `size_bytes`, `node_id`); a "
    "failed job has `error` (`Cancelled by user` for a cancel) and `error_log_tail`.",
)
async def get_modal_job(job_id: str, jobs: JobService) -> dict[str, Any]:
    """Job status."""
    if jobs.shared is not None:
        return await _shared_job(jobs.shared, job_id)
    record = job_of(jobs, job_id)
    body = modal_view(jobs, record)
    if record.status is JobStatus.COMPLETED:
        body["outputs"] = [
            _modal_output(output, output.get("data"))
            for output in await outputs_with_data(jobs, record)
        ]
    return body


async def _shared_job(shared: SharedJobs, job_id: str) -> dict[str, Any]:
    """``GET /v1/jobs/{id}`` of a job in the shared queue, from any replica: outputs kept
    inline in Redis get their ``data``; those uploaded (JOB_OUTPUT_URL) only their ``url``."""
    view = await shared_view(shared, job_id)
    body = modal_body(view)
    if view["status"] == JobStatus.COMPLETED.value:
        outputs = (await shared_with_data(shared, job_id, view)).get("outputs") or []
        body["outputs"] = [_modal_output(output, output.get("data")) for output in outputs]
    return body


@delete(
    "/v1/jobs/{job_id:str}",
    summary="Cancel a job (Modal jobs API)",
    tags=["modal jobs"],
    status_code=200,
    responses={404: ResponseSpec(ErrorResponse, description="No such job is retained.")},
    description="A queued job leaves ComfyUI's queue, a running one is interrupted; it ends "
    "`failed` with `Cancelled by user` (and `job.failed` goes to its webhook). A job that "
    "already ended answers 200 saying so.",
)
async def cancel_modal_job(job_id: str, jobs: JobService) -> ModalCancelled:
    """Cancel a job."""
    if jobs.shared is not None:
        view = await shared_view(jobs.shared, job_id)
        status = JobStatus(view["status"])
        if status.terminal:
            message = f"job already finalised ({MODAL_STATUS[status]})"
        else:
            _, ended = await jobs.shared.cancel(job_id, view)
            status = JobStatus(ended)
            message = "Cancelled by user"
        return ModalCancelled(job_id=job_id, status=MODAL_STATUS[status], message=message)
    record = job_of(jobs, job_id)
    if record.status.terminal:
        message = f"job already finalised ({MODAL_STATUS[record.status]})"
    else:
        await jobs.cancel(record)
        message = "Cancelled by user"
    return ModalCancelled(job_id=record.id, status=MODAL_STATUS[record.status], message=message)


@get(
    "/v1/jobs",
    summary="List jobs (Modal jobs API)",
    tags=["modal jobs"],
    responses={400: ERROR_RESPONSES[400]},
    description="Newest first: `job_id`, `status`, `created_at`, `progress`.",
)
async def list_modal_jobs(
    jobs: JobService,
    status: Annotated[
        Literal["queued", "running", "completed", "failed"] | None,
        Parameter(description="Only jobs with this status."),
    ] = None,
    limit: Annotated[int, Parameter(ge=1, le=1000, description="At most this many.")] = 50,
) -> ModalJobList:
    """List jobs."""
    if jobs.shared is not None:
        return await _shared_list(jobs.shared, status, limit)
    jobs.store.expire()
    found: list[dict[str, Any]] = []
    for record in reversed(list(jobs.store)):
        modal_status = MODAL_STATUS[record.status]
        if status is not None and modal_status != status:
            continue
        progress = round(record.progress.percent, 2) if record.progress is not None else 0.0
        if record.status is JobStatus.COMPLETED:
            progress = 100.0
        found.append(
            {
                "job_id": record.id,
                "status": modal_status,
                "created_at": iso(record.created_ms),
                "progress": progress,
            }
        )
        if len(found) >= limit:
            break
    return ModalJobList(jobs=found)


async def _shared_list(shared: SharedJobs, status: str | None, limit: int) -> ModalJobList:
    """``GET /v1/jobs`` over the shared queue: every replica's jobs, newest first."""
    found: list[dict[str, Any]] = []
    cursor: int | None = None
    while len(found) < limit:
        views, cursor = await shared.page(None, limit, cursor)
        for view in views:
            job_status = JobStatus(view["status"])
            modal_status = MODAL_STATUS[job_status]
            if status is not None and modal_status != status:
                continue
            progress = 100.0 if job_status is JobStatus.COMPLETED else view.get("progress") or 0.0
            found.append(
                {
                    "job_id": view["id"],
                    "status": modal_status,
                    "created_at": view.get("created_at"),
                    "progress": progress,
                }
            )
        if cursor is None:
            break
    return ModalJobList(jobs=found[:limit])


ROUTES = [submit_modal_job, get_modal_job, cancel_modal_job, list_modal_jobs]
