"""Comfy API v2 jobs (``/api/v2/jobs``), as comfy-sdk 0.5.0 calls them (``comfy_low/transport.py``
``post_jobs``, ``list_jobs``, ``get_job``, ``get_job_workflow``, ``cancel_job``,
``get_job_events``): a thin adapter over the job model. A request becomes a
:class:`~comfy_sidecar.jobs.spec.JobSpec` (endpoint ``comfy_v2``), a
:class:`~comfy_sidecar.jobs.model.JobView` becomes a v2 ``Job`` (:mod:`.views`); whichever
backend runs (in-process, or Redis with JOB_QUEUE_URL), every route answers from any replica.

- ``POST /jobs`` ``{workflow, extra_data?, metadata?}`` -> 201 ``Job``. The workflow is checked
  (a UI-format graph is 422 ``workflow_format_ui``; a node that is not ``{class_type, inputs}``,
  no output node, a bad media input: 422 ``invalid_workflow``), its ``core/ASSET`` references
  resolved (``asset_inputs``; 422 ``missing_asset``), ``metadata`` checked (422
  ``metadata_invalid``), then the job is submitted: ``Idempotency-Key`` single-use for 24 h on
  every replica (422 ``idempotency_key_reuse``, no second job), MAX_QUEUE_DEPTH (429
  ``queue_full`` with ``Retry-After``). ``extra_data.api_key_comfy_org`` goes to ComfyUI's
  ``extra_data`` for partner nodes, never into the job's body, its events or a log.
- ``GET /jobs?limit=&cursor=&metadata[k]=v`` -> ``{jobs, next_cursor}``, newest first, v2
  jobs only.
- ``GET /jobs/{id}``, ``GET /jobs/{id}/workflow`` -> ``{workflow, format: "api"}`` (the graph
  as submitted, ``core/ASSET`` references replaced by the staged file names),
  ``POST /jobs/{id}/cancel`` (idempotent; an ended job answers itself, a running one
  ``canceling`` until it stops).
- ``GET /jobs/{id}/events``: Server-Sent Events ``status``, ``progress``, ``output``, ``log``
  and, with ``?previews=true``, ``preview`` (throttled); a comment every 15 s keeps the
  connection; ``Last-Event-ID`` resumes after that event; the stream ends after the terminal
  ``status``.

Errors answer in the v2 envelope (:mod:`.errors`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from comfy_sidecar.assets.signing import UrlSigner
from comfy_sidecar.errors import NotFound, SidecarError
from comfy_sidecar.http.adapters.comfy_v2.assets import AssetInputs, origin_of
from comfy_sidecar.http.adapters.comfy_v2.errors import V2Error
from comfy_sidecar.http.adapters.comfy_v2.models import (
    ErrorEnvelope,
    Job,
    JobList,
    JobRequest,
    JobWorkflow,
    V2Status,
)
from comfy_sidecar.http.adapters.comfy_v2.views import (
    ENDPOINT,
    EventMapper,
    v2_job,
    v2_list_item,
)
from comfy_sidecar.http.adapters.common import fingerprint, prompt_request, relocate
from comfy_sidecar.http.idempotency import idempotency_key
from comfy_sidecar.http.routes.jobs import MAX_COUNTER_DIGITS
from comfy_sidecar.jobs.backend import JobBackend
from comfy_sidecar.jobs.model import JobView, OutputInfo
from comfy_sidecar.jobs.spec import JobSpec
from comfy_sidecar.schemas.secret import Secret

__all__ = ["ROUTES", "V2Options"]

TAGS = ["comfy api v2"]

#: Most labels of a job, and of a ``list`` filter.
MAX_LABELS = 16
#: Longest label key and value, in characters.
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 512

ERRORS = {
    401: ResponseSpec(ErrorEnvelope, description="`unauthorized`: no API key, or a wrong one."),
    404: ResponseSpec(ErrorEnvelope, description="`not_found`: no such v2 job is kept."),
    422: ResponseSpec(
        ErrorEnvelope,
        description="A caller's mistake (a body that is not JSON: `invalid_request` at "
        "`body`); `error.code` says which, `details` where.",
    ),
}


@dataclass(frozen=True)
class V2Options:
    """What the v2 job routes read of the settings: ``retention_s`` (JOB_RETENTION_S, for
    ``expires_at``), ``heartbeat_s`` (seconds between SSE keep-alive comments) and
    ``preview_interval_s`` (the least time between two ``preview`` events of a stream)."""

    retention_s: float
    heartbeat_s: float = 15.0
    preview_interval_s: float = 0.5


async def v2_view(jobs: JobBackend, job_id: str) -> JobView:
    """The kept v2 job ``job_id``'s view; 404 ``not_found`` for an unknown id or a job of
    another API."""
    view = await jobs.get(job_id)
    if view is None or view.endpoint != ENDPOINT:
        raise NotFound(f"no job with id {job_id!r}", location="id")
    return view


# --- checks ------------------------------------------------------------------------------------


def _printable(text: str) -> bool:
    return not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def check_workflow(workflow: Any) -> dict[str, Any]:
    """The workflow of a submission, an API-format graph. A UI-format graph (its ``nodes``
    and ``links`` arrays) is 422 ``workflow_format_ui``; anything but a non-empty object is
    422 ``invalid_workflow``."""
    if isinstance(workflow, dict) and (
        isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list)
    ):
        raise V2Error(
            422,
            "workflow_format_ui",
            "this is a UI-format workflow (its `nodes` and `links` arrays): export it with "
            '"Save (API Format)" and submit that graph',
            location="workflow",
        )
    if not isinstance(workflow, dict) or not workflow:
        raise V2Error(
            422,
            "invalid_workflow",
            "expected the API-format graph: an object of node id -> {class_type, inputs}",
            location="workflow",
        )
    return workflow


def _label_problem(key: Any, value: Any) -> str | None:
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_LABEL_KEY or not _printable(key):
        return f"keys are 1 to {MAX_LABEL_KEY} characters without control characters"
    if not isinstance(value, str):
        return "values are strings"
    if len(value) > MAX_LABEL_VALUE or not _printable(value):
        return f"values are at most {MAX_LABEL_VALUE} characters without control characters"
    return None


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """A submission's labels: an object of at most :data:`MAX_LABELS` string pairs (keys 1
    to 64 characters, values at most 512, no control characters). Anything else is 422
    ``metadata_invalid`` naming the key (``location`` ``metadata.<key>``) or the count."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise V2Error(
            422,
            "metadata_invalid",
            "metadata must be an object of string labels",
            location="metadata",
        )
    if len(metadata) > MAX_LABELS:
        raise V2Error(
            422,
            "metadata_invalid",
            f"metadata has {len(metadata)} pairs; at most {MAX_LABELS} are kept",
            location="metadata",
            count=len(metadata),
        )
    for key, value in metadata.items():
        problem = _label_problem(key, value)
        if problem is not None:
            raise V2Error(
                422,
                "metadata_invalid",
                f"metadata key {key!r}: {problem}",
                location=f"metadata.{key}",
                key=key,
            )
    return dict(metadata) or None


