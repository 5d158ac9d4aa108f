"""Workflow modules: loading, routes, body decoding, errors, the live context, shipped examples."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from comfy_sidecar.http.errors import status_of
from comfy_sidecar.schemas import ConvertWebp, PromptOptions, PromptRequest, S3Upload
from comfy_sidecar.workflows import (
    Workflow,
    WorkflowContext,
    WorkflowContextError,
    WorkflowGenerateError,
    WorkflowInputError,
    load_workflows,
    prompt_checkpoint,
)

from .conftest import FakeComfy

REPO_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"

GOOD = '''
"""A sync workflow that takes only the request."""
from __future__ import annotations
from typing import Annotated
import msgspec

summary = "Make an image"
description = "Makes a flat image."

class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    prompt: Annotated[str, msgspec.Meta(description="What to draw")]
    width: Annotated[int, msgspec.Meta(ge=64, le=2048, description="Width in pixels")] = 512
    color: int = 0

def generate(request: RequestSchema) -> dict:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": request.width, "height": 64, "batch_size": 1,
                         "color": request.color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                   "filename_prefix": request.prompt}},
    }
'''

NESTED = """
from typing import Annotated
import msgspec
from comfy_sidecar.workflows import InputError

class RequestSchema(msgspec.Struct, kw_only=True):
    sampler: str = "euler"
    model: str | None = None

async def generate(request, ctx):
    samplers = await ctx.samplers()
    if request.sampler not in samplers:
        raise InputError("sampler", f"unknown sampler {request.sampler}")
    models = await ctx.models("upscale_models")
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
        "2": {"class_type": "UpscaleModelLoader",
              "inputs": {"model_name": request.model or models[0]}},
        "3": {"class_type": "ImageUpscaleWithModel",
              "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage",
              "inputs": {"images": ["3", 0], "filename_prefix": request.sampler}},
    }
"""

RAISES = """
import msgspec
class RequestSchema(msgspec.Struct):
    n: int = 1
def generate(request):
    raise ValueError(f"n={request.n} is unlucky")
"""

NOT_A_PROMPT = """
import msgspec
class RequestSchema(msgspec.Struct):
    pass
async def generate(request):
    return {"1": {"inputs": {}}}
"""

BROKEN_IMPORT = """
import msgspec
import no_such_module_anywhere  # fails at import
class RequestSchema(msgspec.Struct):
    pass
def generate(request):
    return {}
"""

SYNTAX_ERROR = "def generate(:\n"

NO_SCHEMA = """
def generate(request):
    return {}
