"""Stable Diffusion XL image-to-image, equivalent to comfyui-api's ``sdxl/img2img`` example.

Route: ``POST /workflow/sdxl/img2img``. Defaults copy comfyui-api's: 20 steps, cfg 5.5,
``dpmpp_2m_sde_gpu``/``exponential``, denoise 0.75, the input resized (core ``ImageScale``,
center crop) to ``target_width`` x ``target_height`` = 1024x1024, and ``width``/``height`` =
4096 as the size the SDXL text encoder is conditioned on (``CLIPTextEncodeSDXL``). comfyui-api's
``negative_prompt`` has no default, which makes ComfyUI reject the prompt when it is omitted;
here it defaults to "text, watermark" as in its txt2img. Added: ``batch_size``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from comfy_sidecar.workflows import WorkflowContext, check_choice, random_seed, resolve_model

summary = "Image to image (SDXL)"
description = "Text-guided image-to-image generation with a Stable Diffusion XL checkpoint."

UpscaleMethod = Literal["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Input of the SDXL img2img workflow."""

    prompt: Annotated[str, Meta(description="The positive prompt for image generation")]
    image: Annotated[
        str, Meta(min_length=1, description="Input image for img2img: a URL or base64 data")
    ]
    negative_prompt: Annotated[
        str, Meta(description="The negative prompt for image generation")
    ] = "text, watermark"
    width: Annotated[
        int, Meta(ge=256, le=4096, description="Width the text encoder is conditioned on")
    ] = 4096
    height: Annotated[
        int, Meta(ge=256, le=4096, description="Height the text encoder is conditioned on")
    ] = 4096
    seed: Annotated[
        int,
        Meta(ge=0, description="Seed for random number generation; random if omitted"),
    ] = msgspec.field(default_factory=random_seed)
    steps: Annotated[int, Meta(ge=1, le=100, description="Number of sampling steps")] = 20
    cfg_scale: Annotated[float, Meta(ge=0, le=20, description="Classifier-free guidance scale")] = (
        5.5
    )
    sampler_name: Annotated[str, Meta(description="Name of the sampler to use")] = (
        "dpmpp_2m_sde_gpu"
    )
    scheduler: Annotated[str, Meta(description="Type of scheduler to use")] = "exponential"
    denoise: Annotated[float, Meta(ge=0, le=1, description="Denoising strength")] = 0.75
    checkpoint: Annotated[
        str | None,
        Meta(
            description="Checkpoint file in `models/checkpoints`, or a URL. Default: the "
            "warmup prompt's checkpoint, else the first installed one."
        ),
    ] = None
    upscale_method: Annotated[
        UpscaleMethod, Meta(description="Interpolation used to resize the input image")
    ] = "nearest-exact"
    target_width: Annotated[
        int, Meta(ge=256, le=4096, description="Width the input image is resized to")
    ] = 1024
    target_height: Annotated[
        int, Meta(ge=256, le=4096, description="Height the input image is resized to")
    ] = 1024
    batch_size: Annotated[int, Meta(ge=1, le=16, description="Images per request")] = 1


def _encode(text: str, request: RequestSchema) -> dict[str, Any]:
    return {
        "class_type": "CLIPTextEncodeSDXL",
        "inputs": {
            "width": request.width,
            "height": request.height,
            "crop_w": 0,
            "crop_h": 0,
            "target_width": request.width,
            "target_height": request.height,
            "text_g": text,
            "text_l": text,
            "clip": ["14", 1],
        },
        "_meta": {"title": "CLIPTextEncodeSDXL"},
    }


async def generate(request: RequestSchema, ctx: WorkflowContext) -> dict[str, Any]:
    """The API-format prompt for ``request``."""
    checkpoint = await resolve_model(
        ctx, "checkpoint", request.checkpoint, "checkpoints", default=ctx.warmup_checkpoint
    )
    sampler = check_choice("sampler_name", request.sampler_name, await ctx.samplers())
    scheduler = check_choice("scheduler", request.scheduler, await ctx.schedulers())
    return {
        "8": {
            "class_type": "VAEDecode",
            "inputs": {"samples": ["36", 0], "vae": ["14", 2]},
            "_meta": {"title": "VAE Decode"},
        },
        "9": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "img2img", "images": ["8", 0]},
            "_meta": {"title": "Save Image"},
        },
        "14": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": checkpoint},
            "_meta": {"title": "Load Checkpoint Base"},
        },
        "16": _encode(request.prompt, request),
        "19": _encode(request.negative_prompt, request),
        "36": {
            "class_type": "KSampler",
            "inputs": {
                "seed": request.seed,
                "steps": request.steps,
                "cfg": request.cfg_scale,
                "sampler_name": sampler,
                "scheduler": scheduler,
                "denoise": request.denoise,
                "model": ["14", 0],
                "positive": ["16", 0],
                "negative": ["19", 0],
                "latent_image": ["41", 0],
            },
            "_meta": {"title": "KSampler"},
        },
        "38": {
            "class_type": "LoadImage",
            "inputs": {"image": request.image},
            "_meta": {"title": "Load Image"},
        },
        "39": {
            "class_type": "VAEEncode",
            "inputs": {"pixels": ["40", 0], "vae": ["14", 2]},
            "_meta": {"title": "VAE Encode"},
        },
        "40": {
            "class_type": "ImageScale",
            "inputs": {
                "upscale_method": request.upscale_method,
                "width": request.target_width,
                "height": request.target_height,
                "crop": "center",
                "image": ["38", 0],
            },
            "_meta": {"title": "Upscale Image"},
        },
        "41": {
            "class_type": "RepeatLatentBatch",
            "inputs": {"samples": ["39", 0], "amount": request.batch_size},
            "_meta": {"title": "Repeat Latent Batch"},
        },
    }