def label_filter(request: Request[Any, Any, Any]) -> dict[str, str] | None:
    """The ``metadata[<key>]=<value>`` pairs of a listing's query (comfy-sdk's ``deepObject``
    filter): at most :data:`MAX_LABELS`, one value per key, keys and values as
    :func:`check_metadata` takes them; else 422 ``invalid_metadata_filter``."""
    wanted: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if not name.startswith("metadata"):
            continue
        key = name[len("metadata[") : -1] if name.startswith("metadata[") else None
        if key is None or not name.endswith("]") or key in wanted:
            raise V2Error(
                422,
                "invalid_metadata_filter",
                "filter by labels as metadata[<key>]=<value>, each key once",
                location=name,
            )
        problem = _label_problem(key, value)
        if problem is not None:
            raise V2Error(422, "invalid_metadata_filter", problem, location=name)
        wanted[key] = value
    if len(wanted) > MAX_LABELS:
        raise V2Error(
            422,
            "invalid_metadata_filter",
            f"at most {MAX_LABELS} label filters",
            location="metadata",
        )
    return wanted or None


# --- routes ------------------------------------------------------------------------------------


@post(
    "/jobs",
    summary="Submit a job (Comfy API v2)",
    tags=TAGS,
    status_code=201,
    responses={
        201: ResponseSpec(Job, description="The job, `queued`; follow `urls`."),
        **ERRORS,
        429: ResponseSpec(
            ErrorEnvelope, description="`queue_full` (MAX_QUEUE_DEPTH), with `Retry-After`."
        ),
    },
    description="`{workflow, extra_data?, metadata?}`. The workflow is checked, its "
    "`core/ASSET` references resolved and its inputs prepared before the answer: a caller's "
    "mistake is a 422 (`invalid_workflow`, `workflow_format_ui`, `missing_asset`, "
    "`metadata_invalid`) and no job is made. `Idempotency-Key` is single-use for 24 h "
    "(`idempotency_key_reuse`). `extra_data.api_key_comfy_org` reaches ComfyUI's partner "
    "nodes and is never stored or shown.",
)
async def submit_v2_job(
    data: JobRequest,
    request: Request[Any, Any, Any],
    jobs: NamedDependency[JobBackend],
    signer: NamedDependency[UrlSigner],
    asset_inputs: NamedDependency[AssetInputs],
    v2_options: NamedDependency[V2Options],
) -> Response[Job]:
    """``POST /api/v2/jobs``."""
    workflow = check_workflow(data.workflow)
    metadata = check_metadata(data.metadata)
    key = idempotency_key(request.headers)
    job_id = str(uuid.uuid4())
    resolved = await asset_inputs.resolve(workflow, job_id)
    try:
        prompt = prompt_request(resolved, job_id, "workflow")
        spec = JobSpec(
            request=prompt,
            endpoint=ENDPOINT,
            fingerprint=fingerprint(prompt, metadata),
            metadata=metadata,
            idempotency_key=key,
            verdict=True,
            partner_key=None
            if data.extra_data is None
            else Secret(data.extra_data.api_key_comfy_org),
        )
        view = await jobs.submit(spec)
    except BaseException as exc:
        await asset_inputs.discard(job_id)
        if isinstance(exc, SidecarError):
            relocate(exc, "workflow")
        raise
    body = v2_job(view, signer, origin_of(request), v2_options.retention_s)
    return Response(body, status_code=201)


