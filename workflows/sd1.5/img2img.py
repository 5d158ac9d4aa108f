"""Stable Diffusion 1.5 image-to-image, equivalent to comfyui-api's ``sd1.5/img2img`` example.

Route: ``POST /workflow/sd1.5/img2img``. Defaults copy comfyui-api's: 512x512, 15 steps, cfg 8,
``euler``/``normal``, denoise 0.8, negative prompt "text, watermark". comfyui-api resizes with
the custom node ``ImageResize+`` (ComfyUI_essentials); this module uses core ``ImageScale``
(``upscale_method`` and ``crop`` replace its ``interpolation``/``resize_method``/
``resize_condition``/``multiple_of``). Added: ``batch_size`` (``RepeatLatentBatch``). The
shared field types and the graph builder: :mod:`comfy_sidecar.workflows`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from comfy_sidecar.workflows import (
    BatchSize,
    CfgScale,
    Checkpoint,
    Denoise,
    ImageNodes,
    InputImage,
    NegativePrompt,
    Prompt,
    SamplerName,
    SamplerNodes,
    Scheduler,
    Seed,
    Steps,
    UpscaleMethod,
    WorkflowContext,
    image_to_image,
    random_seed,
)

summary = "Image to image (SD 1.5)"
description = "Text-guided image-to-image generation with a Stable Diffusion 1.5 checkpoint."


class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Input of the SD 1.5 img2img workflow."""

    prompt: Prompt
    image: InputImage
    negative_prompt: NegativePrompt = "text, watermark"
    seed: Seed = msgspec.field(default_factory=random_seed)
    steps: Steps = 15
    cfg_scale: CfgScale = 8.0
    sampler_name: SamplerName = "euler"
    scheduler: Scheduler = "normal"
    denoise: Denoise = 0.8
    checkpoint: Checkpoint = None
    width: Annotated[
        int, Meta(ge=0, le=2048, description="Width the image is resized to (0: keep ratio)")
    ] = 512
    height: Annotated[
        int, Meta(ge=0, le=2048, description="Height the image is resized to (0: keep ratio)")
    ] = 512
    upscale_method: Annotated[
        UpscaleMethod, Meta(description="Interpolation used to resize the image")
    ] = "nearest-exact"
    crop: Annotated[
        Literal["disabled", "center"],
        Meta(description="`center` crops to the target aspect ratio; `disabled` stretches"),
    ] = "center"
    batch_size: BatchSize = 1


async def generate(request: RequestSchema, ctx: WorkflowContext) -> dict[str, Any]:
    """The API-format prompt for ``request`` (node ids of comfyui-api's example graph)."""
    return await image_to_image(
        request,
        ctx,
        SamplerNodes(sampler="3", checkpoint="4", positive="6", negative="7", decode="8", save="9"),
        ImageNodes(load="10", scale="11", encode="12", repeat="13"),
        width=request.width,
        height=request.height,
        crop=request.crop,
    )
