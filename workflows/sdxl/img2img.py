"""Stable Diffusion XL image-to-image, equivalent to comfyui-api's ``sdxl/img2img`` example.

Route: ``POST /workflow/sdxl/img2img``. Defaults copy comfyui-api's: 20 steps, cfg 5.5,
``dpmpp_2m_sde_gpu``/``exponential``, denoise 0.75, the input resized (core ``ImageScale``,
center crop) to ``target_width`` x ``target_height`` = 1024x1024, and ``width``/``height`` =
4096 as the size the SDXL text encoder is conditioned on (``CLIPTextEncodeSDXL``). comfyui-api's
``negative_prompt`` has no default, which makes ComfyUI reject the prompt when it is omitted;
here it defaults to "text, watermark" as in its txt2img. Added: ``batch_size``. The shared
field types and the graph builder: :mod:`comfy_sidecar.workflows`.
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

summary = "Image to image (SDXL)"
description = "Text-guided image-to-image generation with a Stable Diffusion XL checkpoint."


class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Input of the SDXL img2img workflow."""

    prompt: Prompt
    image: InputImage
    negative_prompt: NegativePrompt = "text, watermark"
    width: Annotated[
        int, Meta(ge=256, le=4096, description="Width the text encoder is conditioned on")
    ] = 4096
    height: Annotated[
        int, Meta(ge=256, le=4096, description="Height the text encoder is conditioned on")
    ] = 4096
    seed: Seed = msgspec.field(default_factory=random_seed)
    steps: Steps = 20
    cfg_scale: CfgScale = 5.5
    sampler_name: SamplerName = "dpmpp_2m_sde_gpu"
    scheduler: Scheduler = "exponential"
    denoise: Denoise = 0.75
    checkpoint: Checkpoint = None
    upscale_method: Annotated[
        UpscaleMethod, Meta(description="Interpolation used to resize the input image")
    ] = "nearest-exact"
    target_width: Annotated[
        int, Meta(ge=256, le=4096, description="Width the input image is resized to")
    ] = 1024
    target_height: Annotated[
        int, Meta(ge=256, le=4096, description="Height the input image is resized to")
    ] = 1024
    batch_size: BatchSize = 1


async def generate(request: RequestSchema, ctx: WorkflowContext) -> dict[str, Any]:
    """The API-format prompt for ``request`` (node ids of comfyui-api's example graph)."""
    nodes = SamplerNodes(
        decode="8",
        save="9",
        checkpoint="14",
        checkpoint_title="Load Checkpoint Base",
        positive="16",
        negative="19",
        sampler="36",
    )
    return await image_to_image(
        request,
        ctx,
        nodes,
        ImageNodes(load="38", encode="39", scale="40", repeat="41"),
        width=request.target_width,
        height=request.target_height,
        crop="center",
        sdxl_size=(request.width, request.height),
        filename_prefix="img2img",
    )
