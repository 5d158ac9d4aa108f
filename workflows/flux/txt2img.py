"""Flux text-to-image, equivalent to comfyui-api's ``flux/txt2img`` example.

Route: ``POST /workflow/flux/txt2img``. Expects an all-in-one Flux checkpoint (e.g.
``flux1-schnell-fp8.safetensors``) loaded with ``CheckpointLoaderSimple``. Defaults copy
comfyui-api's: 1024x1024, 4 steps, cfg 1, ``euler``/``simple``, denoise 1, an empty negative
prompt. Added: ``negative_prompt`` (ignored by Flux at cfg 1) and ``batch_size``.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from comfy_sidecar.workflows import WorkflowContext, check_choice, random_seed, resolve_model

summary = "Text to image (Flux)"
description = "Generates images from a text prompt with an all-in-one Flux checkpoint."


class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Input of the Flux txt2img workflow."""

    prompt: Annotated[str, Meta(description="The positive prompt for image generation")]
    negative_prompt: Annotated[
        str, Meta(description="The negative prompt (has an effect only with cfg_scale > 1)")
    ] = ""
    width: Annotated[int, Meta(ge=256, le=2048, description="Width of the generated image")] = 1024
    height: Annotated[int, Meta(ge=256, le=2048, description="Height of the generated image")] = (
        1024
    )
    seed: Annotated[
        int,
        Meta(ge=0, description="Seed for random number generation; random if omitted"),
    ] = msgspec.field(default_factory=random_seed)
    steps: Annotated[int, Meta(ge=1, le=100, description="Number of sampling steps")] = 4
    cfg_scale: Annotated[float, Meta(ge=0, le=20, description="Classifier-free guidance scale")] = (
        1.0
    )
    sampler_name: Annotated[str, Meta(description="Name of the sampler to use")] = "euler"
    scheduler: Annotated[str, Meta(description="Type of scheduler to use")] = "simple"
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
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": request.prompt, "clip": ["30", 1]},
            "_meta": {"title": "CLIP Text Encode (Positive Prompt)"},
        },
        "8": {
            "class_type": "VAEDecode",
            "inputs": {"samples": ["31", 0], "vae": ["30", 2]},
            "_meta": {"title": "VAE Decode"},
        },
        "9": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "Flux", "images": ["8", 0]},
            "_meta": {"title": "Save Image"},
        },
        "27": {
            "class_type": "EmptySD3LatentImage",
            "inputs": {
                "width": request.width,
                "height": request.height,
                "batch_size": request.batch_size,
            },
            "_meta": {"title": "EmptySD3LatentImage"},
        },
        "30": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": checkpoint},
            "_meta": {"title": "Load Checkpoint"},
        },
        "31": {
            "class_type": "KSampler",
            "inputs": {
                "seed": request.seed,
                "steps": request.steps,
                "cfg": request.cfg_scale,
                "sampler_name": sampler,
                "scheduler": scheduler,
                "denoise": request.denoise,
                "model": ["30", 0],
                "positive": ["6", 0],
                "negative": ["33", 0],
                "latent_image": ["27", 0],
            },
            "_meta": {"title": "KSampler"},
        },
        "33": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": request.negative_prompt, "clip": ["30", 1]},
            "_meta": {"title": "CLIP Text Encode (Negative Prompt)"},
        },
    }
