"""Shared request fields and graph builders for workflow modules.

Workflow modules (see :mod:`comfy_sidecar.workflows`) are loaded one by one from
``WORKFLOW_DIR`` and cannot import each other, so what the shipped ``workflows/`` have in common
lives here; your own modules may use it too::

    from comfy_sidecar.workflow_graphs import Prompt, Steps, SamplerNodes, text_to_image

**Fields.** ``Annotated`` types carrying the bounds and the description that appear in the
OpenAPI document and the Markdown table; the module gives the default::

    class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
        prompt: Prompt
        steps: Steps = 20
        seed: Seed = msgspec.field(default_factory=random_seed)

**Graphs.** :func:`text_to_image` and :func:`image_to_image` build the API-format prompt of
comfyui-api's Stable Diffusion examples, core ComfyUI nodes only::

    CheckpointLoaderSimple -> CLIPTextEncode (positive), CLIPTextEncode (negative)
    latent: EmptyLatentImage (txt2img)
        or: LoadImage -> ImageScale -> VAEEncode -> RepeatLatentBatch (img2img)
    KSampler (model, positive, negative, latent) -> VAEDecode -> SaveImage

Both first resolve the checkpoint, sampler and scheduler against what ComfyUI offers now
(:func:`resolve_sampling`). Node ids and titles are the caller's (:class:`SamplerNodes`,
:class:`ImageNodes`): the shipped workflows keep the ids of comfyui-api's example graphs. Nodes
come out ordered by numeric id. :func:`node` makes one node for graphs built by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple, Protocol

from msgspec import Meta

from comfy_sidecar.workflows import WorkflowContext, check_choice, resolve_model

__all__ = [
    "BatchSize",
    "CfgScale",
    "Checkpoint",
    "Denoise",
    "ImageHeight",
    "ImageNodes",
    "ImageToImageRequest",
    "ImageWidth",
    "InputImage",
    "LatentClass",
    "NegativePrompt",
    "Prompt",
    "SamplerName",
    "SamplerNodes",
    "Sampling",
    "SamplingRequest",
    "Scheduler",
    "Seed",
    "Steps",
    "TextToImageRequest",
    "UpscaleMethod",
    "image_to_image",
    "node",
    "resolve_sampling",
    "text_to_image",
]

# --- request fields -----------------------------------------------------------------------

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


# --- resolution ---------------------------------------------------------------------------


class Sampling(NamedTuple):
    """The checked names that go into CheckpointLoaderSimple and KSampler."""

    checkpoint: str
    sampler_name: str
    scheduler: str


async def resolve_sampling(request: SamplingRequest, ctx: WorkflowContext) -> Sampling:
    """Check ``checkpoint`` (URL, installed file, or default: ``ctx.warmup_checkpoint``, else the
    first installed), then ``sampler_name`` and ``scheduler`` against KSampler's choices now.

    Raises :class:`~comfy_sidecar.workflows.InputError` naming the field (answered 400
    ``input.<field>``), :class:`~comfy_sidecar.workflows.WorkflowContextError` when ComfyUI
    cannot be asked.
    """
    checkpoint = await resolve_model(
        ctx, "checkpoint", request.checkpoint, "checkpoints", default=ctx.warmup_checkpoint
    )
    sampler = check_choice("sampler_name", request.sampler_name, await ctx.samplers())
    scheduler = check_choice("scheduler", request.scheduler, await ctx.schedulers())
    return Sampling(checkpoint, sampler, scheduler)


# --- graphs -------------------------------------------------------------------------------


def node(class_type: str, inputs: dict[str, Any], title: str) -> dict[str, Any]:
    """One API-format node: ``{"class_type", "inputs", "_meta": {"title"}}``.

    A link to another node's output is ``[node_id, output_index]`` in ``inputs``.
    """
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


@dataclass(frozen=True, kw_only=True)
class SamplerNodes:
    """Node ids of the checkpoint -> text encoders -> KSampler -> VAEDecode -> SaveImage part of
    a graph, and the titles that differ between comfyui-api's examples."""

    checkpoint: str
    positive: str
    negative: str
    sampler: str
    decode: str
    save: str
    checkpoint_title: str = "Load Checkpoint"
    #: Title of the positive ``CLIPTextEncode`` (not used with ``sdxl_size``).
    positive_title: str = "CLIP Text Encode (Prompt)"


@dataclass(frozen=True, kw_only=True)
class ImageNodes:
    """Node ids of the LoadImage -> ImageScale -> VAEEncode -> RepeatLatentBatch chain."""

    load: str
    scale: str
    encode: str
    repeat: str


#: The empty-latent node classes :func:`text_to_image` can start from.
LatentClass = Literal["EmptyLatentImage", "EmptySD3LatentImage"]
_LATENT_TITLES: dict[str, str] = {
    "EmptyLatentImage": "Empty Latent Image",
    "EmptySD3LatentImage": "EmptySD3LatentImage",
}