@get(
    "/jobs",
    summary="List jobs (Comfy API v2)",
    tags=TAGS,
    responses=ERRORS,
    description="The v2 jobs, newest first. `metadata[<key>]=<value>` (repeatable, at most "
    "16) keeps the jobs carrying every such label; `cursor` is the previous page's "
    "`next_cursor` (null on the last page).",
)
async def list_v2_jobs(
    request: Request[Any, Any, Any],
    jobs: NamedDependency[JobBackend],
    signer: NamedDependency[UrlSigner],
    v2_options: NamedDependency[V2Options],
    limit: Annotated[int, Parameter(ge=1, le=100, description="Page size.")] = 50,
    cursor: Annotated[str | None, Parameter(description="From a previous page.")] = None,
) -> JobList:
    """``GET /api/v2/jobs``."""
    wanted = label_filter(request)
    after: int | None = None
    if cursor is not None:
        if not cursor.isascii() or not cursor.isdigit() or len(cursor) > MAX_COUNTER_DIGITS:
            raise V2Error(422, "invalid_cursor", "not a cursor this server gave", location="cursor")
        after = int(cursor)
    views, following = await jobs.page(None, limit, after, endpoint=ENDPOINT, metadata=wanted)
    origin = origin_of(request)
    return JobList(
        jobs=[v2_list_item(view, signer, origin, v2_options.retention_s) for view in views],
        next_cursor=None if following is None else str(following),
    )


@get(
    "/jobs/{job_id:str}",
    summary="A job (Comfy API v2)",
    tags=TAGS,
    responses=ERRORS,
    description="Status, progress (a complete snapshot), outputs (each an asset with a signed, "
    "short-lived `url`), error, times.",
)
async def get_v2_job(
    job_id: str,
    request: Request[Any, Any, Any],
    jobs: NamedDependency[JobBackend],
    signer: NamedDependency[UrlSigner],
    v2_options: NamedDependency[V2Options],
) -> Job:
    """``GET /api/v2/jobs/{id}``."""
    view = await v2_view(jobs, job_id)
    return v2_job(view, signer, origin_of(request), v2_options.retention_s)


@get(
    "/jobs/{job_id:str}/workflow",
    summary="A job's workflow (Comfy API v2)",
    tags=TAGS,
    responses=ERRORS,
    description="The API-format graph the job was submitted with (`format: api`), its "
    "`core/ASSET` references replaced by the file names the job read.",
)
async def get_v2_job_workflow(job_id: str, jobs: NamedDependency[JobBackend]) -> JobWorkflow:
    """``GET /api/v2/jobs/{id}/workflow``."""
    await v2_view(jobs, job_id)
    workflow = await jobs.prompt(job_id)
    if workflow is None:
        raise NotFound(f"no job with id {job_id!r}", location="id")
    return JobWorkflow(workflow=workflow, format="api")


