"""comfy_sidecar.workflow_graphs: the shared fields and graph builders the shipped workflows use."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from comfy_sidecar.workflow_graphs import (
    ImageNodes,
    SamplerNodes,
    image_to_image,
    resolve_sampling,
)
from comfy_sidecar.workflows import (
    InputError,
    WorkflowContext,
    WorkflowContextError,
    WorkflowInputError,
    load_workflows,
)

from .conftest import FakeComfy

REPO_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"

# A module in WORKFLOW_DIR building on the shared pieces, with ids that are not all numbers.
OWN_MODULE = """
from __future__ import annotations
import msgspec
from comfy_sidecar.workflow_graphs import (
    BatchSize, CfgScale, Checkpoint, Denoise, ImageHeight, ImageWidth, NegativePrompt, Prompt,
    SamplerName, SamplerNodes, Scheduler, Seed, Steps, text_to_image,
)
from comfy_sidecar.workflows import random_seed

class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    prompt: Prompt
    negative_prompt: NegativePrompt = "ugly"
    width: ImageWidth = 768
    height: ImageHeight = 512
    seed: Seed = msgspec.field(default_factory=random_seed)
    steps: Steps = 12
    cfg_scale: CfgScale = 6.0
    sampler_name: SamplerName = "euler"
    scheduler: Scheduler = "karras"
    denoise: Denoise = 1.0
    checkpoint: Checkpoint = None
    batch_size: BatchSize = 2

async def generate(request, ctx):
    nodes = SamplerNodes(checkpoint="ckpt", positive="10", negative="2", sampler="ks",
                         decode="dec", save="save")
    return await text_to_image(request, ctx, nodes, latent="1", filename_prefix="mine")
