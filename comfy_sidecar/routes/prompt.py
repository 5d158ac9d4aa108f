"""``POST /prompt`` and ``POST /interrupt``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar import Response, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Stream

from comfy_sidecar.pipeline.outputs import stream_result
from comfy_sidecar.pipeline.run import JobResult, PipelineError
from comfy_sidecar.schemas import (
    ErrorResponse,
    InterruptRequest,
    InterruptResponse,
    PromptOptions,
    PromptRequest,
    PromptResponse,
)

if TYPE_CHECKING:
    from comfy_sidecar.service import Sidecar

_NOT_YET = (
    "webhook",
    "webhook_v2",
    "convert_output",
    "s3",
    "hf_upload",
    "azure_blob_upload",
    "http_upload",
)

ERROR_RESPONSES = {
    400: ResponseSpec(
        ErrorResponse,
        description="A caller's mistake or ComfyUI's validation error; `location` names the field.",
    ),
    409: ResponseSpec(ErrorResponse, description="A job with this id is already running."),
    413: ResponseSpec(ErrorResponse, description="Body larger than MAX_BODY_SIZE_MB."),
    499: ResponseSpec(ErrorResponse, description="The job was interrupted (POST /interrupt)."),
    500: ResponseSpec(
        ErrorResponse,
        description="ComfyUI failed executing the prompt: node, exception and ComfyUI's log tail.",
    ),
    503: ResponseSpec(
        ErrorResponse,
        description="ComfyUI is not ready, went away, or the sidecar is shutting down.",
    ),
    504: ResponseSpec(ErrorResponse, description="The job exceeded PROMPT_TIMEOUT_S."),
}


def admit(sidecar: Sidecar) -> None:
    """Raise 503 unless the sidecar can take work now."""
    if sidecar.phase.value == "stopping":
        raise PipelineError(503, {"error": "the sidecar is shutting down"})
    if sidecar.phase.value != "ready" or not sidecar.events.connected:
        _, reason = sidecar.readiness()
        raise PipelineError(503, {"error": f"ComfyUI is not ready ({reason})"})


def check_supported(options: PromptOptions) -> None:
    """Refuse fields whose capability is not built yet (400 naming the field)."""
    for name in _NOT_YET:
        if getattr(options, name) is not None:
            raise PipelineError(
                400, {"error": f"`{name}` is not supported yet by this build", "location": name}
            )


def result_response(result: JobResult, extra: dict[str, Any] | None = None) -> Stream:
    """Stream a finished job as comfyui-api's 200 body; output files are removed afterwards."""
    head: dict[str, Any] = {"id": result.job.id, "prompt": result.prompt}
    if extra:
        head.update(extra)
    return Stream(
        stream_result(head, result.files, None, lambda: {"stats": result.stats()}, result.release),
        media_type="application/json",
        status_code=200,
    )


@post(
    "/prompt",
    summary="Run a prompt",
    tags=["prompt"],
    status_code=200,
    responses={
        200: ResponseSpec(PromptResponse, description="Outputs as base64."),
        **ERROR_RESPONSES,
    },
    description="Queue an API-format prompt on ComfyUI, wait for it and answer with every "
    "output of every output node (base64, in node id order).",
)
async def prompt(data: PromptRequest, state: State) -> Stream:
    """Synchronous prompt."""
    sidecar: Sidecar = state.sidecar
    admit(sidecar)
    check_supported(data)
    result = await sidecar.pipeline.run(data)
    return result_response(result)


@post(
    "/interrupt",
    summary="Stop a job",
    tags=["prompt"],
    status_code=200,
    responses={404: ResponseSpec(InterruptResponse, description="No job with this id.")},
    description="A pending job is removed from ComfyUI's queue; a running one is interrupted "
    "(at ComfyUI's next node boundary). Its /prompt call answers 499.",
)
async def interrupt(data: InterruptRequest, state: State) -> Response[InterruptResponse]:
    """Interrupt a job by its API id."""
    sidecar: Sidecar = state.sidecar
    ok = await sidecar.pipeline.interrupt(data.id)
    return Response(
        InterruptResponse(id=data.id, interrupted="success" if ok else "failed"),
        status_code=200 if ok else 404,
    )
