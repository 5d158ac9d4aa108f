"""Typed workflow endpoints: Python modules in ``WORKFLOW_DIR`` -> ``POST /workflow/<path>``.

comfyui-api (its B29) transpiles and ``eval``\\ s TypeScript files exporting a Zod
``RequestSchema`` and ``generateWorkflow(input)``, then loops back over HTTP to ``/prompt``. Here a
workflow is a plain Python module that imports what it needs from this package:

.. code-block:: python

    from typing import Annotated
    import msgspec
    from comfy_sidecar.workflows import InputError, WorkflowContext

    summary = "Invert"                      # optional, OpenAPI summary
    description = "Inverts an image."       # optional, OpenAPI description

    class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
        image: Annotated[str, msgspec.Meta(description="URL or base64 of the input image")]
        width: Annotated[int, msgspec.Meta(ge=64, le=4096, description="Output width")] = 512

    async def generate(request: RequestSchema, ctx: WorkflowContext) -> dict:
        return {...}                        # an API-format prompt

``generate`` (``generate_workflow`` is accepted too) may be sync or async and take one parameter
(the request) or two (request, :class:`WorkflowContext`). A sync ``generate`` runs in a worker
thread. Modules cannot import each other; what they share is exported here.

The package, by concept:

* :mod:`~comfy_sidecar.workflows.author`: :class:`WorkflowContext` (ComfyUI's models, samplers,
  schedulers, read live), :func:`random_seed`, :func:`check_choice`, :func:`resolve_model`;
* :mod:`~comfy_sidecar.workflows.errors`: :class:`InputError` (raised by modules) and the
  :class:`WorkflowError` bodies (400 ``input.<field>``, 400 generate failure, 502);
* :mod:`~comfy_sidecar.workflows.fields`: shared ``RequestSchema`` field types (``Prompt``,
  ``Steps``, ``Seed``, ...);
* :mod:`~comfy_sidecar.workflows.graphs`: :func:`text_to_image`, :func:`image_to_image`,
  :func:`node` and the node-id records;
* :mod:`~comfy_sidecar.workflows.loader`: :func:`load_workflows` (one :class:`Workflow` per
  module; modules that fail to import are logged and skipped);
* :mod:`~comfy_sidecar.workflows.workflow`: :class:`Workflow` (decode the body, run
  ``generate``, build the /prompt request);
* :mod:`~comfy_sidecar.workflows.docs`: the Markdown table of the OpenAPI description.
"""

from __future__ import annotations

from comfy_sidecar.workflows.author import (
    GetJson,
    WorkflowContext,
    check_choice,
    prompt_checkpoint,
    random_seed,
    resolve_model,
)
from comfy_sidecar.workflows.docs import input_markdown_table
from comfy_sidecar.workflows.errors import (
    InputError,
    WorkflowContextError,
    WorkflowError,
    WorkflowGenerateError,
    WorkflowInputError,
)
from comfy_sidecar.workflows.fields import (
    BatchSize,
    CfgScale,
    Checkpoint,
    Denoise,
    ImageHeight,
    ImageToImageRequest,
    ImageWidth,
    InputImage,
    NegativePrompt,
    Prompt,
    SamplerName,
    SamplingRequest,
    Scheduler,
    Seed,
    Steps,
    TextToImageRequest,
    UpscaleMethod,
)
from comfy_sidecar.workflows.graphs import (
    ImageNodes,
    LatentClass,
    SamplerNodes,
    Sampling,
    image_to_image,
    node,
    resolve_sampling,
    text_to_image,
)
from comfy_sidecar.workflows.loader import MODULE_PACKAGE, load_workflows
from comfy_sidecar.workflows.workflow import Workflow, validation_error_location

__all__ = [
    "MODULE_PACKAGE",
    "BatchSize",
    "CfgScale",
    "Checkpoint",
    "Denoise",
    "GetJson",
    "ImageHeight",
    "ImageNodes",
    "ImageToImageRequest",
    "ImageWidth",
    "InputError",
    "InputImage",
    "LatentClass",
    "NegativePrompt",
    "Prompt",
    "SamplerName",
    "SamplerNodes",
    "Sampling",
    "SamplingRequest",
    "Scheduler",
    "Seed",
    "Steps",
    "TextToImageRequest",
    "UpscaleMethod",
    "Workflow",
    "WorkflowContext",
    "WorkflowContextError",
    "WorkflowError",
    "WorkflowGenerateError",
    "WorkflowInputError",
    "check_choice",
    "image_to_image",
    "input_markdown_table",
    "load_workflows",
    "node",
    "prompt_checkpoint",
    "random_seed",
    "resolve_model",
    "resolve_sampling",
    "text_to_image",
    "validation_error_location",
]
