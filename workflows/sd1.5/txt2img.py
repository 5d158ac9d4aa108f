"""Stable Diffusion 1.5 text-to-image, equivalent to comfyui-api's ``sd1.5/txt2img`` example.

Route: ``POST /workflow/sd1.5/txt2img``. Defaults copy comfyui-api's: 512x512, 20 steps,
cfg 8, ``euler``/``normal``, denoise 1. Added: ``batch_size``. ``sampler_name`` and
``scheduler`` are checked against what ComfyUI offers when the request runs (custom-node
samplers included), ``checkpoint`` against ``models/checkpoints`` unless it is a URL.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from comfy_sidecar.workflows import WorkflowContext, check_choice, random_seed, resolve_model

summary = "Text to image (SD 1.5)"
description = "Generates images from a text prompt with a Stable Diffusion 1.5 checkpoint."


class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Input of the SD 1.5 txt2img workflow."""

    prompt: Annotated[str, Meta(description="The positive prompt for image generation")]
    negative_prompt: Annotated[
        str, Meta(description="The negative prompt for image generation")
    ] = ""
    width: Annotated[int, Meta(ge=256, le=2048, description="Width of the generated image")] = 512
    height: Annotated[int, Meta(ge=256, le=2048, description="Height of the generated image")] = 512
    seed: Annotated[
        int,
        Meta(ge=0, description="Seed for random number generation; random if omitted"),
    ] = msgspec.field(default_factory=random_seed)
    steps: Annotated[int, Meta(ge=1, le=100, description="Number of sampling steps")] = 20
    cfg_scale: Annotated[float, Meta(ge=0, le=20, description="Classifier-free guidance scale")] = (
        8.0
    )
    sampler_name: Annotated[str, Meta(description="Name of the sampler to use")] = "euler"
    scheduler: Annotated[str, Meta(description="Type of scheduler to use")] = "normal"
    denoise: Annotated[float, Meta(ge=0, le=1, description="Denoising strength")] = 1.0
    checkpoint: Annotated[
        str | None,
        Meta(
            description="Checkpoint file in `models/checkpoints`, or a URL. Default: the "
            "warmup prompt's checkpoint, else the first installed one."
        ),
    ] = None
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
                "latent_image": ["5", 0],
            },
            "_meta": {"title": "KSampler"},
        },
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": checkpoint},
            "_meta": {"title": "Load Checkpoint"},
        },
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {
                "width": request.width,
                "height": request.height,
                "batch_size": request.batch_size,
            },
            "_meta": {"title": "Empty Latent Image"},
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
    }