@post(
    "/jobs/{job_id:str}/cancel",
    summary="Cancel a job (Comfy API v2)",
    tags=TAGS,
    status_code=200,
    responses=ERRORS,
    description="Idempotent. A queued job ends `canceled` at once; a running one is "
    "interrupted (`canceling` until it stops, then `canceled`); an ended job answers itself.",
)
async def cancel_v2_job(
    job_id: str,
    request: Request[Any, Any, Any],
    jobs: NamedDependency[JobBackend],
    signer: NamedDependency[UrlSigner],
    v2_options: NamedDependency[V2Options],
) -> Job:
    """``POST /api/v2/jobs/{id}/cancel``."""
    view = await v2_view(jobs, job_id)
    if not view.ended:
        outcome = await jobs.cancel(job_id)
        if outcome is None:
            raise NotFound(f"no job with id {job_id!r}", location="id")
        view = outcome[1]
    origin = origin_of(request)
    status: V2Status | None = None if view.ended else "canceling"
    return v2_job(view, signer, origin, v2_options.retention_s, status=status)


def _last_event_id(request: Request[Any, Any, Any]) -> int | None:
    """The event id ``Last-Event-ID`` resumes after (None: absent or not a number; a
    number too long to be one is 422)."""
    raw = request.headers.get("last-event-id", "")
    if not (raw.isascii() and raw.isdigit()):
        return None
    if len(raw) > MAX_COUNTER_DIGITS:
        raise V2Error(
            422, "invalid_request", "not an event id of this stream", location="last-event-id"
        )
    return int(raw)


def _message(kind: str, body: Any, event_id: int | None) -> ServerSentEventMessage:
    data = msgspec.json.encode(body).decode()
    if event_id is None:
        return ServerSentEventMessage(data=data, event=kind)
    return ServerSentEventMessage(data=data, event=kind, id=event_id)


@get(
    "/jobs/{job_id:str}/events",
    summary="A job's events (Comfy API v2, Server-Sent Events)",
    tags=TAGS,
    responses=ERRORS,
    description="`status` `{status, queue_position}`, `progress` (a complete snapshot), "
    "`output` (an output asset, as it is written), `log` `{level, message}` and, with "
    "`?previews=true`, `preview` `{node_id, content_type, data_base64}` (at most 2 a second). "
    "Without `Last-Event-ID` the stream starts with where the job is now; with it, it resumes "
    "after that event. A comment every 15 s keeps it open; it ends after the terminal "
    "`status`.",
)
async def v2_job_events(
    job_id: str,
    request: Request[Any, Any, Any],
    jobs: NamedDependency[JobBackend],
    signer: NamedDependency[UrlSigner],
    v2_options: NamedDependency[V2Options],
    previews: Annotated[bool, Parameter(description="Also send preview images.")] = False,
) -> ServerSentEvent:
    """``GET /api/v2/jobs/{id}/events``."""
    resume = _last_event_id(request)
    after = await jobs.last_event_id(job_id) if resume is None else resume
    view = await v2_view(jobs, job_id)
    mapper = EventMapper(job_id, signer, origin_of(request))
    start = mapper.snapshot(view) if resume is None else []

    async def outputs_index(output: OutputInfo) -> int | None:
        """The index of ``output`` in the job's list (its ``url`` names it uniquely)."""
        nonlocal view
        for attempt in range(2):
            for index, known in enumerate(view.outputs):
                if known.url == output.url and known.filename == output.filename:
                    return index
            if attempt == 0:
                view = await jobs.get(job_id) or view
        return None

    async def messages() -> AsyncIterator[ServerSentEventMessage]:
        for kind, body in start:
            yield _message(kind, body, after)
        if view.ended and resume is None:
            return  # the snapshot of an ended job ends with its terminal status
        last_preview = 0.0
        events = jobs.follow(job_id, after, v2_options.heartbeat_s, previews)
        async for event in events:
            if event is None:
                yield ServerSentEventMessage(comment="keep-alive")
                continue
            if event.type == "preview":
                now = time.monotonic()
                if now - last_preview >= v2_options.preview_interval_s:
                    last_preview = now
                    kind, body = mapper.preview(msgspec.json.decode(event.data))
                    yield _message(kind, body, None)
                continue
            if event.type == "done":
                final = msgspec.json.decode(event.data, type=JobView)
                for kind, body in mapper.ended(final):
                    yield _message(kind, body, event.id)
                return
            if event.type == "output":
                output = msgspec.json.decode(event.data, type=OutputInfo)
                index = await outputs_index(output)
                mapped = [] if index is None else mapper.output(index, output)
            else:
                mapped = mapper.logged(event.type, msgspec.json.decode(event.data))
            for kind, body in mapped:
                yield _message(kind, body, event.id)

    return ServerSentEvent(messages())


ROUTES = [
    submit_v2_job,
    list_v2_jobs,
    get_v2_job,
    get_v2_job_workflow,
    cancel_v2_job,
    v2_job_events,
]