async def text_to_image(
    request: TextToImageRequest,
    ctx: WorkflowContext,
    nodes: SamplerNodes,
    *,
    latent: str,
    latent_class: LatentClass = "EmptyLatentImage",
    filename_prefix: str = "ComfyUI",
) -> dict[str, Any]:
    """The API-format prompt of a txt2img graph: an empty ``latent_class`` latent (node id
    ``latent``) of ``request.width`` x ``request.height`` x ``request.batch_size``, sampled with
    the checkpoint and prompts, decoded and saved as ``filename_prefix``.

    Raises what :func:`resolve_sampling` raises.
    """
    sampling = await resolve_sampling(request, ctx)
    size = {"width": request.width, "height": request.height, "batch_size": request.batch_size}
    graph = {latent: node(latent_class, size, _LATENT_TITLES[latent_class])}
    return _sample_and_save(graph, request, sampling, nodes, latent, None, filename_prefix)


async def image_to_image(
    request: ImageToImageRequest,
    ctx: WorkflowContext,
    nodes: SamplerNodes,
    image_nodes: ImageNodes,
    *,
    width: int,
    height: int,
    crop: str,
    sdxl_size: tuple[int, int] | None = None,
    filename_prefix: str = "ComfyUI",
) -> dict[str, Any]:
    """The API-format prompt of an img2img graph: ``request.image`` resized by ``ImageScale``
    to ``width`` x ``height`` pixels (0 keeps the ratio) with ``request.upscale_method`` and
    ``crop`` (``"center"`` or ``"disabled"``), VAE-encoded, repeated ``request.batch_size``
    times, sampled, decoded and saved as ``filename_prefix``.

    ``sdxl_size=(w, h)`` encodes the prompts with ``CLIPTextEncodeSDXL`` conditioned on that
    size instead of ``CLIPTextEncode``. Raises what :func:`resolve_sampling` raises.
    """
    sampling = await resolve_sampling(request, ctx)
    graph = {
        image_nodes.load: node("LoadImage", {"image": request.image}, "Load Image"),
        image_nodes.scale: node(
            "ImageScale",
            {
                "upscale_method": request.upscale_method,
                "width": width,
                "height": height,
                "crop": crop,
                "image": [image_nodes.load, 0],
            },
            "Upscale Image",
        ),
        image_nodes.encode: node(
            "VAEEncode",
            {"pixels": [image_nodes.scale, 0], "vae": [nodes.checkpoint, 2]},
            "VAE Encode",
        ),
        image_nodes.repeat: node(
            "RepeatLatentBatch",
            {"samples": [image_nodes.encode, 0], "amount": request.batch_size},
            "Repeat Latent Batch",
        ),
    }
    return _sample_and_save(
        graph, request, sampling, nodes, image_nodes.repeat, sdxl_size, filename_prefix
    )


def _sample_and_save(
    graph: dict[str, Any],
    request: SamplingRequest,
    sampling: Sampling,
    nodes: SamplerNodes,
    latent: str,
    sdxl_size: tuple[int, int] | None,
    filename_prefix: str,
) -> dict[str, Any]:
    """Add the checkpoint, both text encoders, KSampler (sampling ``latent``), VAEDecode and
    SaveImage to ``graph``; return it ordered by node id."""
    ckpt = nodes.checkpoint
    graph[ckpt] = node(
        "CheckpointLoaderSimple", {"ckpt_name": sampling.checkpoint}, nodes.checkpoint_title
    )
    if sdxl_size is None:
        graph[nodes.positive] = node(
            "CLIPTextEncode", {"text": request.prompt, "clip": [ckpt, 1]}, nodes.positive_title
        )
        graph[nodes.negative] = node(
            "CLIPTextEncode",
            {"text": request.negative_prompt, "clip": [ckpt, 1]},
            "CLIP Text Encode (Negative Prompt)",
        )
    else:
        graph[nodes.positive] = _sdxl_encode(request.prompt, sdxl_size, ckpt)
        graph[nodes.negative] = _sdxl_encode(request.negative_prompt, sdxl_size, ckpt)
    graph[nodes.sampler] = node(
        "KSampler",
        {
            "seed": request.seed,
            "steps": request.steps,
            "cfg": request.cfg_scale,
            "sampler_name": sampling.sampler_name,
            "scheduler": sampling.scheduler,
            "denoise": request.denoise,
            "model": [ckpt, 0],
            "positive": [nodes.positive, 0],
            "negative": [nodes.negative, 0],
            "latent_image": [latent, 0],
        },
        "KSampler",
    )
    graph[nodes.decode] = node(
        "VAEDecode", {"samples": [nodes.sampler, 0], "vae": [ckpt, 2]}, "VAE Decode"
    )
    graph[nodes.save] = node(
        "SaveImage",
        {"filename_prefix": filename_prefix, "images": [nodes.decode, 0]},
        "Save Image",
    )
    return dict(sorted(graph.items(), key=lambda item: _id_order(item[0])))


def _sdxl_encode(text: str, size: tuple[int, int], checkpoint: str) -> dict[str, Any]:
    width, height = size
    return node(
        "CLIPTextEncodeSDXL",
        {
            "width": width,
            "height": height,
            "crop_w": 0,
            "crop_h": 0,
            "target_width": width,
            "target_height": height,
            "text_g": text,
            "text_l": text,
            "clip": [checkpoint, 1],
        },
        "CLIPTextEncodeSDXL",
    )


def _id_order(node_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then any others by name."""
    return (0, int(node_id), "") if node_id.isascii() and node_id.isdigit() else (1, 0, node_id)