"""


class Img2Img(msgspec.Struct, kw_only=True):
    prompt: str = "a cat"
    negative_prompt: str = "blurry"
    image: str = "https://example.com/cat.png"
    upscale_method: str = "bicubic"
    seed: int = 7
    steps: int = 9
    cfg_scale: float = 4.5
    sampler_name: str = "euler"
    scheduler: str = "normal"
    denoise: float = 0.5
    checkpoint: str | None = None
    batch_size: int = 3


def links(prompt: dict[str, Any]) -> set[tuple[str, str, str, int]]:
    """(node, input, source node, output index) for every link in the prompt."""
    return {
        (node_id, name, value[0], value[1])
        for node_id, node in prompt.items()
        for name, value in node["inputs"].items()
        if isinstance(value, list)
    }


def test_a_workflow_module_can_build_on_the_shared_pieces(
    write_module: Callable[[str, str], Path], comfy: FakeComfy
) -> None:
    (wf,) = load_workflows(write_module("mine/t2i.py", OWN_MODULE))
    assert wf.route == "/workflow/mine/t2i"
    schema = msgspec.json.schema(wf.request_type)
    props = schema["$defs"]["RequestSchema"]["properties"]
    assert props["width"] == {
        "type": "integer",
        "minimum": 256,
        "maximum": 2048,
        "description": "Width of the generated image",
        "default": 768,
    }
    assert props["seed"]["minimum"] == 0 and "default" not in props["seed"]  # random
    assert "| checkpoint | string \\| null | Checkpoint file in" in wf.route_description()

    request, _ = wf.split_body(wf.convert_body({"input": {"prompt": "a fox", "seed": 5}}))
    prompt = asyncio.run(wf.generate(request, WorkflowContext(comfy.get_json)))
    # Numeric ids first, in numeric order, then the others by name.
    assert list(prompt) == ["1", "2", "10", "ckpt", "dec", "ks", "save"]
    assert {k: n["class_type"] for k, n in prompt.items()} == {
        "1": "EmptyLatentImage",
        "2": "CLIPTextEncode",
        "10": "CLIPTextEncode",
        "ckpt": "CheckpointLoaderSimple",
        "dec": "VAEDecode",
        "ks": "KSampler",
        "save": "SaveImage",
    }
    assert links(prompt) == {
        ("2", "clip", "ckpt", 1),
        ("10", "clip", "ckpt", 1),
        ("ks", "model", "ckpt", 0),
        ("ks", "positive", "10", 0),
        ("ks", "negative", "2", 0),
        ("ks", "latent_image", "1", 0),
        ("dec", "samples", "ks", 0),
        ("dec", "vae", "ckpt", 2),
        ("save", "images", "dec", 0),
    }
    assert prompt["1"]["inputs"] == {"width": 768, "height": 512, "batch_size": 2}
    assert prompt["10"]["inputs"]["text"] == "a fox"
    assert prompt["2"]["inputs"]["text"] == "ugly"
    assert prompt["ckpt"]["inputs"] == {"ckpt_name": "sd15.safetensors"}
    assert prompt["save"]["inputs"]["filename_prefix"] == "mine"
    ks = prompt["ks"]["inputs"]
    assert (ks["seed"], ks["steps"], ks["cfg"], ks["scheduler"]) == (5, 12, 6.0, "karras")


def test_image_to_image_with_sdxl_conditioning(comfy: FakeComfy) -> None:
    nodes = SamplerNodes(
        checkpoint="4", positive="6", negative="7", sampler="3", decode="8", save="9"
    )
    image_nodes = ImageNodes(load="10", scale="11", encode="12", repeat="13")
    prompt = asyncio.run(
        image_to_image(
            Img2Img(),
            WorkflowContext(comfy.get_json, warmup_checkpoint="warm.safetensors"),
            nodes,
            image_nodes,
            width=640,
            height=0,
            crop="disabled",
            sdxl_size=(2048, 1536),
        )
    )
    assert list(prompt) == ["3", "4", "6", "7", "8", "9", "10", "11", "12", "13"]
    assert prompt["4"]["inputs"] == {"ckpt_name": "warm.safetensors"}
    for node_id, text in (("6", "a cat"), ("7", "blurry")):
        encode = prompt[node_id]
        assert encode["class_type"] == "CLIPTextEncodeSDXL"
        assert encode["inputs"] | {} == {
            "width": 2048,
            "height": 1536,
            "crop_w": 0,
            "crop_h": 0,
            "target_width": 2048,
            "target_height": 1536,
            "text_g": text,
            "text_l": text,
            "clip": ["4", 1],
        }
    assert prompt["10"]["inputs"] == {"image": "https://example.com/cat.png"}
    assert prompt["11"]["inputs"] == {
        "upscale_method": "bicubic",
        "width": 640,
        "height": 0,
        "crop": "disabled",
        "image": ["10", 0],
    }
    assert prompt["12"]["inputs"] == {"pixels": ["11", 0], "vae": ["4", 2]}
    assert prompt["13"]["inputs"] == {"samples": ["12", 0], "amount": 3}
    assert prompt["3"]["inputs"]["latent_image"] == ["13", 0]
    assert prompt["3"]["inputs"]["denoise"] == 0.5


def test_resolve_sampling_order_and_errors(comfy: FakeComfy) -> None:
    ctx = WorkflowContext(comfy.get_json)
    sampling = asyncio.run(resolve_sampling(Img2Img(checkpoint="sdxl.safetensors"), ctx))
    assert sampling == ("sdxl.safetensors", "euler", "normal")
    # The checkpoint is checked first: a request wrong twice names the checkpoint.
    bad = Img2Img(checkpoint="missing.safetensors", sampler_name="nope")
    with pytest.raises(InputError) as info:
        asyncio.run(resolve_sampling(bad, WorkflowContext(comfy.get_json)))
    assert info.value.field == "checkpoint"
    with pytest.raises(InputError) as info:
        asyncio.run(resolve_sampling(Img2Img(scheduler="nope"), WorkflowContext(comfy.get_json)))
    assert info.value.field == "scheduler" and "karras" in info.value.message
    comfy.fail = ConnectionError("refused")
    with pytest.raises(WorkflowContextError):
        asyncio.run(resolve_sampling(Img2Img(), WorkflowContext(comfy.get_json)))


# The node ids and classes of comfyui-api's example graphs, which the shipped workflows keep.
COMFYUI_API_GRAPHS = {
    "sd1.5/txt2img": {
        "3": "KSampler",
        "4": "CheckpointLoaderSimple",
        "5": "EmptyLatentImage",
        "6": "CLIPTextEncode",
        "7": "CLIPTextEncode",
        "8": "VAEDecode",
        "9": "SaveImage",
    },
    "sd1.5/img2img": {
        "3": "KSampler",
        "4": "CheckpointLoaderSimple",
        "6": "CLIPTextEncode",
        "7": "CLIPTextEncode",
        "8": "VAEDecode",
        "9": "SaveImage",
        "10": "LoadImage",
        "11": "ImageScale",
        "12": "VAEEncode",
        "13": "RepeatLatentBatch",
    },
    "sdxl/txt2img": {
        "4": "CheckpointLoaderSimple",
        "5": "EmptyLatentImage",
        "6": "CLIPTextEncode",
        "7": "CLIPTextEncode",
        "17": "VAEDecode",
        "19": "SaveImage",
        "49": "KSampler",
    },
    "sdxl/img2img": {
        "8": "VAEDecode",
        "9": "SaveImage",
        "14": "CheckpointLoaderSimple",
        "16": "CLIPTextEncodeSDXL",
        "19": "CLIPTextEncodeSDXL",
        "36": "KSampler",
        "38": "LoadImage",
        "39": "VAEEncode",
        "40": "ImageScale",
        "41": "RepeatLatentBatch",
    },
    "flux/txt2img": {
        "6": "CLIPTextEncode",
        "8": "VAEDecode",
        "9": "SaveImage",
        "27": "EmptySD3LatentImage",
        "30": "CheckpointLoaderSimple",
        "31": "KSampler",
        "33": "CLIPTextEncode",
    },
}


@pytest.mark.parametrize("name", sorted(COMFYUI_API_GRAPHS))
def test_shipped_graphs_keep_comfyui_api_node_ids(comfy: FakeComfy, name: str) -> None:
    wf = {w.name: w for w in load_workflows(REPO_WORKFLOWS)}[name]
    input_ = {"prompt": "a cat", "image": "https://example.com/cat.png"}
    if "img2img" not in name:
        del input_["image"]
    request, _ = wf.split_body(wf.convert_body({"input": input_}))
    prompt = asyncio.run(wf.generate(request, WorkflowContext(comfy.get_json)))
    assert {k: n["class_type"] for k, n in prompt.items()} == COMFYUI_API_GRAPHS[name]
    assert list(prompt) == list(COMFYUI_API_GRAPHS[name])  # ordered by id


def test_shipped_errors_still_name_the_field(comfy: FakeComfy) -> None:
    """Through the Workflow wrapper, the shared resolution's InputError becomes a 400."""
    wf = {w.name: w for w in load_workflows(REPO_WORKFLOWS)}["sdxl/img2img"]
    body = {"input": {"prompt": "x", "image": "https://e/x.png", "scheduler": "beta57"}}
    request, _ = wf.split_body(wf.convert_body(body))
    with pytest.raises(WorkflowInputError) as info:
        asyncio.run(wf.generate(request, WorkflowContext(comfy.get_json)))
    assert (info.value.status, info.value.location) == (400, "input.scheduler")
