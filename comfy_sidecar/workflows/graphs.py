"""Graph builders for workflow modules: the API-format prompts of comfyui-api's examples.

:func:`text_to_image` and :func:`image_to_image` build the API-format prompt of comfyui-api's
Stable Diffusion examples, core ComfyUI nodes only::

    CheckpointLoaderSimple -> CLIPTextEncode (positive), CLIPTextEncode (negative)
    latent: EmptyLatentImage (txt2img)
        or: LoadImage -> ImageScale -> VAEEncode -> RepeatLatentBatch (img2img)
    KSampler (model, positive, negative, latent) -> VAEDecode -> SaveImage

Both first resolve the checkpoint, sampler and scheduler against what ComfyUI offers now
(:func:`resolve_sampling`). Node ids and titles are the caller's (:class:`SamplerNodes`,
:class:`ImageNodes`): the shipped workflows keep the ids of comfyui-api's example graphs. Nodes
come out ordered by numeric id (:func:`comfy_sidecar.schemas.nodes.node_order_key`).
:func:`node` makes one node for graphs built by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from comfy_sidecar.schemas.nodes import node_order_key
from comfy_sidecar.workflows.author import WorkflowContext, check_choice, resolve_model
from comfy_sidecar.workflows.fields import (
    ImageToImageRequest,
    SamplingRequest,
    TextToImageRequest,
)

__all__ = [
    "ImageNodes",
    "LatentClass",
    "SamplerNodes",
    "Sampling",
    "image_to_image",
    "node",
    "resolve_sampling",
    "text_to_image",
]


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
    return dict(sorted(graph.items(), key=lambda item: node_order_key(item[0])))


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
