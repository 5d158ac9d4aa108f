"""The ai-dock ComfyUI API wrapper's routes: ``/generate`` (async, sync, stream), ``/result/{id}``
and ``/queue-info``, over the same jobs as ``/jobs``.

Copies the wrapper's README. Requests are ``{input: {request_id, workflow_json, webhook: {url,
extra_params}, s3: {...}}}``; every answer is its result object ``{id, status, message,
output: [{filename, url, type: "output", node_id, output_type}]}`` with status ``queued``
(pending), ``generating`` (running), ``completed`` or ``failed`` (failed, cancelled, timed out).
An output's ``url`` is its upload URL, or ``/jobs/{id}/outputs/{n}``; ``output_type`` is the
ComfyUI output key its media type gives (``images``, ``videos``, ``audio``, ``text``,
``files``). With JOB_QUEUE_URL, ``/generate``, ``/generate/sync`` and ``/result/{id}`` go
through the shared queue: any replica runs the job and answers for it, and the webhook is sent
once, by whichever replica ends the job (see :mod:`comfy_sidecar.jobs.after`);
``/generate/stream`` follows the job from the replica that holds the connection, and
``/queue-info`` counts the jobs no replica has claimed yet. The stream sends its progress
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
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from msgspec import Meta

from comfy_sidecar.errors import InputError
from comfy_sidecar.jobs.after import AfterEnd
from comfy_sidecar.jobs.runner import JobService
from comfy_sidecar.jobs.shared import SharedJobs
from comfy_sidecar.jobs.store import JobRecord, JobStatus
from comfy_sidecar.routes.adapters import (
    estimated_wait_s,
    message_of,
    new_job_id,
    prompt_request,
    shared_view,
    submit,
    submit_shared,
)
from comfy_sidecar.routes.jobs import HEARTBEAT_S, job_of
from comfy_sidecar.routes.prompt import ERROR_RESPONSES
from comfy_sidecar.schemas import ErrorResponse, JobId, S3Upload

#: ``/generate/sync``'s default and longest wait, in seconds.
SYNC_TIMEOUT_S = 300.0
MAX_SYNC_TIMEOUT_S = 3600.0

STATUS = {
    JobStatus.PENDING: "queued",
    JobStatus.IN_PROGRESS: "generating",
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "failed",
    JobStatus.TIMED_OUT: "failed",
}
OUTPUT_TYPE = {"image": "images", "video": "videos", "audio": "audio", "text": "text"}


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


async def _request(data: GenerateRequest, state: State) -> Any:
    """``data`` as a :class:`~comfy_sidecar.schemas.PromptRequest`, its webhook URL checked as
    ``/jobs``' ``webhook_v2`` is (the SSRF guard); raises :class:`InputError` naming the
    ``input.*`` field at fault."""
    given = data.input
    if given.workflow_json is None:
        if given.modifier is not None or given.modifications is not None:
            raise InputError(
                "modifier classes are not supported here: send the workflow as workflow_json",
                "input.modifier",
            )
        raise InputError("required: the ComfyUI workflow", "input.workflow_json")
    if given.webhook is not None:
        await state.sidecar.storage.check_webhook(given.webhook.url, "input.webhook.url")
    options: dict[str, Any] = {}
    if given.s3 is not None:
        options["s3"] = _s3_upload(given.s3)
    return prompt_request(
        given.workflow_json, given.request_id or new_job_id(), "input.workflow_json", **options
    )


async def _submit(data: GenerateRequest, jobs: JobService, state: State) -> JobRecord:
    """Translate and submit in-process; the webhook (when given) is sent when the job ends."""
    given = data.input
    request = await _request(data, state)
    record = await submit(jobs, request, "aidock", "input.workflow_json", given.webhook)
    if given.webhook is not None:
        jobs.when_ended(record, _send_webhook(state, jobs, given.webhook))
    return record


async def _submit_shared(data: GenerateRequest, jobs: JobService, state: State) -> dict[str, Any]:
    """Translate and append to the shared queue (JOB_QUEUE_URL); the webhook goes with the
    job and is sent by whichever replica ends it. Returns the job's ``GET /jobs/{id}`` body."""
    assert jobs.shared is not None
    given = data.input
    request = await _request(data, state)
    after = None
    if given.webhook is not None:
        after = AfterEnd(
            kind="aidock", url=given.webhook.url, extra_params=given.webhook.extra_params
        )
    return await submit_shared(
        jobs.shared, request, "aidock", "input.workflow_json", given.webhook, after=after
    )


def _send_webhook(state: State, jobs: JobService, webhook: Webhook) -> Any:
    after = AfterEnd(kind="aidock", url=webhook.url, extra_params=webhook.extra_params)

    async def send(record: JobRecord) -> None:
        body = webhook_body(jobs.store.view(record), after)
        await state.sidecar.webhooks.send_prompt(webhook.url, body, record.id, order_key=record.id)

    return send


def webhook_body(view: dict[str, Any], after: AfterEnd) -> dict[str, Any]:
    """The webhook body of a job whose final ``GET /jobs/{id}`` body is ``view``: its result
    object plus ``extra_params`` (queue mode's :class:`~comfy_sidecar.jobs.after.Format`)."""
    body: dict[str, Any] = msgspec.to_builtins(result_from_view(view))
    return {**body, **after.extra_params}


