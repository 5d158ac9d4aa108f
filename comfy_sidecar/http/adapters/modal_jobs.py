"""The Modal jobs API (``/v1/jobs``), over the same jobs as ``/jobs``.

Copies the "ComfyUI Modal API" operator guide: ``POST /v1/jobs {workflow, inputs[], media[],
webhook_url, priority}`` answers ``{job_id, status: "queued", created_at, estimated_time}``;
``GET /v1/jobs/{id}`` gives status and progress under its names and, once completed, the outputs
with base64 ``data``; ``DELETE /v1/jobs/{id}`` cancels (the job ends ``failed`` with ``Cancelled
by user``); ``GET /v1/jobs?status=&limit=`` lists newest first. Its status names map ours:
pending → queued, in_progress → running, completed, and failed, cancelled, timed_out → failed.
Webhooks ``job.completed`` and ``job.failed`` (``{event, job_id, timestamp[, error]}``, no
outputs) go to ``webhook_url`` through the webhook dispatcher when the job ends.

Unlike Modal, each job's ``media`` (and ``image_base64``/``image_url`` overrides) are staged
for that job alone (:mod:`comfy_sidecar.pipeline.staging`): in-process, written into
``INPUT_DIR/.comfy-sidecar/<job id>-media/``, so two jobs sending ``input.png`` never overwrite
each other, the folder removed when the job ends (or at once when the request is refused, or
at the next start after a crash). The inputs naming a media item -- the workflow's own values
and the values ``raw`` overrides set, since the guide says a media ``name`` "becomes the
filename seen by LoadImage nodes" -- get the staged file's value.

With JOB_QUEUE_URL any replica runs the job and answers for it, the webhook is sent once by
whichever replica ends the job, and the media travel in the request instead of a folder on the
receiving replica's disk: each item (and each ``image_base64``/``image_url`` override) becomes
the value of the workflow inputs that name it, a ``data:`` URL (its MIME type from the item's
name) or its URL, which the claiming replica's preprocessing writes or downloads into
``INPUT_DIR/.comfy-sidecar/`` as for ``/prompt``. So in queue mode a media item may only feed
media inputs (``image`` of any node, ``video``/``file`` of the video loaders, ``audio`` of the
audio loaders): naming it in another input is a 400 at ``media.N.name`` (at ``inputs.N.value``
when a ``raw`` override sets that input to its name); an override of type ``image_*`` must set
such an input (400 at ``inputs.N.field``); an item given by ``url`` is not held to the 50 MB
limit; ``estimated_time`` is null.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import msgspec
from litestar import delete, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from msgspec import Meta

from comfy_sidecar.errors import InputError, SidecarError
from comfy_sidecar.http.adapters.common import new_job_id, outputs_with_data, prompt_request, submit
from comfy_sidecar.http.routes.jobs import view_of
from comfy_sidecar.http.routes.prompt import ERROR_RESPONSES
from comfy_sidecar.jobs.backend import JobBackend
from comfy_sidecar.jobs.model import JobStatus, JobView
from comfy_sidecar.jobs.spec import AfterEnd
from comfy_sidecar.pipeline.media import decode_base64, sniff_extension
from comfy_sidecar.pipeline.preprocess import MAX_INPUT_NAME_BYTES
from comfy_sidecar.pipeline.staging import StagedFiles, Staging
from comfy_sidecar.schemas import ErrorResponse
from comfy_sidecar.webhooks.adapters import MODAL_STATUS, message_of

log = logging.getLogger("comfy_sidecar.jobs")

#: Most ``media`` items per job, and most bytes per item (the guide's limits).
MAX_MEDIA_ITEMS = 10
MAX_MEDIA_BYTES = 50 * 1024 * 1024

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


async def _media(staged: StagedFiles, index: int, item: MediaItem, name: str) -> str:
    """Media item ``index`` staged; the value of the inputs naming it."""
    where = f"media.{index}"
    if item.url is not None:
        return await staged.url(item.url, f"{where}.url", MAX_MEDIA_BYTES)
    assert item.data is not None
    return await staged.file(name, _decode(item.data, f"{where}.data"), f"{where}.data")


async def _image(staged: StagedFiles, index: int, override: InputOverride, value: str) -> str:
    """The image of an ``image_base64``/``image_url`` override staged; the value it sets."""
    where = f"inputs.{index}.value"
    if override.type == "image_url":
        return await staged.url(value, where, MAX_MEDIA_BYTES)
    data = _decode(value, where)
    ext = sniff_extension(data[:64])
    if ext is None:
        raise InputError("decoded the base64 but it is not an image", where)
    return await staged.file(f"input-{index}.{ext}", data, where)


async def prepare_workflow(
    data: ModalJobRequest, staged: StagedFiles
) -> tuple[dict[str, Any], dict[str, str]]:
    """The workflow with its media and overrides applied, and where each value fed from a
    media item or an image override came from (``workflow.<node>.inputs.<field>`` ->
    ``media.N`` or ``inputs.N.value``).

    Every input equal to a media item's ``name`` -- in the workflow or set by a ``raw``
    override, as the guide's "becomes the filename seen by LoadImage nodes" allows -- gets
    the staged value for that item; the overrides apply in order, after the workflow's own
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
        fed[name] = (index, await _media(staged, index, item, name))
    origins: dict[str, str] = {}
    for node_id, node in workflow.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for key, value in list(inputs.items()):
            if isinstance(value, str) and value in fed:
                index, inlined = fed[value]
                staged.check_feeds(workflow, node_id, key, f"media.{index}.name", "a media item")
                inputs[key] = inlined
                origins[f"workflow.{node_id}.inputs.{key}"] = f"media.{index}"
    for index, (override, inputs) in enumerate(zip(data.inputs, targets, strict=True)):
        node, field, value = str(override.node), override.field, override.value
        target = f"workflow.{node}.inputs.{field}"
        inputs[field] = value
        origins.pop(target, None)
        if override.type == "raw":
            if isinstance(value, str) and value in fed:
                media, inlined = fed[value]
                where = f"inputs.{index}.value"
                staged.check_feeds(workflow, node, field, where, "a media item")
                inputs[field] = inlined
                origins[target] = f"media.{media}"
            continue
        where = f"inputs.{index}.value"
        if not isinstance(value, str):
            raise InputError("expected a string", where)
        inputs[field] = await _image(staged, index, override, value)
        staged.check_feeds(
            workflow, node, field, f"inputs.{index}.field", f"an {override.type} input"
        )
        origins[target] = where
    return workflow, origins


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
    data: ModalJobRequest, jobs: NamedDependency[JobBackend], staging: NamedDependency[Staging]
) -> ModalJobAccepted:
    """Submit a job: its media staged for it, its webhook sent by whichever replica ends it."""
    job_id = new_job_id()
    staged = staging.for_job(job_id)
    after = None if data.webhook_url is None else AfterEnd(kind="modal_jobs", url=data.webhook_url)
    try:
        workflow, origins = await prepare_workflow(data, staged)
        request = prompt_request(workflow, job_id, "workflow")
        try:
            view = await submit(
                jobs, request, "modal_jobs", "workflow", data.webhook_url, after=after
            )
        except SidecarError as exc:  # name the media item, not the input it fed
            where = exc.location or ""
            for field, origin in origins.items():
                if where == field or where.startswith(field + "."):
                    exc.location = origin
            raise
    except BaseException:
        staged.discard()
        raise
    return ModalJobAccepted(
        job_id=view.id,
        status=MODAL_STATUS[view.status],
        created_at=view.created_at or "",
        estimated_time=await jobs.estimate(view.id),
    )


