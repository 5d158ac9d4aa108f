"""Upscale an image with an upscale model: runs on the CPU, needs no checkpoint.

Route: ``POST /workflow/upscale``. Graph (core ComfyUI nodes only):
LoadImage -> UpscaleModelLoader -> ImageUpscaleWithModel -> SaveImage.
``image`` may be a URL or base64 (the /prompt pipeline downloads it into ComfyUI's input
directory); ``model`` may be a file in ``models/upscale_models`` or a URL to download.
The graph is written out by hand with :func:`comfy_sidecar.workflows.node`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from comfy_sidecar.workflows import WorkflowContext, node, resolve_model

summary = "Upscale an image"
description = "Upscales `image` with an upscale model (ESRGAN-style, e.g. 2x or 4x)."


class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Input of the upscale workflow."""

    image: Annotated[
        str,
        Meta(
            min_length=1,
            description="The image to upscale: an http(s)/s3/hf URL or base64 data.",
            examples=["https://example.com/cat.png"],
        ),
    ]
    model: Annotated[
        str | None,
        Meta(
            description="Upscale model: a file name in `models/upscale_models` or a URL. "
            "Default: the first installed upscale model."
        ),
    ] = None
    filename_prefix: Annotated[
        str, Meta(min_length=1, description="Prefix of the saved file name.")
    ] = "upscaled"


async def generate(request: RequestSchema, ctx: WorkflowContext) -> dict[str, Any]:
    """The API-format prompt for ``request``: ``[node_id, output_index]`` links the nodes."""
    model = await resolve_model(ctx, "model", request.model, "upscale_models")
    return {
        "1": node("LoadImage", {"image": request.image}, "Load Image"),
        "2": node("UpscaleModelLoader", {"model_name": model}, "Load Upscale Model"),
        "3": node(
            "ImageUpscaleWithModel",
            {"upscale_model": ["2", 0], "image": ["1", 0]},
            "Upscale Image (using Model)",
        ),
        "4": node(
            "SaveImage",
            {"images": ["3", 0], "filename_prefix": request.filename_prefix},
            "Save Image",
        ),
    }
