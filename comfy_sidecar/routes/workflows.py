"""``POST /workflow/<sub/dirs>/<name>``: one route per module in WORKFLOW_DIR.

Each route takes ``{"input": <the module's RequestSchema>, ...every /prompt field but prompt}``,
generates the prompt and runs it through the /prompt pipeline in-process (comfyui-api loops
back over HTTP); every response also carries ``input``. The workflow's context reads ComfyUI
live and knows the warmup prompt's checkpoint (``ctx.warmup_checkpoint``, comfyui-api's
``config.warmupCkpt``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Response, post
from litestar.datastructures import State
from litestar.handlers import HTTPRouteHandler

from comfy_sidecar.routes.prompt import RESULT_RESPONSES, admit, respond

if TYPE_CHECKING:
    from comfy_sidecar.service import Sidecar
    from comfy_sidecar.workflows import Workflow


def workflow_route(workflow: Workflow, markdown: bool) -> HTTPRouteHandler:
    """A Litestar handler for ``workflow``, documented with its body type."""
    from comfy_sidecar.workflows import WorkflowContext, prompt_checkpoint

    async def handler(data: Any, state: State) -> Response[Any]:
        sidecar: Sidecar = state.sidecar
        admit(sidecar)
        warmup_checkpoint = prompt_checkpoint(sidecar.warmup_prompt)
        ctx = WorkflowContext(sidecar.client.get_json, warmup_checkpoint=warmup_checkpoint)
        request, input_ = await workflow.prepare(data, ctx)  # WorkflowError: answered by app.py
        delivered = await sidecar.delivery.handle(request, msgspec.to_builtins(input_))
        return respond(delivered)

    handler.__annotations__ = {"data": workflow.body_type, "state": State, "return": Response[Any]}
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
