"""The ai-dock ComfyUI API wrapper's routes: ``/generate`` (async, sync, stream), ``/result/{id}``
and ``/queue-info``, over the same jobs as ``/jobs``.

Copies the wrapper's README. Requests are ``{input: {request_id, workflow_json, webhook: {url,
extra_params}, s3: {...}}}``; every answer is its result object ``{id, status, message,
output: [{filename, url, type: "output", node_id, output_type}]}`` with status ``queued``
(pending), ``generating`` (running), ``completed`` or ``failed`` (failed, cancelled, timed out).
An output's ``url`` is its upload URL, or ``/jobs/{id}/outputs/{n}``; ``output_type`` is the
ComfyUI output key its media type gives (``images``, ``videos``, ``audio``, ``text``,
``files``). Every route goes through the job backend: with JOB_QUEUE_URL any replica runs the
job and answers for it, the webhook is sent once by whichever replica ends the job (its body
from :mod:`comfy_sidecar.webhooks.adapters`), and ``/queue-info`` counts the jobs no replica
has claimed yet. The stream sends its progress
objects (``request_id, status, message, elapsed_time, queue_position, queue_info``) and ends
with ``status: "final_result"`` carrying ``result``. The webhook gets the result object plus
``extra_params`` when the job ends.

What is not copied: ``modifier``/``modifications`` (we run no modifier classes: 400 naming
``input.modifier`` unless ``workflow_json`` is given) and per-request S3 credentials (uploads
use the sidecar's own AWS credentials: an ``s3`` block with keys is a 400 naming ``input.s3``;
``{bucket_name, prefix?}`` maps to our ``s3`` upload block).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from msgspec import Meta

from comfy_sidecar.errors import InputError
from comfy_sidecar.http.adapters.common import new_job_id, prompt_request, submit
from comfy_sidecar.http.routes.jobs import HEARTBEAT_S, view_of
from comfy_sidecar.http.routes.prompt import ERROR_RESPONSES
from comfy_sidecar.jobs.backend import JobBackend
from comfy_sidecar.jobs.model import JobStatus, JobView
from comfy_sidecar.jobs.spec import AfterEnd
from comfy_sidecar.schemas import ErrorResponse, JobId, S3Upload
from comfy_sidecar.webhooks.adapters import AIDOCK_STATUS, aidock_message, aidock_result

#: ``/generate/sync``'s default and longest wait, in seconds.
SYNC_TIMEOUT_S = 300.0
MAX_SYNC_TIMEOUT_S = 3600.0


class Webhook(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where the result object goes when the job ends, with ``extra_params`` merged in."""

    url: str
    extra_params: dict[str, Any] = {}


