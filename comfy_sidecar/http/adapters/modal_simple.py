"""The simple Modal ComfyUI API: ``POST /submit_workflow`` and ``GET /status?call_id=``.

Copies its README: ``POST /submit_workflow {workflow}`` answers 202 ``{id, status: "RUNNING"}``
(``call_id`` repeats ``id``: the README polls with "the call_id" the submission returned);
``GET /status?call_id=`` answers 202 ``{id, status: "RUNNING"}`` while the job is pending or
running, 200 ``{id, status: "COMPLETED", output: {images: [{filename, type: "base64", data}]}}``
(every output file, not only images) or 200 ``{id, status: "FAILED", error}``. Errors keep our
``{error, location}`` body with the README's statuses (400 ``Invalid call_id format``, 404 for an
unknown id) and add its ``detail`` key. With JOB_QUEUE_URL any replica answers ``/status``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from litestar import Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from msgspec import Meta

from comfy_sidecar.errors import InputError, NotFound
from comfy_sidecar.http.adapters.common import new_job_id, outputs_with_data, prompt_request, submit
from comfy_sidecar.http.routes.prompt import ERROR_RESPONSES
from comfy_sidecar.jobs.backend import JobBackend
from comfy_sidecar.jobs.model import JobStatus
from comfy_sidecar.schemas import ErrorResponse
from comfy_sidecar.webhooks.adapters import message_of

_CALL_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class SubmitWorkflow(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /submit_workflow``."""

    workflow: Annotated[Any, Meta(description="ComfyUI API-format workflow (a JSON object).")]


class Running(msgspec.Struct, kw_only=True):
    """A job that has not ended."""

    id: str
    call_id: str
    status: Literal["RUNNING"] = "RUNNING"


class Base64Image(msgspec.Struct, kw_only=True):
    """One output file, base64."""

    filename: str
    type: Literal["base64"]
    data: str


class Output(msgspec.Struct, kw_only=True):
    """A completed job's files."""

    images: list[Base64Image]


class Completed(msgspec.Struct, kw_only=True):
    """A completed job."""

    id: str
    status: Literal["COMPLETED"]
    output: Output


class Failed(msgspec.Struct, kw_only=True):
    """A job that failed, was cancelled or timed out."""

    id: str
    status: Literal["FAILED"]
    error: str


class DetailedError(ErrorResponse, kw_only=True, omit_defaults=True):
    """Our error body plus the README's ``detail``."""

    detail: str | None = None


@post(
    "/submit_workflow",
    summary="Submit a workflow (simple Modal API)",
    tags=["modal simple"],
    status_code=202,
    responses={
        202: ResponseSpec(Running, description="Accepted; poll `/status?call_id=<id>`."),
        400: ResponseSpec(DetailedError, description="A bad workflow; `location` names it."),
        503: ERROR_RESPONSES[503],
    },
    description="`{workflow}`: an API-format workflow with at least one output node. Checked "
    "before the answer (a bad workflow is a 400).",
)
async def submit_workflow(
    data: SubmitWorkflow, jobs: NamedDependency[JobBackend]
) -> Response[Running]:
    """Submit a workflow."""
    try:
        request = prompt_request(data.workflow, new_job_id(), "workflow")
    except InputError as exc:
        raise InputError(exc.message, exc.location, detail=exc.message) from None
    view = await submit(jobs, request, "modal_simple", "workflow")
    return Response(Running(id=view.id, call_id=view.id), status_code=202)


@get(
    "/status",
    summary="A workflow's status and images (simple Modal API)",
    tags=["modal simple"],
    responses={
        200: ResponseSpec(Completed, description="COMPLETED with the outputs, or FAILED."),
        202: ResponseSpec(Running, description="Still running."),
        400: ResponseSpec(DetailedError, description="`Invalid call_id format`."),
        404: ResponseSpec(DetailedError, description="No such call id is retained."),
    },
    description="202 `RUNNING` while the job is queued or running; 200 `COMPLETED` with "
    "`output.images` (every output file as base64) or 200 `FAILED` with `error`.",
)
async def workflow_status(
    jobs: NamedDependency[JobBackend],
    call_id: Annotated[str | None, Parameter(description="The id `/submit_workflow` gave.")] = None,
) -> Response[Any]:
    """Poll a workflow."""
    if call_id is None or not _CALL_ID.match(call_id):
        raise InputError("Invalid call_id format", "call_id", detail="Invalid call_id format")
    view = await jobs.get(call_id)
    if view is None:
        message = f"Call ID not found or invalid: {call_id}"
        raise NotFound(message, location="call_id", detail=message)
    if not view.ended:
        return Response(Running(id=call_id, call_id=call_id), status_code=202)
    if view.status is JobStatus.COMPLETED:
        images = [
            Base64Image(filename=output["filename"], type="base64", data=output.get("data") or "")
            for output in await outputs_with_data(jobs, view)
        ]
        return Response(
            Completed(id=call_id, status="COMPLETED", output=Output(images=images)),
            status_code=200,
        )
    error = message_of(view.status, view.error) or "failed"
    return Response(Failed(id=call_id, status="FAILED", error=error), status_code=200)


ROUTES = [submit_workflow, workflow_status]
