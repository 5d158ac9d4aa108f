"""The native job API: ``/jobs`` to submit, watch (poll, long-poll or SSE), cancel, list and fetch
outputs of jobs that outlive their request.

Status names are ComfyUI's own ``/api/jobs`` ones; progress fields are the Modal jobs API's
(``progress``, ``progress_value``, ``progress_max``, ``nodes_total``, ``nodes_done``,
``current_node``, ``last_event_time``). comfyui-api has no job status at all.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any
from urllib.parse import quote

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import ServerSentEvent, Stream
from litestar.response.sse import ServerSentEventMessage

from comfy_sidecar.errors import InputError, NotFound
from comfy_sidecar.http.ranges import Unsatisfiable, parse_range
from comfy_sidecar.http.routes.prompt import ERROR_RESPONSES
from comfy_sidecar.jobs.backend import JobBackend
from comfy_sidecar.jobs.model import JobLinks, JobStatus, JobView
from comfy_sidecar.jobs.spec import JobSpec
from comfy_sidecar.schemas import ErrorResponse, PromptRequest

#: Longest ``?wait=`` long-poll, in seconds.
MAX_WAIT_S = 60.0
#: Seconds between SSE comment heartbeats.
HEARTBEAT_S = 15.0


class JobAccepted(msgspec.Struct, kw_only=True):
    """``POST /jobs`` answer."""

    id: str
    status: str
    created_at: str
    urls: JobLinks


class CancelResponse(msgspec.Struct, kw_only=True):
    """``POST /jobs/{id}/cancel`` answer: ``cancelled`` is False when the job had already
    ended (``status`` says how)."""

    id: str
    cancelled: bool
    status: str


class JobList(msgspec.Struct, kw_only=True):
    """A page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next one."""

    jobs: list[dict[str, Any]]
    next_cursor: str | None


#: The most digits a ``cursor`` or ``Last-Event-ID`` may have: both count jobs or events, far
#: below 10^18 (and Python refuses to convert a string of more than 4,300 digits).
MAX_COUNTER_DIGITS = 18


def counter(raw: str, location: str, what: str) -> int:
    """``raw``, a counter the caller got from us (a ``cursor``, an event id), as an int:
    :class:`InputError` at ``location`` ("not <what>") unless it is 1 to
    :data:`MAX_COUNTER_DIGITS` ASCII digits."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_COUNTER_DIGITS:
        raise InputError(f"not {what} (at most {MAX_COUNTER_DIGITS} digits)", location)
    return int(raw)


async def view_of(jobs: JobBackend, job_id: str) -> JobView:
    """The kept job ``job_id``'s view; :class:`NotFound` (404) otherwise."""
    view = await jobs.get(job_id)
    if view is None:
        raise NotFound(f"no job with id {job_id!r}", location="id", id=job_id)
    return view


def fingerprint(data: PromptRequest) -> bytes:
    """What makes two submissions with one id "the same body"."""
    return msgspec.json.encode(data)


def with_id(request: PromptRequest) -> PromptRequest:
    """``request`` with its ``id``, a new UUID when the caller gave none."""
    if request.id is not None:
        return request
    return msgspec.structs.replace(request, id=str(uuid.uuid4()))


@post(
    "/jobs",
    summary="Submit a job",
    tags=["jobs"],
    status_code=202,
    responses={
        202: ResponseSpec(JobAccepted, description="Accepted; watch it at `urls`."),
        400: ERROR_RESPONSES[400],
        409: ResponseSpec(ErrorResponse, description="This id is retained with another body."),
        429: ERROR_RESPONSES[429],
        503: ERROR_RESPONSES[503],
    },
    description="Takes the `/prompt` body. The prompt is checked and its inputs fetched before "
    "the answer, so a caller's mistake is a 400 and nothing is kept. Resubmitting the same id "
    "with the same body while the job is retained returns that job.",
)
async def submit_job(
    data: PromptRequest, jobs: NamedDependency[JobBackend]
) -> Response[JobAccepted]:
    """Submit a job."""
    spec = JobSpec(request=with_id(data), endpoint="jobs", fingerprint=fingerprint(data))
    return Response(accepted(await jobs.submit(spec)), status_code=202)


def accepted(view: JobView) -> JobAccepted:
    """The ``POST /jobs`` answer for a job's view."""
    assert view.urls is not None
    return JobAccepted(
        id=view.id, status=view.status.value, created_at=view.created_at or "", urls=view.urls
    )


async def with_data(jobs: JobBackend, view: JobView) -> dict[str, Any]:
    """``view``'s body with each retained output's bytes as base64 ``data`` (outputs uploaded
    elsewhere keep only their ``url``)."""
    body = view.body()
    for index, output in enumerate(body.get("outputs") or []):
        blob = await jobs.output(view.id, index)
        if blob is not None:
            output["data"] = base64.b64encode(await blob.read()).decode("ascii")
    return body


