"""Stable Diffusion XL text-to-image, equivalent to comfyui-api's ``sdxl/txt2img`` example.

Route: ``POST /workflow/sdxl/txt2img``. Defaults copy comfyui-api's: 1024x1024, 20 steps,
cfg 8, ``euler``/``normal``, denoise 1, negative prompt "text, watermark". Added:
``batch_size``. The field types and the graph builder are shared:
:mod:`comfy_sidecar.workflows`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from comfy_sidecar.workflows import (
    BatchSize,
    CfgScale,
    Checkpoint,
    Denoise,
    ImageHeight,
    ImageWidth,
    NegativePrompt,
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

summary = "Text to image (SDXL)"
description = "Generates images from a text prompt with a Stable Diffusion XL checkpoint."


class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Input of the SDXL txt2img workflow."""

    prompt: Prompt
    negative_prompt: NegativePrompt = "text, watermark"
    width: ImageWidth = 1024
    height: ImageHeight = 1024
    seed: Seed = msgspec.field(default_factory=random_seed)
    steps: Steps = 20
    cfg_scale: CfgScale = 8.0
    sampler_name: SamplerName = "euler"
    scheduler: Scheduler = "normal"
    denoise: Denoise = 1.0
    checkpoint: Checkpoint = None
    batch_size: BatchSize = 1


async def generate(request: RequestSchema, ctx: WorkflowContext) -> dict[str, Any]:
    """The API-format prompt for ``request`` (node ids of comfyui-api's example graph)."""
    nodes = SamplerNodes(
        checkpoint="4",
        checkpoint_title="Load Checkpoint - BASE",
        positive="6",
        negative="7",
        decode="17",
        save="19",
        sampler="49",
    )
    return await text_to_image(request, ctx, nodes, latent="5")