class S3Block(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """ai-dock's ``s3``. Only ``bucket_name`` (and ``prefix``) are used: uploads take the
    sidecar's AWS credentials, so a block with keys is refused."""

    bucket_name: str
    prefix: str = ""
    access_key_id: str | None = None
    secret_access_key: str | None = None
    endpoint_url: str | None = None
    region: str | None = None


class GenerateInput(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """ai-dock's ``input``."""

    request_id: JobId | None = None
    workflow_json: Annotated[
        dict[str, Any] | None, Meta(description="ComfyUI API-format workflow.")
    ] = None
    modifier: Annotated[str | None, Meta(description="Not supported: give `workflow_json`.")] = None
    modifications: dict[str, Any] | None = None
    webhook: Webhook | None = None
    s3: S3Block | None = None


class GenerateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /generate``, ``/generate/sync`` and ``/generate/stream``."""

    input: GenerateInput


class ResultOutput(msgspec.Struct, kw_only=True):
    """One output file of a result."""

    filename: str
    url: str | None
    type: str
    node_id: str
    output_type: str


class Result(msgspec.Struct, kw_only=True):
    """ai-dock's result object."""

    id: str
    status: str
    message: str
    output: list[ResultOutput]


class QueueInfo(msgspec.Struct, kw_only=True):
    """``GET /queue-info``: jobs waiting per stage (we queue only for generation)."""

    preprocess_queue_size: int
    generation_queue_size: int
    postprocess_queue_size: int


def _s3_upload(block: S3Block) -> S3Upload:
    keys = ("access_key_id", "secret_access_key", "endpoint_url", "region")
    given = [name for name in keys if getattr(block, name) is not None]
    if given:
        raise InputError(
            f"per-request S3 credentials ({', '.join(given)}) are not supported for uploads: "
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL, AWS_REGION) in "
            "the sidecar's environment and send only bucket_name and prefix",
            "input.s3",
        )
    return S3Upload(bucket=block.bucket_name, prefix=block.prefix)


def _request(data: GenerateRequest) -> Any:
    """``data`` as a :class:`~comfy_sidecar.schemas.PromptRequest`; raises
    :class:`InputError` naming the ``input.*`` field at fault."""
    given = data.input
    if given.workflow_json is None:
        if given.modifier is not None or given.modifications is not None:
            raise InputError(
                "modifier classes are not supported here: send the workflow as workflow_json",
                "input.modifier",
            )
        raise InputError("required: the ComfyUI workflow", "input.workflow_json")
    options: dict[str, Any] = {}
    if given.s3 is not None:
        options["s3"] = _s3_upload(given.s3)
    return prompt_request(
        given.workflow_json, given.request_id or new_job_id(), "input.workflow_json", **options
    )


async def _submit(data: GenerateRequest, jobs: JobBackend) -> JobView:
    """Translate and submit; the webhook (when given) goes with the job and is sent by
    whichever replica ends it."""
    given = data.input
    request = _request(data)
    after = None
    if given.webhook is not None:
        after = AfterEnd(
            kind="aidock",
            url=given.webhook.url,
            location="input.webhook.url",
            extra_params=given.webhook.extra_params,
        )
    return await submit(jobs, request, "aidock", "input.workflow_json", given.webhook, after=after)


def result_from_view(view: JobView | dict[str, Any]) -> Result:
    """A job's view (``queue_position`` set while it waits) as ai-dock's result object."""
    body = view.body() if isinstance(view, JobView) else view
    return msgspec.convert(aidock_result(body), Result)


RESULT_RESPONSES = {
    400: ResponseSpec(ErrorResponse, description="A bad field; `location` names it."),
    409: ResponseSpec(ErrorResponse, description="This request_id is retained with another body."),
    503: ERROR_RESPONSES[503],
}


@post(
    "/generate",
    summary="Submit a generation (ai-dock)",
    tags=["ai-dock"],
    status_code=202,
    responses={202: ResponseSpec(Result, description="Queued."), **RESULT_RESPONSES},
    description="`{input: {request_id?, workflow_json, webhook?, s3?}}`; answers 202 with the "
    "result object. Resubmitting a retained `request_id` with the same body returns that job.",
)
async def generate(data: GenerateRequest, jobs: NamedDependency[JobBackend]) -> Response[Result]:
    """Submit a generation."""
    return Response(result_from_view(await _submit(data, jobs)), status_code=202)


@post(
    "/generate/sync",
    summary="Run a generation and wait (ai-dock)",
    tags=["ai-dock"],
    status_code=200,
    responses={
        200: ResponseSpec(Result, description="The final result object."),
        202: ResponseSpec(Result, description="Still running after `timeout`; poll /result."),
        **RESULT_RESPONSES,
    },
    description="Waits up to `timeout` seconds (default 300, at most 3600) and answers 200 with "
    "the final result object; a job still running then answers 202 with its current result "
    "(the job goes on: poll `/result/{id}`).",
)
async def generate_sync(
    data: GenerateRequest,
    jobs: NamedDependency[JobBackend],
    wait_s: Annotated[
        float,
        Parameter(query="timeout", gt=0, le=MAX_SYNC_TIMEOUT_S, description="Seconds to wait."),
    ] = SYNC_TIMEOUT_S,
) -> Response[Result]:
    """Run a generation and wait."""
    view = await _submit(data, jobs)
    final = await jobs.wait(view.id, wait_s) or view
    return Response(result_from_view(final), status_code=200 if final.ended else 202)


def stream_message(
    view: dict[str, Any], started: float, waiting: int, estimate_s: int | None
) -> dict[str, Any]:
    """One item of the stream (ai-dock's streaming data format) for a job whose
    ``GET /jobs/{id}`` body is ``view``: ``started`` is when the request came
    (``time.monotonic()``), ``waiting`` how many jobs wait to be run, ``estimate_s`` the
    seconds until this one is likely done (None: unknown)."""
    position = view.get("queue_position")
    return {
        "request_id": view["id"],
        "status": AIDOCK_STATUS[view["status"]],
        "message": aidock_message(view),
        "elapsed_time": round(time.monotonic() - started, 3),
        "queue_position": {
            "current_queue": "generation",
            "position": None if position is None else position + 1,
            "queue_size": waiting,
            "estimated_wait_time": estimate_s,
        },
        "queue_info": _sizes(waiting),
    }


def final_message(view: dict[str, Any], started: float) -> dict[str, Any]:
    """The stream's last item: ``status: final_result`` with the result object."""
    return {
        "request_id": view["id"],
        "status": "final_result",
        "message": aidock_message(view),
        "elapsed_time": round(time.monotonic() - started, 3),
        "result": aidock_result(view),
    }


@post(
    "/generate/stream",
    summary="Run a generation and stream its progress (ai-dock)",
    tags=["ai-dock"],
    status_code=200,
    responses=RESULT_RESPONSES,
    description="Server-Sent Events in ai-dock's streaming format (`request_id`, `status`, "
    "`message`, `elapsed_time`, `queue_position`, `queue_info`), one per status or progress "
    "change; the last has `status: final_result` and the result object as `result`.",
)
async def generate_stream(
    data: GenerateRequest, jobs: NamedDependency[JobBackend]
) -> ServerSentEvent:
    """Run a generation and stream its progress: its events from whichever replica runs it,
    each message built from the events so far (a stored body may lag behind them)."""
    started = time.monotonic()
    view = await _submit(data, jobs)
    job_id = view.id

    async def messages() -> Any:
        current = view.body()
        async for event in jobs.follow(job_id, 0, HEARTBEAT_S):
            if event is None:
                yield ServerSentEventMessage(comment="keep-alive")
            elif event.type in ("status", "progress"):
                data = msgspec.json.decode(event.data)
                if event.type == "status":
                    current["status"] = data["status"]
                else:
                    current.update(data)
                position = None
                if current["status"] == JobStatus.PENDING.value:
                    now = await jobs.get(job_id)
                    position = now.queue_position if now is not None else None
                current["queue_position"] = position
                message = stream_message(
                    current, started, await jobs.waiting(), await jobs.estimate(job_id)
                )
                yield ServerSentEventMessage(data=_json(message))
        final = await jobs.get(job_id)
        body = final.body() if final is not None else current
        yield ServerSentEventMessage(data=_json(final_message(body, started)))

    return ServerSentEvent(messages())


def _json(body: Any) -> str:
    return msgspec.json.encode(body).decode()


@get(
    "/result/{request_id:str}",
    summary="A generation's result (ai-dock)",
    tags=["ai-dock"],
    responses={404: ResponseSpec(ErrorResponse, description="No such request is retained.")},
    description="The result object of any retained job.",
)
async def get_result(request_id: str, jobs: NamedDependency[JobBackend]) -> Result:
    """A generation's result."""
    return result_from_view(await view_of(jobs, request_id))


def _sizes(waiting: int) -> dict[str, int]:
    return {
        "preprocess_queue_size": 0,
        "generation_queue_size": waiting,
        "postprocess_queue_size": 0,
    }


@get(
    "/queue-info",
    summary="Queue sizes (ai-dock)",
    tags=["ai-dock"],
    description="Jobs waiting per stage: ours wait only for generation (ComfyUI's queue; "
    "with JOB_QUEUE_URL, the jobs no replica has claimed yet).",
)
async def queue_info(jobs: NamedDependency[JobBackend]) -> QueueInfo:
    """Queue sizes."""
    return QueueInfo(**_sizes(await jobs.waiting()))


ROUTES = [generate, generate_sync, generate_stream, get_result, queue_info]
