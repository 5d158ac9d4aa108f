"""The example modules in workflows/: they load, and generate valid core-node graphs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest

from comfy_sidecar.workflows import (
    Workflow,
    WorkflowContext,
    WorkflowInputError,
    load_workflows,
)

from .conftest import FakeComfy

REPO_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"

# Node classes that ship with ComfyUI itself (nodes.py and comfy_extras), with the number of
# outputs each has; the shipped workflows may use only these.
CORE_NODE_OUTPUTS = {
    "CheckpointLoaderSimple": 3,
    "CLIPTextEncode": 1,
    "CLIPTextEncodeSDXL": 1,
    "EmptyLatentImage": 1,
    "EmptySD3LatentImage": 1,
    "KSampler": 1,
    "VAEDecode": 1,
    "VAEEncode": 1,
    "SaveImage": 0,
    "LoadImage": 2,
    "ImageScale": 1,
    "RepeatLatentBatch": 1,
    "UpscaleModelLoader": 1,
    "ImageUpscaleWithModel": 1,
}

EXPECTED = {
    "upscale",
    "sd1.5/txt2img",
    "sd1.5/img2img",
    "sdxl/txt2img",
    "sdxl/img2img",
    "flux/txt2img",
}

MINIMAL_INPUT = {
    "upscale": {"image": "https://example.com/cat.png"},
    "sd1.5/img2img": {"prompt": "a cat", "image": "https://example.com/cat.png"},
    "sdxl/img2img": {"prompt": "a cat", "image": "https://example.com/cat.png"},
}


@pytest.fixture(scope="module")
def shipped() -> dict[str, Workflow]:
    return {w.name: w for w in load_workflows(REPO_WORKFLOWS)}


def generate(wf: Workflow, comfy: FakeComfy, input_: dict[str, Any], **ctx: Any) -> dict[str, Any]:
    body = wf.convert_body({"input": input_})
    request, _ = wf.split_body(body)
    return asyncio.run(wf.generate(request, WorkflowContext(comfy.get_json, **ctx)))


def minimal(name: str) -> dict[str, Any]:
    return dict(MINIMAL_INPUT.get(name, {"prompt": "a cat"}))


def test_all_shipped_workflows_load(shipped: dict[str, Workflow]) -> None:
    assert set(shipped) == EXPECTED
    for wf in shipped.values():
        assert wf.summary != wf.name and wf.description
        schema = msgspec.json.schema(wf.body_type)
        assert schema  # documentable
        for line in wf.route_description().splitlines()[3:]:
            assert line.count("|") >= 5


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_graph_is_a_valid_core_node_prompt(
    shipped: dict[str, Workflow], comfy: FakeComfy, name: str
) -> None:
    prompt = generate(shipped[name], comfy, minimal(name))
    saves = [n for n in prompt.values() if n["class_type"] == "SaveImage"]
    assert len(saves) == 1 and saves[0]["inputs"]["filename_prefix"]
    for node_id, node in prompt.items():
        assert node["class_type"] in CORE_NODE_OUTPUTS, node["class_type"]
        for value in node["inputs"].values():
            if isinstance(value, list):  # a link [node_id, output_index]
                source, index = value
                assert source in prompt, (node_id, value)
                assert 0 <= index < CORE_NODE_OUTPUTS[prompt[source]["class_type"]]
    # Every node but the output feeds something: no dangling parts of the graph.
    used = {v[0] for n in prompt.values() for v in n["inputs"].values() if isinstance(v, list)}
    assert used | {k for k, n in prompt.items() if n["class_type"] == "SaveImage"} == set(prompt)


def sampler_node(prompt: dict[str, Any]) -> dict[str, Any]:
    (node,) = [n for n in prompt.values() if n["class_type"] == "KSampler"]
    return node["inputs"]  # type: ignore[no-any-return]


# comfyui-api's defaults, in the order of DEFAULT_KEYS (size: of the generated/resized image).
DEFAULT_KEYS = ("steps", "cfg", "sampler_name", "scheduler", "denoise", "size")
COMFYUI_API_DEFAULTS: dict[str, tuple[int, float, str, str, float, tuple[int, int]]] = {
    "sd1.5/txt2img": (20, 8.0, "euler", "normal", 1.0, (512, 512)),
    "sd1.5/img2img": (15, 8.0, "euler", "normal", 0.8, (512, 512)),
    "sdxl/txt2img": (20, 8.0, "euler", "normal", 1.0, (1024, 1024)),
    "sdxl/img2img": (20, 5.5, "dpmpp_2m_sde_gpu", "exponential", 0.75, (1024, 1024)),
    "flux/txt2img": (4, 1.0, "euler", "simple", 1.0, (1024, 1024)),
}


@pytest.mark.parametrize(
    ("name", "defaults"),
    [
        (name, dict(zip(DEFAULT_KEYS, row, strict=True)))
        for name, row in COMFYUI_API_DEFAULTS.items()
    ],
)
def test_comfyui_api_defaults(
    shipped: dict[str, Workflow], comfy: FakeComfy, name: str, defaults: dict[str, Any]
) -> None:
    prompt = generate(shipped[name], comfy, minimal(name))
    ks = sampler_node(prompt)
    for key in ("steps", "cfg", "sampler_name", "scheduler", "denoise"):
        assert ks[key] == defaults[key], key
    assert isinstance(ks["seed"], int) and ks["seed"] >= 0
    sized = [
        n["inputs"]
        for n in prompt.values()
        if n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage", "ImageScale")
    ]
    assert (sized[0]["width"], sized[0]["height"]) == defaults["size"]
    (loader,) = [n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert loader["inputs"]["ckpt_name"] == "sd15.safetensors"  # first installed


def test_every_option_reaches_the_graph(shipped: dict[str, Workflow], comfy: FakeComfy) -> None:
    prompt = generate(
        shipped["sd1.5/txt2img"],
        comfy,
        {
            "prompt": "a red fox",
            "negative_prompt": "blurry",
            "width": 640,
            "height": 384,
            "seed": 42,
            "steps": 7,
            "cfg_scale": 3.5,
            "sampler_name": "euler_ancestral",
            "scheduler": "karras",
            "denoise": 0.6,
            "checkpoint": "sdxl.safetensors",
            "batch_size": 3,
        },
    )
    assert sampler_node(prompt) | {} == {
        "seed": 42,
        "steps": 7,
        "cfg": 3.5,
        "sampler_name": "euler_ancestral",
        "scheduler": "karras",
        "denoise": 0.6,
        "model": ["4", 0],
        "positive": ["6", 0],
        "negative": ["7", 0],
        "latent_image": ["5", 0],
    }
    assert prompt["5"]["inputs"] == {"width": 640, "height": 384, "batch_size": 3}
    assert prompt["6"]["inputs"]["text"] == "a red fox"
    assert prompt["7"]["inputs"]["text"] == "blurry"
    assert prompt["4"]["inputs"]["ckpt_name"] == "sdxl.safetensors"


def test_img2img_batch_and_image(shipped: dict[str, Workflow], comfy: FakeComfy) -> None:
    for name in ("sd1.5/img2img", "sdxl/img2img"):
        prompt = generate(shipped[name], comfy, minimal(name) | {"batch_size": 4})
        by_class = {n["class_type"]: n["inputs"] for n in prompt.values()}
        assert by_class["LoadImage"]["image"] == "https://example.com/cat.png"
        assert by_class["RepeatLatentBatch"]["amount"] == 4


def test_checkpoint_rules(shipped: dict[str, Workflow], comfy: FakeComfy) -> None:
    wf = shipped["sdxl/txt2img"]
    url = "https://civitai.com/api/download/models/76750?type=Model"
    prompt = generate(wf, comfy, {"prompt": "x", "checkpoint": url})
    assert prompt["4"]["inputs"]["ckpt_name"] == url  # URLs are downloaded by the pipeline
    prompt = generate(wf, comfy, {"prompt": "x"}, warmup_checkpoint="warm.safetensors")
    assert prompt["4"]["inputs"]["ckpt_name"] == "warm.safetensors"
    with pytest.raises(WorkflowInputError) as info:
        generate(wf, comfy, {"prompt": "x", "checkpoint": "missing.safetensors"})
    assert info.value.location == "input.checkpoint"
    comfy.models["checkpoints"] = []
    with pytest.raises(WorkflowInputError) as info:
        generate(wf, comfy, {"prompt": "x"})
    assert info.value.location == "input.checkpoint"


def test_samplers_are_checked_live(shipped: dict[str, Workflow], comfy: FakeComfy) -> None:
    wf = shipped["flux/txt2img"]
    with pytest.raises(WorkflowInputError) as info:
        generate(wf, comfy, {"prompt": "x", "sampler_name": "res_multistep_custom"})
    assert info.value.location == "input.sampler_name"
    assert "euler" in info.value.error
    with pytest.raises(WorkflowInputError) as info:
        generate(wf, comfy, {"prompt": "x", "scheduler": "beta57"})
    assert info.value.location == "input.scheduler"
    comfy.samplers.append("res_multistep_custom")  # a custom node was installed
    prompt = generate(wf, comfy, {"prompt": "x", "sampler_name": "res_multistep_custom"})
    assert sampler_node(prompt)["sampler_name"] == "res_multistep_custom"


def test_upscale_model_choice(shipped: dict[str, Workflow], comfy: FakeComfy) -> None:
    wf = shipped["upscale"]
    prompt = generate(wf, comfy, minimal("upscale"))
    assert prompt["2"]["inputs"]["model_name"] == "tiny-compact-x2.safetensors"
    prompt = generate(wf, comfy, minimal("upscale") | {"model": "https://h/x4.pth"})
    assert prompt["2"]["inputs"]["model_name"] == "https://h/x4.pth"
    comfy.models["upscale_models"] = []
    with pytest.raises(WorkflowInputError) as info:
        generate(wf, comfy, minimal("upscale"))
    assert info.value.location == "input.model"


def test_bad_inputs_name_the_field(shipped: dict[str, Workflow]) -> None:
    cases = [
        ("sd1.5/txt2img", {"prompt": "x", "width": 100}, "input.width"),
        ("sd1.5/txt2img", {"prompt": "x", "steps": 0}, "input.steps"),
        ("sdxl/txt2img", {"prompt": "x", "cfg_scale": "high"}, "input.cfg_scale"),
        ("sdxl/img2img", {"prompt": "x"}, "input.image"),
        ("sd1.5/img2img", minimal("sd1.5/img2img") | {"crop": "left"}, "input.crop"),
        ("flux/txt2img", {"prompt": "x", "guidance": 3}, "input.guidance"),
        ("upscale", {}, "input.image"),
    ]
    for name, input_, location in cases:
        with pytest.raises(WorkflowInputError) as info:
            shipped[name].convert_body({"input": input_})
        assert info.value.location == location, (name, input_)


def test_openapi_document_from_the_body_types(shipped: dict[str, Workflow]) -> None:
    """Litestar documents every workflow body, with distinct component names."""
    from litestar import Litestar, post
    from litestar.params import JSONBody

    def route(wf: Workflow) -> Any:
        async def handler(data: Any) -> dict[str, Any]:
            return {}

        handler.__annotations__ = {
            "data": cast(Any, JSONBody)[wf.body_type],
            "return": dict[str, Any],
        }
        return post(wf.route, summary=wf.summary, description=wf.route_description())(handler)

    app = Litestar(route_handlers=[route(w) for w in shipped.values()], logging_config=None)
    doc = app.openapi_schema.to_schema()
    components = doc["components"]["schemas"]
    for wf in shipped.values():
        op = doc["paths"][wf.route]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = components[ref.rsplit("/", 1)[-1]]
        assert {"input", "convert_output", "webhook_v2", "s3"} <= set(body["properties"])
        input_prop = body["properties"]["input"]
        assert input_prop["description"] == f"Input of the `{wf.name}` workflow."
        input_ref = (input_prop.get("$ref") or input_prop["allOf"][0]["$ref"]).rsplit("/", 1)[-1]
        assert "prompt" in components[input_ref]["properties"] or wf.name == "upscale"
        assert "| Field | Type | Description | Default |" in op["description"]
    input_components = [k for k in components if k.endswith("RequestSchema")]
    assert len(input_components) == len(shipped)