@get(
    "/jobs/{job_id:str}",
    summary="A job's status, progress and outputs",
    tags=["jobs"],
    responses={
        400: ERROR_RESPONSES[400],
        404: ResponseSpec(ErrorResponse, description="No such job is retained."),
    },
    description="`?wait=S` (at most 60) waits until the job has ended; `?include=data` adds "
    "each output's bytes as base64 `data`.",
)
async def get_job(
    job_id: str,
    jobs: NamedDependency[JobBackend],
    wait: Annotated[float, Parameter(ge=0, le=MAX_WAIT_S, description="Long-poll seconds.")] = 0,
    include: Annotated[
        str | None, Parameter(description="`data`: add outputs' base64 bytes.")
    ] = None,
) -> dict[str, Any]:
    """Job status."""
    if include not in (None, "data"):
        raise InputError("include must be `data`", "include")
    view = await (jobs.wait(job_id, wait) if wait > 0 else jobs.get(job_id))
    if view is None:
        raise NotFound(f"no job with id {job_id!r}", location="id", id=job_id)
    return await with_data(jobs, view) if include == "data" else view.body()


@get(
    "/jobs",
    summary="List jobs",
    tags=["jobs"],
    description="Newest first, without outputs. `cursor` is the previous page's `next_cursor`.",
    responses={400: ERROR_RESPONSES[400]},
)
async def list_jobs(
    jobs: NamedDependency[JobBackend],
    status: Annotated[str | None, Parameter(description="Only jobs with this status.")] = None,
    limit: Annotated[int, Parameter(ge=1, le=1000, description="Page size.")] = 50,
    cursor: Annotated[str | None, Parameter(description="From a previous page.")] = None,
) -> JobList:
    """List jobs."""
    wanted: JobStatus | None = None
    if status is not None:
        try:
            wanted = JobStatus(status)
        except ValueError:
            names = ", ".join(s.value for s in JobStatus)
            raise InputError(f"status must be one of {names}", "status") from None
    after = None if cursor is None else counter(cursor, "cursor", "a cursor from a previous page")
    views, following = await jobs.page(wanted, limit, after)
    return JobList(
        jobs=[view.summary() for view in views],
        next_cursor=None if following is None else str(following),
    )


async def _cancel(job_id: str, jobs: JobBackend) -> CancelResponse:
    outcome = await jobs.cancel(job_id)
    if outcome is None:
        raise NotFound(f"no job with id {job_id!r}", location="id", id=job_id)
    cancelled, view = outcome
    return CancelResponse(id=job_id, cancelled=cancelled, status=view.status.value)


CANCEL_DOC = (
    "Idempotent. A job still downloading its inputs stops, a pending job is removed from "
    "ComfyUI's queue, a running one interrupted; it ends `cancelled`. A job that already ended "
    "answers `cancelled: false` with its status."
)


@post(
    "/jobs/{job_id:str}/cancel",
    summary="Cancel a job",
    tags=["jobs"],
    status_code=200,
    responses={404: ResponseSpec(ErrorResponse, description="No such job is retained.")},
    description=CANCEL_DOC,
)
async def cancel_job(job_id: str, jobs: NamedDependency[JobBackend]) -> CancelResponse:
    """Cancel a job."""
    return await _cancel(job_id, jobs)


@delete(
    "/jobs/{job_id:str}",
    summary="Cancel a job (alias)",
    tags=["jobs"],
    status_code=200,
    responses={404: ResponseSpec(ErrorResponse, description="No such job is retained.")},
    description=CANCEL_DOC,
)
async def delete_job(job_id: str, jobs: NamedDependency[JobBackend]) -> CancelResponse:
    """Cancel a job (alias of POST /jobs/{id}/cancel)."""
    return await _cancel(job_id, jobs)


def _last_event_id(request: Request[Any, Any, Any]) -> int:
    """The event id ``Last-Event-ID`` resumes after: 0 (from the start) when absent or not a
    number; a number too long to be an event id is :class:`InputError` at ``last-event-id``."""
    raw = request.headers.get("last-event-id", "")
    if not (raw.isascii() and raw.isdigit()):
        return 0
    return counter(raw, "last-event-id", "an event id of this stream")