"""


@pytest.fixture
def workflow_dir(write_module: Callable[[str, str], Path]) -> Path:
    write_module("good.py", GOOD)
    write_module("deep/er/nested.py", NESTED)
    write_module("raises.py", RAISES)
    write_module("not_a_prompt.py", NOT_A_PROMPT)
    write_module("broken.py", BROKEN_IMPORT)
    write_module("syntax.py", SYNTAX_ERROR)
    write_module("no_schema.py", NO_SCHEMA)
    write_module("_helpers.py", GOOD)  # private: skipped
    write_module("__init__.py", "")
    return write_module("bad name.py", GOOD)  # not a URL segment: skipped


@pytest.fixture
def loaded(workflow_dir: Path) -> dict[str, Workflow]:
    return {w.name: w for w in load_workflows(workflow_dir)}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- loading ------------------------------------------------------------------------------


def test_good_modules_load_and_bad_ones_are_skipped(
    workflow_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="comfy_sidecar.workflows")
    workflows = load_workflows(workflow_dir)
    assert sorted(w.route for w in workflows) == [
        "/workflow/deep/er/nested",
        "/workflow/good",
        "/workflow/not_a_prompt",
        "/workflow/raises",
    ]
    broken = [r for r in caplog.records if "broken.py" in r.getMessage()]
    assert broken and broken[0].levelno == logging.ERROR
    assert broken[0].exc_info and "no_such_module_anywhere" in str(broken[0].exc_info[1])
    assert any("syntax.py" in r.getMessage() and r.exc_info for r in caplog.records)
    assert any(
        "no_schema.py" in r.getMessage() and "RequestSchema" in r.getMessage()
        for r in caplog.records
    )
    assert any("bad name.py" in r.getMessage() for r in caplog.records)


def test_missing_directory_gives_no_workflows(tmp_path: Path) -> None:
    assert load_workflows(tmp_path / "nope") == []


def test_summary_description_and_markdown(loaded: dict[str, Workflow]) -> None:
    good = loaded["good"]
    assert good.summary == "Make an image" and good.description == "Makes a flat image."
    assert loaded["raises"].summary == "raises"  # defaults to the route name, like comfyui-api
    assert good.route_description(markdown=False) == "Makes a flat image."
    table = good.route_description(markdown=True)
    assert table.startswith("Makes a flat image.\n\n| Field | Type | Description | Default |")
    assert "| prompt | string | What to draw | **Required** |" in table
    assert "| width | integer (≥ 64, ≤ 2048) | Width in pixels | `512` |" in table


def test_body_type_has_input_and_every_prompt_option(loaded: dict[str, Workflow]) -> None:
    body_type = loaded["deep/er/nested"].body_type
    assert body_type.__name__ == "DeepErNestedWorkflowRequest"
    assert issubclass(body_type, PromptOptions)
    fields = set(body_type.__struct_fields__)
    assert fields == set(PromptOptions.__struct_fields__) | {"input"}
    assert "prompt" not in fields
    schema = msgspec.json.schema(body_type)
    assert "input" in schema["$defs"][body_type.__name__]["required"]


# --- bodies -------------------------------------------------------------------------------


def test_prepare_builds_the_prompt_request(loaded: dict[str, Workflow], comfy: FakeComfy) -> None:
    good = loaded["good"]
    body = good.decode_body(
        b'{"input": {"prompt": "cat", "width": 100}, "id": "job-1", "webhook_v2": "http://h/w",'
        b' "convert_output": {"format": "webp"}, "s3": {"bucket": "b", "async": true}}'
    )
    request, options = good.split_body(body)
    assert type(options) is PromptOptions and options.id == "job-1"
    assert msgspec.to_builtins(request) == {"prompt": "cat", "width": 100, "color": 0}
    prompt_request, echoed = run(good.prepare(body, WorkflowContext(comfy.get_json)))
    assert isinstance(prompt_request, PromptRequest)
    assert echoed is request
    assert prompt_request.id == "job-1" and prompt_request.webhook_v2 == "http://h/w"
    assert isinstance(prompt_request.convert_output, ConvertWebp)
    assert prompt_request.s3 == S3Upload(bucket="b", async_=True)
    assert prompt_request.prompt["1"].inputs["width"] == 100
    assert prompt_request.prompt["2"].class_type == "SaveImage"
    assert comfy.calls == []  # a workflow that does not ask never touches ComfyUI


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"input": {"prompt": "x", "width": "wide"}}, "input.width"),
        ({"input": {"prompt": "x", "width": 10}}, "input.width"),
        ({"input": {"width": 100}}, "input.prompt"),
        ({"input": {"prompt": "x", "height": 5}}, "input.height"),
        ({}, "input"),
        ({"input": "x"}, "input"),
        ({"input": {"prompt": "x"}, "prompt": {}}, "prompt"),
        (
            {
                "input": {"prompt": "x"},
                "convert_output": {"format": "jpeg", "options": {"quality": 0}},
            },
            "convert_output.options.quality",
        ),
        ({"input": {"prompt": "x"}, "id": "bad id!"}, "id"),
    ],
)
def test_bad_body_names_the_field(
    loaded: dict[str, Workflow], body: dict[str, Any], location: str
) -> None:
    good = loaded["good"]
    with pytest.raises(WorkflowInputError) as info:
        good.decode_body(msgspec.json.encode(body))
    assert info.value.location == location
    assert location in info.value.error
    assert status_of(info.value) == 400
    with pytest.raises(WorkflowInputError) as info2:
        good.convert_body(body)
    assert info2.value.location == location
    response = info.value.body()
    assert response["location"] == location and response["error"].startswith("Invalid ")


def test_invalid_json_body(loaded: dict[str, Workflow]) -> None:
    with pytest.raises(WorkflowInputError) as info:
        loaded["good"].decode_body(b"{not json")
    assert info.value.location == "body" and "JSON" in info.value.error


def test_generate_that_raises(loaded: dict[str, Workflow], comfy: FakeComfy) -> None:
    wf = loaded["raises"]
    body = wf.decode_body(b'{"input": {"n": 13}}')
    with pytest.raises(WorkflowGenerateError) as info:
        run(wf.prepare(body, WorkflowContext(comfy.get_json)))
    assert info.value.body() == {
        "error": "Failed to generate workflow prompt: n=13 is unlucky",
        "location": "input",
    }


def test_generate_returning_a_non_prompt(loaded: dict[str, Workflow], comfy: FakeComfy) -> None:
    wf = loaded["not_a_prompt"]
    with pytest.raises(WorkflowGenerateError, match="not an API-format prompt"):
        run(wf.prepare(wf.decode_body(b'{"input": {}}'), WorkflowContext(comfy.get_json)))


# --- the context --------------------------------------------------------------------------


def test_context_is_read_when_the_workflow_runs(
    loaded: dict[str, Workflow], comfy: FakeComfy
) -> None:
    wf = loaded["deep/er/nested"]
    assert comfy.calls == []  # nothing is read at load time
    body = wf.decode_body(b'{"input": {"sampler": "my_custom_sampler"}}')
    with pytest.raises(WorkflowInputError) as info:
        run(wf.prepare(body, WorkflowContext(comfy.get_json)))
    assert info.value.location == "input.sampler"
    assert comfy.calls == ["/object_info/KSampler"]

    # A custom node adds a sampler; the next request sees it (comfyui-api froze it at boot).
    comfy.samplers.append("my_custom_sampler")
    comfy.combo_style = True
    comfy.models["upscale_models"] = ["new-x4.pth"]
    prompt_request, _ = run(wf.prepare(body, WorkflowContext(comfy.get_json)))
    assert prompt_request.prompt["2"].inputs["model_name"] == "new-x4.pth"
    assert comfy.calls[1:] == ["/object_info/KSampler", "/models/upscale_models"]


def test_context_methods_and_cache(comfy: FakeComfy) -> None:
    async def go() -> None:
        ctx = WorkflowContext(comfy.get_json, warmup_checkpoint=None)
        assert await ctx.folders() == ["checkpoints", "upscale_models"]
        assert await ctx.models("checkpoints") == ["sd15.safetensors", "sdxl.safetensors"]
        assert await ctx.schedulers() == comfy.schedulers
        assert await ctx.samplers() == comfy.samplers
        assert await ctx.default_checkpoint() == "sd15.safetensors"
        assert await ctx.choices("KSampler", "seed") == []
        assert comfy.calls.count("/object_info/KSampler") == 1  # cached per context
        assert (
            await WorkflowContext(comfy.get_json, warmup_checkpoint="w.ckpt").default_checkpoint()
            == "w.ckpt"
        )
        with pytest.raises(WorkflowContextError, match="/models/nosuch"):
            await ctx.models("nosuch")

    run(go())


def test_comfyui_unreachable_is_a_502(loaded: dict[str, Workflow], comfy: FakeComfy) -> None:
    comfy.fail = ConnectionError("connection refused")
    wf = loaded["deep/er/nested"]
    with pytest.raises(WorkflowContextError) as info:
        run(wf.prepare(wf.decode_body(b'{"input": {}}'), WorkflowContext(comfy.get_json)))
    assert status_of(info.value) == 502 and "connection refused" in info.value.error


def test_modules_with_the_same_file_name_do_not_collide(
    write_module: Callable[[str, str], Path], comfy: FakeComfy
) -> None:
    write_module("a/txt2img.py", GOOD)
    root = write_module("b/txt2img.py", GOOD.replace('"EmptyImage"', '"EmptyImage"  '))
    workflows = load_workflows(root)
    assert [w.route for w in workflows] == ["/workflow/a/txt2img", "/workflow/b/txt2img"]
    assert workflows[0].request_type is not workflows[1].request_type
    assert workflows[0].body_type.__name__ != workflows[1].body_type.__name__


VARIANTS = {
    "sync_ctx.py": """
