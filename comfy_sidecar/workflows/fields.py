"""Shared request field types for workflow modules' ``RequestSchema``.

``Annotated`` types carrying the bounds and the description that appear in the OpenAPI document
and the Markdown table; the module gives the default::

    class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
        prompt: Prompt
        steps: Steps = 20
        seed: Seed = msgspec.field(default_factory=random_seed)

The ``Protocol`` classes name the fields the graph builders of
:mod:`comfy_sidecar.workflows.graphs` read; a ``RequestSchema`` with those fields fits.
Descriptions and bounds copy comfyui-api's example workflows.
"""

from __future__ import annotations

from typing import Annotated, Literal, Protocol

from msgspec import Meta

__all__ = [
    "BatchSize",
    "CfgScale",
    "Checkpoint",
    "Denoise",
    "ImageHeight",
    "ImageToImageRequest",
    "ImageWidth",
    "InputImage",
    "NegativePrompt",
    "Prompt",
    "SamplerName",
    "SamplingRequest",
    "Scheduler",
    "Seed",
    "Steps",
    "TextToImageRequest",
    "UpscaleMethod",
]

Prompt = Annotated[str, Meta(description="The positive prompt for image generation")]
NegativePrompt = Annotated[str, Meta(description="The negative prompt for image generation")]
#: Size of the generated image (txt2img), pixels.
ImageWidth = Annotated[int, Meta(ge=256, le=2048, description="Width of the generated image")]
ImageHeight = Annotated[int, Meta(ge=256, le=2048, description="Height of the generated image")]
#: Default it with ``msgspec.field(default_factory=random_seed)``.
Seed = Annotated[
    int, Meta(ge=0, description="Seed for random number generation; random if omitted")
]
Steps = Annotated[int, Meta(ge=1, le=100, description="Number of sampling steps")]
CfgScale = Annotated[float, Meta(ge=0, le=20, description="Classifier-free guidance scale")]
#: Checked against ComfyUI's KSampler choices when the request runs (custom nodes included).
SamplerName = Annotated[str, Meta(description="Name of the sampler to use")]
Scheduler = Annotated[str, Meta(description="Type of scheduler to use")]
Denoise = Annotated[float, Meta(ge=0, le=1, description="Denoising strength")]
#: Default it with ``None``: resolved by :func:`resolve_sampling`.
Checkpoint = Annotated[
    str | None,
    Meta(
        description="Checkpoint file in `models/checkpoints`, or a URL. Default: the "
        "warmup prompt's checkpoint, else the first installed one."
    ),
]
BatchSize = Annotated[int, Meta(ge=1, le=16, description="Images per request")]
#: The /prompt pipeline downloads a URL or decodes base64 into ComfyUI's input directory.
InputImage = Annotated[
    str, Meta(min_length=1, description="Input image for img2img: a URL or base64 data")
]
#: ``ImageScale``'s ``upscale_method`` choices.
UpscaleMethod = Literal["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


class SamplingRequest(Protocol):
    """The request fields every builder reads (a RequestSchema with these fields fits)."""

    @property
    def prompt(self) -> str: ...
    @property
    def negative_prompt(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def cfg_scale(self) -> float: ...
    @property
    def sampler_name(self) -> str: ...
    @property
    def scheduler(self) -> str: ...
    @property
    def denoise(self) -> float: ...
    @property
    def checkpoint(self) -> str | None: ...
    @property
    def batch_size(self) -> int: ...


class TextToImageRequest(SamplingRequest, Protocol):
    """What :func:`text_to_image` reads: the sampling fields plus the image size (pixels)."""

    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...


class ImageToImageRequest(SamplingRequest, Protocol):
    """What :func:`image_to_image` reads: the sampling fields plus the input image."""

    @property
    def image(self) -> str: ...
    @property
    def upscale_method(self) -> str: ...