def _message(view: dict[str, Any]) -> str:
    status = JobStatus(view["status"])
    if status is JobStatus.PENDING:
        position = view.get("queue_position")
        return f"Queued for generation (position {(position or 0) + 1})"
    if status is JobStatus.IN_PROGRESS:
        return f"Generating: {view.get('progress') or 0.0:.0f}%"
    if status is JobStatus.COMPLETED:
        return "Generation complete"
    return message_of(status, view.get("error")) or "failed"


def result_from_view(view: dict[str, Any]) -> Result:
    """A job's ``GET /jobs/{id}`` body (``queue_position`` set while it waits) as ai-dock's
    result object."""
    return Result(
        id=view["id"],
        status=STATUS[JobStatus(view["status"])],
        message=_message(view),
        output=[
            ResultOutput(
                filename=o["filename"],
                url=o.get("url"),
                type="output",
                node_id=o["node_id"],
                output_type=OUTPUT_TYPE.get(o.get("media_type", ""), "files"),
            )
            for o in view.get("outputs") or []
        ],
    )


def result_of(jobs: JobService, record: JobRecord) -> Result:
    """``record`` (a job of this replica's store) as ai-dock's result object."""
    return result_from_view(jobs.store.view(record))


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
async def generate(data: GenerateRequest, jobs: JobService, state: State) -> Response[Result]:
    """Submit a generation."""
    if jobs.shared is not None:  # queue mode: any replica runs it
        return Response(result_from_view(await _submit_shared(data, jobs, state)), status_code=202)
    record = await _submit(data, jobs, state)
    return Response(result_of(jobs, record), status_code=202)


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
    jobs: JobService,
    state: State,
    wait_s: Annotated[
        float,
        Parameter(query="timeout", gt=0, le=MAX_SYNC_TIMEOUT_S, description="Seconds to wait."),
    ] = SYNC_TIMEOUT_S,
) -> Response[Result]:
    """Run a generation and wait."""
    if jobs.shared is not None:
        view = await _submit_shared(data, jobs, state)
        final = await jobs.shared.wait(view["id"], wait_s) or view
        ended = JobStatus(final["status"]).terminal
        return Response(result_from_view(final), status_code=200 if ended else 202)
    record = await _submit(data, jobs, state)
    ended = await record.wait_ended(wait_s)
    return Response(result_of(jobs, record), status_code=200 if ended else 202)


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
        "status": STATUS[JobStatus(view["status"])],
        "message": _message(view),
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
        "message": _message(view),
        "elapsed_time": round(time.monotonic() - started, 3),
        "result": msgspec.to_builtins(result_from_view(view)),
    }


def progress_message(jobs: JobService, record: JobRecord, started: float) -> dict[str, Any]:
    """:func:`stream_message` of a job of this replica's store."""
    waiting = sum(1 for r in jobs.store if r.status is JobStatus.PENDING)
    estimate = estimated_wait_s(jobs.store, record)
    return stream_message(jobs.store.view(record), started, waiting, estimate)


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
async def generate_stream(data: GenerateRequest, jobs: JobService, state: State) -> ServerSentEvent:
    """Run a generation and stream its progress."""
    started = time.monotonic()
    if jobs.shared is not None:
        return _shared_stream(jobs.shared, await _submit_shared(data, jobs, state), started)
    record = await _submit(data, jobs, state)

    async def messages() -> Any:
        yield ServerSentEventMessage(data=_json(progress_message(jobs, record, started)))
        async for event in record.follow(len(record.events), HEARTBEAT_S):
            if event is None:
                yield ServerSentEventMessage(comment="keep-alive")
            elif event.type in ("status", "progress"):
                yield ServerSentEventMessage(data=_json(progress_message(jobs, record, started)))
        final = final_message(jobs.store.view(record), started)
        yield ServerSentEventMessage(data=_json(final))

    return ServerSentEvent(messages())


def _shared_stream(shared: SharedJobs, view: dict[str, Any], started: float) -> ServerSentEvent:
    """``/generate/stream`` of a job in the shared queue: its events from whichever replica
    runs it, each message built from the events so far (the stored body may lag behind
    them); ``estimated_wait_time`` is null (no replica knows the others' run times)."""
    job_id = view["id"]

    async def messages() -> Any:
        current = dict(view)
        async for event in shared.follow(job_id, 0, HEARTBEAT_S):
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
                    position = ((await shared.get(job_id)) or {}).get("queue_position")
                current["queue_position"] = position
                message = stream_message(current, started, await shared.waiting(), None)
                yield ServerSentEventMessage(data=_json(message))
        final = await shared.get(job_id) or current
        yield ServerSentEventMessage(data=_json(final_message(final, started)))

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
async def get_result(request_id: str, jobs: JobService) -> Result:
    """A generation's result."""
    if jobs.shared is not None:
        return result_from_view(await shared_view(jobs.shared, request_id))
    return result_of(jobs, job_of(jobs, request_id))


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
async def queue_info(jobs: JobService) -> QueueInfo:
    """Queue sizes."""
    if jobs.shared is not None:
        return QueueInfo(**_sizes(await jobs.shared.waiting()))
    return QueueInfo(**_sizes(sum(1 for r in jobs.store if r.status is JobStatus.PENDING)))


ROUTES = [generate, generate_sync, generate_stream, get_result, queue_info]