import msgspec
class RequestSchema(msgspec.Struct):
    pass
def generate(request, ctx):
    return {"1": {"class_type": "SaveImage",
                  "inputs": {"filename_prefix": ctx.warmup_checkpoint or "none"}}}
""",
    "async_one.py": """
import msgspec
class RequestSchema(msgspec.Struct):
    pass
async def generate(request):
    return {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "async"}}}
""",
    "alias.py": """
import msgspec
class RequestSchema(msgspec.Struct):
    pass
def generate_workflow(request):
    return {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "alias"}}}
""",
    "exits.py": "import sys\nsys.exit(3)\n",
}


def test_generate_signatures(write_module: Callable[[str, str], Path], comfy: FakeComfy) -> None:
    for name, source in VARIANTS.items():
        root = write_module(name, source)
    loaded = {w.name: w for w in load_workflows(root)}
    assert set(loaded) == {"sync_ctx", "async_one", "alias"}  # exits.py is skipped, boot goes on
    ctx = WorkflowContext(comfy.get_json, warmup_checkpoint="warm.ckpt")
    prefixes = {}
    for name, wf in loaded.items():
        request, _ = wf.split_body(wf.convert_body({"input": {}}))
        prefixes[name] = run(wf.generate(request, ctx))["1"]["inputs"]["filename_prefix"]
    assert prefixes == {"sync_ctx": "warm.ckpt", "async_one": "async", "alias": "alias"}


def test_context_with_a_getter_that_returns_none_for_404() -> None:
    """ComfyClient.get_json answers None for a 404; the context reads that as empty."""

    async def get_json(path: str) -> Any:
        return None

    async def go() -> None:
        ctx = WorkflowContext(get_json)
        assert await ctx.models("nosuch") == []
        assert await ctx.samplers() == []
        assert await ctx.object_info("Nope") == {}
        assert await ctx.default_checkpoint() is None

    run(go())


def test_importing_does_not_load_pillow() -> None:
    import subprocess
    import sys

    code = (
        "import sys, comfy_sidecar.pipeline.convert, comfy_sidecar.workflows; "
        "assert 'PIL' not in sys.modules, 'PIL imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_prompt_checkpoint_is_the_first_checkpoint_loader_by_node_id() -> None:
    def loader(name: Any, class_type: str = "CheckpointLoaderSimple") -> dict[str, Any]:
        return {"class_type": class_type, "inputs": {"ckpt_name": name}}

    assert prompt_checkpoint(None) is None
    assert prompt_checkpoint({}) is None
    assert prompt_checkpoint({"1": loader("a.ckpt", "CheckpointLoader")}) is None
    ordered = {"b": loader("b.ckpt"), "10": loader("10.ckpt"), "9": loader("9.ckpt")}
    assert prompt_checkpoint(ordered) == "9.ckpt"  # numeric ids first, ascending
    assert prompt_checkpoint({"²": loader("sup.ckpt"), "x": loader("x.ckpt")}) == "x.ckpt"
    assert prompt_checkpoint({"1": loader(["4", 0]), "2": loader("late.ckpt")}) is None
    assert prompt_checkpoint({"1": {"class_type": "CheckpointLoaderSimple"}}) is None
