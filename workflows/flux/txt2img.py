"""Flux text-to-image, equivalent to comfyui-api's ``flux/txt2img`` example.

Route: ``POST /workflow/flux/txt2img``. Expects an all-in-one Flux checkpoint (e.g.
``flux1-schnell-fp8.safetensors``) loaded with ``CheckpointLoaderSimple``. Defaults copy
comfyui-api's: 1024x1024, 4 steps, cfg 1, ``euler``/``simple``, denoise 1, an empty negative
prompt. Added: ``negative_prompt`` (ignored by Flux at cfg 1) and ``batch_size``. The field
types and the graph builder are shared: :mod:`comfy_sidecar.workflows`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from comfy_sidecar.workflows import (
    BatchSize,
    CfgScale,
    Checkpoint,
    Denoise,
    ImageHeight,
    ImageWidth,
    Prompt,
    SamplerName,
    SamplerNodes,
    Scheduler,
    Seed,
    Steps,
    WorkflowContext,
    random_seed,
    text_to_image,
)

summary = "Text to image (Flux)"
description = "Generates images from a text prompt with an all-in-one Flux checkpoint."


class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Input of the Flux txt2img workflow."""

    prompt: Prompt
    negative_prompt: Annotated[
        str, Meta(description="The negative prompt (has an effect only with cfg_scale > 1)")
    ] = ""
    width: ImageWidth = 1024
    height: ImageHeight = 1024
    seed: Seed = msgspec.field(default_factory=random_seed)
    steps: Steps = 4
    cfg_scale: CfgScale = 1.0
    sampler_name: SamplerName = "euler"
    scheduler: Scheduler = "simple"
    denoise: Denoise = 1.0
    checkpoint: Checkpoint = None
    batch_size: BatchSize = 1


async def generate(request: RequestSchema, ctx: WorkflowContext) -> dict[str, Any]:
    """The API-format prompt for ``request`` (node ids of comfyui-api's example graph)."""
    nodes = SamplerNodes(
        positive="6",
        positive_title="CLIP Text Encode (Positive Prompt)",
        decode="8",
        save="9",
        checkpoint="30",
        sampler="31",
        negative="33",
    )
    return await text_to_image(
        request,
        ctx,
        nodes,
        latent="27",
        latent_class="EmptySD3LatentImage",
        filename_prefix="Flux",
    )