def modal_body(view: JobView) -> dict[str, Any]:
    """A job's view under the Modal jobs API's names (without outputs)."""
    body: dict[str, Any] = {
        "job_id": view.id,
        "status": MODAL_STATUS[view.status],
        "created_at": view.created_at,
        "started_at": view.started_at,
        "completed_at": view.completed_at,
    }
    plain = view.body()
    body.update({name: plain.get(name) for name in PROGRESS_FIELDS})
    if view.ended and view.status is not JobStatus.COMPLETED:
        body["error"] = message_of(view.status, view.error)
        body["error_log_tail"] = (view.error or {}).get("comfyui_log_tail") or []
    return body


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
async def get_modal_job(job_id: str, jobs: NamedDependency[JobBackend]) -> dict[str, Any]:
    """Job status: outputs kept for the job get their ``data``; those uploaded elsewhere
    (JOB_OUTPUT_URL) only their ``url``."""
    view = await view_of(jobs, job_id)
    body = modal_body(view)
    if view.status is JobStatus.COMPLETED:
        body["outputs"] = [
            _modal_output(output, output.get("data"))
            for output in await outputs_with_data(jobs, view)
        ]
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
async def cancel_modal_job(job_id: str, jobs: NamedDependency[JobBackend]) -> ModalCancelled:
    """Cancel a job."""
    view = await view_of(jobs, job_id)
    if view.ended:
        message = f"job already finalised ({MODAL_STATUS[view.status]})"
        return ModalCancelled(job_id=job_id, status=MODAL_STATUS[view.status], message=message)
    outcome = await jobs.cancel(job_id)
    if outcome is not None:
        view = outcome[1]
    return ModalCancelled(
        job_id=job_id, status=MODAL_STATUS[view.status], message="Cancelled by user"
    )


@get(
    "/v1/jobs",
    summary="List jobs (Modal jobs API)",
    tags=["modal jobs"],
    responses={400: ERROR_RESPONSES[400]},
    description="Newest first: `job_id`, `status`, `created_at`, `progress`.",
)
async def list_modal_jobs(
    jobs: NamedDependency[JobBackend],
    status: Annotated[
        Literal["queued", "running", "completed", "failed"] | None,
        Parameter(description="Only jobs with this status."),
    ] = None,
    limit: Annotated[int, Parameter(ge=1, le=1000, description="At most this many.")] = 50,
) -> ModalJobList:
    """List jobs, newest first."""
    found: list[dict[str, Any]] = []
    cursor: int | None = None
    while len(found) < limit:
        views, cursor = await jobs.page(None, limit, cursor)
        for view in views:
            modal_status = MODAL_STATUS[view.status]
            if status is not None and modal_status != status:
                continue
            progress = 100.0 if view.status is JobStatus.COMPLETED else view.progress or 0.0
            found.append(
                {
                    "job_id": view.id,
                    "status": modal_status,
                    "created_at": view.created_at,
                    "progress": progress,
                }
            )
        if cursor is None:
            break
    return ModalJobList(jobs=found[:limit])


ROUTES = [submit_modal_job, get_modal_job, cancel_modal_job, list_modal_jobs]
