"""Stable Diffusion 1.5 image-to-image, equivalent to comfyui-api's ``sd1.5/img2img`` example.

Route: ``POST /workflow/sd1.5/img2img``. Defaults copy comfyui-api's: 512x512, 15 steps, cfg 8,
``euler``/``normal``, denoise 0.8, negative prompt "text, watermark". comfyui-api resizes with
the custom node ``ImageResize+`` (ComfyUI_essentials); this module uses core ``ImageScale``
(``upscale_method`` and ``crop`` replace its ``interpolation``/``resize_method``/
``resize_condition``/``multiple_of``). Added: ``batch_size`` (``RepeatLatentBatch``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from comfy_sidecar.workflows import WorkflowContext, check_choice, random_seed, resolve_model

summary = "Image to image (SD 1.5)"
description = "Text-guided image-to-image generation with a Stable Diffusion 1.5 checkpoint."

UpscaleMethod = Literal["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Input of the SD 1.5 img2img workflow."""

    prompt: Annotated[str, Meta(description="The positive prompt for image generation")]
    image: Annotated[
        str, Meta(min_length=1, description="Input image for img2img: a URL or base64 data")
    ]
    negative_prompt: Annotated[
        str, Meta(description="The negative prompt for image generation")
    ] = "text, watermark"
    seed: Annotated[
        int,
        Meta(ge=0, description="Seed for random number generation; random if omitted"),
    ] = msgspec.field(default_factory=random_seed)
    steps: Annotated[int, Meta(ge=1, le=100, description="Number of sampling steps")] = 15
    cfg_scale: Annotated[float, Meta(ge=0, le=20, description="Classifier-free guidance scale")] = (
        8.0
    )
    sampler_name: Annotated[str, Meta(description="Name of the sampler to use")] = "euler"
    scheduler: Annotated[str, Meta(description="Type of scheduler to use")] = "normal"
    denoise: Annotated[float, Meta(ge=0, le=1, description="Denoising strength")] = 0.8
    checkpoint: Annotated[
        str | None,
        Meta(
            description="Checkpoint file in `models/checkpoints`, or a URL. Default: the "
            "warmup prompt's checkpoint, else the first installed one."
        ),
    ] = None
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
    batch_size: Annotated[int, Meta(ge=1, le=16, description="Images per request")] = 1


async def generate(request: RequestSchema, ctx: WorkflowContext) -> dict[str, Any]:
    """The API-format prompt for ``request``."""
    checkpoint = await resolve_model(
        ctx, "checkpoint", request.checkpoint, "checkpoints", default=ctx.warmup_checkpoint
    )
    sampler = check_choice("sampler_name", request.sampler_name, await ctx.samplers())
    scheduler = check_choice("scheduler", request.scheduler, await ctx.schedulers())
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": request.seed,
                "steps": request.steps,
                "cfg": request.cfg_scale,
                "sampler_name": sampler,
                "scheduler": scheduler,
                "denoise": request.denoise,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["13", 0],
            },
            "_meta": {"title": "KSampler"},
        },
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": checkpoint},
            "_meta": {"title": "Load Checkpoint"},
        },
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": request.prompt, "clip": ["4", 1]},
            "_meta": {"title": "CLIP Text Encode (Prompt)"},
        },
        "7": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": request.negative_prompt, "clip": ["4", 1]},
            "_meta": {"title": "CLIP Text Encode (Negative Prompt)"},
        },
        "8": {
            "class_type": "VAEDecode",
            "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
            "_meta": {"title": "VAE Decode"},
        },
        "9": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
            "_meta": {"title": "Save Image"},
        },
        "10": {
            "class_type": "LoadImage",
            "inputs": {"image": request.image},
            "_meta": {"title": "Load Image"},
        },
        "11": {
            "class_type": "ImageScale",
            "inputs": {
                "upscale_method": request.upscale_method,
                "width": request.width,
                "height": request.height,
                "crop": request.crop,
                "image": ["10", 0],
            },
            "_meta": {"title": "Upscale Image"},
        },
        "12": {
            "class_type": "VAEEncode",
            "inputs": {"pixels": ["11", 0], "vae": ["4", 2]},
            "_meta": {"title": "VAE Encode"},
        },
        "13": {
            "class_type": "RepeatLatentBatch",
            "inputs": {"samples": ["12", 0], "amount": request.batch_size},
            "_meta": {"title": "Repeat Latent Batch"},
        },
    }
