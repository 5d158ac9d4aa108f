"""``POST /prompt`` and ``POST /interrupt``."""

from __future__ import annotations

from typing import Annotated, Any, get_args

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import Body
from litestar.response import Stream

from comfy_sidecar.http.auth import caller_of
from comfy_sidecar.jobs.lifecycle import JobLifecycle
from comfy_sidecar.pipeline.deliver import Accepted, Answered, Delivered
from comfy_sidecar.schemas import (
    AcceptedResponse,
    ErrorResponse,
    InterruptRequest,
    InterruptResponse,
    Prompt,
    PromptRequest,
    PromptResponse,
)

ERROR_RESPONSES = {
    400: ResponseSpec(
        ErrorResponse,
        description="A caller's mistake or ComfyUI's validation error; `location` names the field.",
    ),
    409: ResponseSpec(ErrorResponse, description="A job with this id is already running."),
    413: ResponseSpec(ErrorResponse, description="Body larger than MAX_BODY_SIZE_MB."),
    429: ResponseSpec(
        ErrorResponse,
        description="The queue is full (MAX_QUEUE_DEPTH, MAX_PENDING_DELIVERIES), or the API "
        "key is past a quota (`reason`: `max_concurrent_jobs`, `jobs_per_minute`, `max_queue`); "
        "`Retry-After` says when to try again.",
    ),
    499: ResponseSpec(ErrorResponse, description="The job was interrupted (POST /interrupt)."),
    500: ResponseSpec(
        ErrorResponse,
        description="ComfyUI failed executing the prompt: node, exception and ComfyUI's log tail.",
    ),
    502: ResponseSpec(
        ErrorResponse, description="An upload (or a workflow's ComfyUI lookup) failed."
    ),
    503: ResponseSpec(
        ErrorResponse,
        description="ComfyUI is not ready, went away, or the sidecar is shutting down.",
    ),
    504: ResponseSpec(ErrorResponse, description="The job exceeded PROMPT_TIMEOUT_S."),
    507: ResponseSpec(
        ErrorResponse, description="The sidecar's disk is full (downloading an input or model)."
    ),
}

RESULT_RESPONSES = {
    200: ResponseSpec(PromptResponse, description="Outputs as base64 (or uploaded URLs)."),
    202: ResponseSpec(
        AcceptedResponse,
        description="Accepted: the result goes to the webhook or the async upload.",
    ),
    **ERROR_RESPONSES,
}


#: The body /docs fills in for "Try it out": the prompt example alone, answered 200 at once.
PROMPT_EXAMPLE = Example(
    summary="A small prompt, answered with its image",
    value={"prompt": get_args(Prompt)[1].examples[0]},
)


def respond(delivered: Delivered) -> Response[Any]:
    """The HTTP answer for what the delivery decided: 202 :class:`AcceptedResponse`, 200
    :class:`PromptResponse`, or 200 with the same JSON streamed."""
    if isinstance(delivered, Accepted):
        return Response(delivered.body, status_code=202)
    if isinstance(delivered, Answered):
        return Response(delivered.body, status_code=200)
    return Stream(delivered.chunks, media_type="application/json", status_code=200)


@post(
    "/prompt",
    summary="Run a prompt",
    tags=["prompt"],
    status_code=200,
    responses=RESULT_RESPONSES,
    description="Queue an API-format prompt on ComfyUI, wait for it and answer with every "
    "output of every output node (base64 in node id order, or uploaded URLs). "
    "With `webhook`, `webhook_v2` or an upload with `async: true` it answers 202 at "
    "once and delivers the result later.",
)
async def prompt(
    data: Annotated[PromptRequest, Body(examples=[PROMPT_EXAMPLE])],
    lifecycle: NamedDependency[JobLifecycle],
    request: Request[Any, Any, Any],
) -> Response[Any]:
    """Run a prompt (a job of the request's API key)."""
    return respond(await lifecycle.answer(data, key=caller_of(request.scope)))


@post(
    "/interrupt",
    summary="Stop a job",
    tags=["prompt"],
    status_code=200,
    responses={
        400: ERROR_RESPONSES[400],
        404: ResponseSpec(
            InterruptResponse, description="No job with this id, or it had already ended."
        ),
    },
    description="A job still downloading its inputs stops (and so does the download, unless "
    "another job waits for the same URL); a pending job is removed from ComfyUI's queue; a "
    "running one is interrupted "
    "(at ComfyUI's next node boundary). 200 `success` means its /prompt call answers 499, "
    "even if ComfyUI finished it meanwhile; 404 `failed` means no job with this id is in "
    "flight (unknown, or its result was already decided: its /prompt call answers that).",
)
async def interrupt(
    data: InterruptRequest,
    lifecycle: NamedDependency[JobLifecycle],
    request: Request[Any, Any, Any],
) -> Response[InterruptResponse]:
    """Interrupt a job by its API id: 200 ``{"id", "interrupted": "success"}`` or 404
    ``{"id", "interrupted": "failed"}``.

    The decision is atomic (:meth:`~comfy_sidecar.comfy.executions.Job.cancel`): a job whose
    result is already decided answers 404 ``failed``, as comfyui-api does for an id that is no
    longer in flight (behaviour doc E5: a prompt that finished), rather than 409, so a
    comfyui-api client reads it the same way; otherwise the job is marked interrupted before
    ComfyUI is told, and its caller gets 499. With JOBS_VISIBLE_TO=owner a key interrupts only
    its own jobs: another key's answers 404 ``failed``, as an unknown id does.
    """
    key = caller_of(request.scope)
    owner_only = lifecycle.pipeline.settings.jobs_visible_to == "owner"
    ok = (not owner_only or key is None or lifecycle.owner_of(data.id) == key.name) and (
        await lifecycle.pipeline.interrupt(data.id)
    )
    return Response(
        InterruptResponse(id=data.id, interrupted="success" if ok else "failed"),
        status_code=200 if ok else 404,
    )
