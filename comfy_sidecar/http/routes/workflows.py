"""``POST /workflow/<sub/dirs>/<name>``: one route per module in WORKFLOW_DIR.

Each route takes ``{"input": <the module's RequestSchema>, ...every /prompt field but prompt}``,
generates the prompt and runs it through the /prompt pipeline in-process (comfyui-api loops
back over HTTP); every response also carries ``input``. The workflow's context reads ComfyUI
live and knows the warmup prompt's checkpoint (``ctx.warmup_checkpoint``, comfyui-api's
``config.warmupCkpt``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler

from comfy_sidecar.http.auth import caller_of
from comfy_sidecar.http.routes.prompt import RESULT_RESPONSES, respond
from comfy_sidecar.jobs.lifecycle import JobLifecycle

if TYPE_CHECKING:
    from comfy_sidecar.workflows import Workflow


class WorkflowHost:
    """What a workflow endpoint needs besides the job lifecycle: ``get_json(path)`` asks
    ComfyUI live, ``warmup_prompt()`` is the warmup prompt (None: none) for its checkpoint."""

    def __init__(self, get_json: Callable[[str], Any], warmup_prompt: Callable[[], Any]) -> None:
        self.get_json = get_json
        self.warmup_prompt = warmup_prompt


def workflow_route(workflow: Workflow, markdown: bool) -> HTTPRouteHandler:
    """A Litestar handler for ``workflow``, documented with its body type."""
    from comfy_sidecar.workflows import WorkflowContext, prompt_checkpoint

    async def handler(
        data: Any,
        lifecycle: NamedDependency[JobLifecycle],
        workflow_host: NamedDependency[WorkflowHost],
        request: Request[Any, Any, Any],
    ) -> Response[Any]:
        lifecycle.admit_check()
        warmup_checkpoint = prompt_checkpoint(workflow_host.warmup_prompt())
        ctx = WorkflowContext(workflow_host.get_json, warmup_checkpoint=warmup_checkpoint)
        prompt, input_ = await workflow.prepare(data, ctx)  # WorkflowError: answered by app.py
        delivered = await lifecycle.answer(
            prompt, msgspec.to_builtins(input_), key=caller_of(request.scope)
        )
        return respond(delivered)

    handler.__annotations__ = {
        "data": workflow.body_type,
        "lifecycle": NamedDependency[JobLifecycle],
        "workflow_host": NamedDependency[WorkflowHost],
        "request": Request[Any, Any, Any],
        "return": Response[Any],
    }
    handler.__name__ = "workflow_" + workflow.name.replace("/", "_").replace(".", "_").replace(
        "-", "_"
    )
    return post(
        workflow.route,
        summary=workflow.summary,
        description=workflow.route_description(markdown),
        tags=["workflows"],
        status_code=200,
        responses=RESULT_RESPONSES,
        operation_id=handler.__name__,
    )(handler)
