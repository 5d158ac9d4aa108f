"""comfy_sidecar.workflows: the shared fields and graph builders the shipped workflows use."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from comfy_sidecar.http.errors import status_of
from comfy_sidecar.workflows import (
    ImageNodes,
    InputError,
    SamplerNodes,
    Workflow,
    WorkflowContext,
    WorkflowContextError,
    WorkflowInputError,
    image_to_image,
    load_workflows,
    resolve_sampling,
    text_to_image,
)

from .conftest import FakeComfy

REPO_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
CAT = "https://example.com/cat.png"


@pytest.fixture(scope="module")
def shipped() -> dict[str, Workflow]:
    return {w.name: w for w in load_workflows(REPO_WORKFLOWS)}


def request_of(wf: Workflow, **input_: Any) -> Any:
    """A decoded ``RequestSchema`` of a shipped workflow (the builders' real callers)."""
    request, _ = wf.split_body(wf.convert_body({"input": input_}))
    return request


def links(prompt: dict[str, Any]) -> set[tuple[str, str, str, int]]:
    """(node, input, source node, output index) for every link in the prompt."""
    return {
        (node_id, name, value[0], value[1])
        for node_id, node in prompt.items()
        for name, value in node["inputs"].items()
        if isinstance(value, list)
    }


def test_shared_field_types_reach_the_schema(shipped: dict[str, Workflow]) -> None:
    wf = shipped["sdxl/txt2img"]
    props = msgspec.json.schema(wf.request_type)["$defs"]["RequestSchema"]["properties"]
    assert props["width"] == {
        "type": "integer",
        "minimum": 256,
        "maximum": 2048,
        "description": "Width of the generated image",
        "default": 1024,
    }
    assert props["seed"]["minimum"] == 0 and "default" not in props["seed"]  # random
    assert "| checkpoint | string \\| null | Checkpoint file in" in wf.route_description()


def test_text_to_image_with_own_node_ids(shipped: dict[str, Workflow], comfy: FakeComfy) -> None:
    request = request_of(
        shipped["sd1.5/img2img"],  # has every field text_to_image reads
        prompt="a fox",
        image=CAT,
        negative_prompt="ugly",
        width=768,
        height=512,
        seed=5,
        steps=12,
        cfg_scale=6.0,
        scheduler="karras",
        batch_size=2,
    )
    nodes = SamplerNodes(
        checkpoint="ckpt", positive="10", negative="2", sampler="ks", decode="dec", save="save"
    )
    prompt = asyncio.run(
        text_to_image(
            request, WorkflowContext(comfy.get_json), nodes, latent="1", filename_prefix="mine"
        )
    )
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


def test_image_to_image_with_sdxl_conditioning(
    shipped: dict[str, Workflow], comfy: FakeComfy
) -> None:
    request = request_of(
        shipped["sd1.5/img2img"],
        prompt="a cat",
        image=CAT,
        negative_prompt="blurry",
        upscale_method="bicubic",
        denoise=0.5,
        batch_size=3,
    )
    nodes = SamplerNodes(
        checkpoint="4", positive="6", negative="7", sampler="3", decode="8", save="9"
    )
    image_nodes = ImageNodes(load="10", scale="11", encode="12", repeat="13")
    prompt = asyncio.run(
        image_to_image(
            request,
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
    assert prompt["10"]["inputs"] == {"image": CAT}
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


def test_resolve_sampling_order_and_errors(shipped: dict[str, Workflow], comfy: FakeComfy) -> None:
    wf = shipped["sd1.5/txt2img"]

    def resolve(**input_: Any) -> Any:
        request = request_of(wf, prompt="x", **input_)
        return asyncio.run(resolve_sampling(request, WorkflowContext(comfy.get_json)))

    assert resolve(checkpoint="sdxl.safetensors") == ("sdxl.safetensors", "euler", "normal")
    # The checkpoint is checked first: a request wrong twice names the checkpoint.
    with pytest.raises(InputError) as info:
        resolve(checkpoint="missing.safetensors", sampler_name="nope")
    assert info.value.field == "checkpoint"
    with pytest.raises(InputError) as info:
        resolve(scheduler="nope")
    assert info.value.field == "scheduler" and "karras" in info.value.message
    comfy.fail = ConnectionError("refused")
    with pytest.raises(WorkflowContextError):
        resolve()


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
def test_shipped_graphs_keep_comfyui_api_node_ids(
    shipped: dict[str, Workflow], comfy: FakeComfy, name: str
) -> None:
    wf = shipped[name]
    request = request_of(wf, prompt="a cat", **({"image": CAT} if "img2img" in name else {}))
    prompt = asyncio.run(wf.generate(request, WorkflowContext(comfy.get_json)))
    assert {k: n["class_type"] for k, n in prompt.items()} == COMFYUI_API_GRAPHS[name]
    assert list(prompt) == list(COMFYUI_API_GRAPHS[name])  # ordered by id


def test_shipped_errors_still_name_the_field(
    shipped: dict[str, Workflow], comfy: FakeComfy
) -> None:
    """Through the Workflow wrapper, the shared resolution's InputError becomes a 400."""
    wf = shipped["sdxl/img2img"]
    request = request_of(wf, prompt="x", image=CAT, scheduler="beta57")
    with pytest.raises(WorkflowInputError) as info:
        asyncio.run(wf.generate(request, WorkflowContext(comfy.get_json)))
    assert (status_of(info.value), info.value.location) == (400, "input.scheduler")