@get(
    "/jobs/{job_id:str}/events",
    summary="A job's events (Server-Sent Events)",
    tags=["jobs"],
    responses={
        400: ERROR_RESPONSES[400],
        404: ResponseSpec(ErrorResponse, description="No such job is retained."),
    },
    description="Events `status`, `progress`, `output` and `done` (its data is the final job "
    "body), each with an `id:`; `Last-Event-ID` resumes after that event. `preview` (base64 "
    "image with its node id) only with `?previews=true`. A comment every 15 s keeps the "
    "connection open; the stream ends after `done`.",
)
async def job_events(
    job_id: str,
    jobs: NamedDependency[JobBackend],
    request: Request[Any, Any, Any],
    previews: Annotated[bool, Parameter(description="Also send preview images.")] = False,
) -> ServerSentEvent:
    """Follow a job."""
    after = _last_event_id(request)
    await view_of(jobs, job_id)
    events = jobs.follow(job_id, after, HEARTBEAT_S, previews)

    async def messages() -> Any:
        async for event in events:
            if event is None:
                yield ServerSentEventMessage(comment="keep-alive")
            elif event.type == "preview":
                yield ServerSentEventMessage(data=event.data.decode(), event="preview")
            else:
                yield ServerSentEventMessage(
                    data=event.data.decode(), event=event.type, id=event.id
                )

    return ServerSentEvent(messages())


@get(
    "/jobs/{job_id:str}/outputs/{index:int}",
    summary="One output file of a job",
    tags=["jobs"],
    responses={
        206: ResponseSpec(None, description="The requested byte range."),
        400: ERROR_RESPONSES[400],
        404: ResponseSpec(ErrorResponse, description="No such job or output."),
        416: ResponseSpec(ErrorResponse, description="The range starts past the end."),
    },
    description="The file itself, streamed with its content type and length (never base64). "
    "A single `Range: bytes=` range is answered 206.",
)
async def job_output(
    job_id: str, index: int, jobs: NamedDependency[JobBackend], request: Request[Any, Any, Any]
) -> Response[Any]:
    """Download an output."""
    blob = await jobs.output(job_id, index)
    if blob is None:
        raise NotFound(f"job {job_id!r} has no retained output {index}", location="index")

    def stream(first: int, last: int, status: int, headers: dict[str, str]) -> Response[Any]:
        headers["content-length"] = str(max(0, last - first + 1))
        chunks: AsyncIterator[bytes] = blob.chunks(first, last) if blob.size else _nothing()
        return Stream(chunks, media_type=blob.mime_type, status_code=status, headers=headers)

    return ranged(request, blob.size, blob.filename, stream)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


Body = Callable[[int, int, int, dict[str, str]], Response[Any]]
"""``body(first, last, status, headers)``: the response for bytes first..last (inclusive)."""


#: What stands for a character the quoted ``filename`` of a Content-Disposition cannot hold.
FALLBACK_CHARACTER = "_"
#: Characters RFC 8187's ``attr-char`` allows besides letters, digits and ``-._~`` (which
#: :func:`urllib.parse.quote` never encodes).
ATTR_CHARS = "!#$&+^`|"


def content_disposition(filename: str, disposition: str = "inline") -> str:
    """The ``Content-Disposition`` of a file named ``filename``, as RFC 6266 section 4.3 advises:
    ``inline; filename="<ASCII fallback>"; filename*=UTF-8''<percent-encoded UTF-8>``. The
    fallback keeps printable ASCII but ``"``, ``\\`` and ``%`` (each becomes ``_``, as does every
    other character), so it is always a valid quoted-string; ``filename*`` carries the exact
    name. The value is ASCII whatever the name holds (CR, LF, non-Latin-1 characters)."""
    fallback = "".join(
        c if " " <= c <= "~" and c not in '"\\%' else FALLBACK_CHARACTER for c in filename
    )
    encoded = quote(filename, safe=ATTR_CHARS, errors="surrogateescape")
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def ranged(request: Request[Any, Any, Any], size: int, filename: str, body: Body) -> Response[Any]:
    """An output file's answer: whole (200) or the single ``Range: bytes=`` range asked for
    (206), or 416 when the range starts past ``size`` bytes. ``filename`` goes into the
    ``Content-Disposition`` (:func:`content_disposition`)."""
    headers = {
        "accept-ranges": "bytes",
        "content-disposition": content_disposition(filename),
    }
    try:
        span = parse_range(request.headers.get("range"), size)
    except Unsatisfiable:
        return Response(
            {"error": f"the range starts past the end ({size} bytes)", "location": "range"},
            status_code=416,
            headers={"content-range": f"bytes */{size}"},
        )
    first, last = span if span is not None else (0, size - 1)
    if span is not None:
        headers["content-range"] = f"bytes {first}-{last}/{size}"
    return body(first, last, 206 if span is not None else 200, headers)


ROUTES = [submit_job, get_job, list_jobs, cancel_job, delete_job, job_events, job_output]
