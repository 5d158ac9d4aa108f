"""Stable Diffusion 1.5 text-to-image, equivalent to comfyui-api's ``sd1.5/txt2img`` example.

Route: ``POST /workflow/sd1.5/txt2img``. Defaults copy comfyui-api's: 512x512, 20 steps,
cfg 8, ``euler``/``normal``, denoise 1. Added: ``batch_size``. ``sampler_name`` and
``scheduler`` are checked against what ComfyUI offers when the request runs (custom-node
samplers included), ``checkpoint`` against ``models/checkpoints`` unless it is a URL.
The field types and the graph builder are shared: :mod:`comfy_sidecar.workflows`.
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

summary = "Text to image (SD 1.5)"
description = "Generates images from a text prompt with a Stable Diffusion 1.5 checkpoint."


class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Input of the SD 1.5 txt2img workflow."""

    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    width: ImageWidth = 512
    height: ImageHeight = 512
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
    return await text_to_image(
        request,
        ctx,
        SamplerNodes(sampler="3", checkpoint="4", positive="6", negative="7", decode="8", save="9"),
        latent="5",
    )
