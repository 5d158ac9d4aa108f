"""POST /workflow/<name> through a real sidecar in front of the ComfyUI double."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import basic_prompt, running_sidecar

# Resolves the checkpoint like the shipped workflows: given, else the warmup prompt's, else the
# first installed (the double has none). The loader node is not connected: ComfyUI (and the
# double) only run what the output needs.
MODULE = """
import msgspec
from comfy_sidecar.workflows import WorkflowContext, resolve_model

class RequestSchema(msgspec.Struct, forbid_unknown_fields=True):
    checkpoint: str | None = None

async def generate(request: RequestSchema, ctx: WorkflowContext) -> dict:
    ckpt = await resolve_model(
        ctx, "checkpoint", request.checkpoint, "checkpoints", default=ctx.warmup_checkpoint
    )
    prompt = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "wf"}},
        "9": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
    }
    return prompt
"""


def test_the_warmup_prompts_checkpoint_reaches_the_workflow_context(tmp_path: Path) -> None:
    """``ctx.warmup_checkpoint`` is the warmup prompt's ``ckpt_name`` (comfyui-api's
    ``config.warmupCkpt``), also when the request comes through the route."""
    warmup = basic_prompt(batch=1, size=8, prefix="warm") | {
        "7": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "warm.safetensors"}},
        "5": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "first.safetensors"}},
    }
    (tmp_path / "warmup.json").write_text(json.dumps(warmup))
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "checkpoint.py").write_text(MODULE)
    with running_sidecar(
        "double",
        tmp_path,
        WARMUP_PROMPT_FILE=str(tmp_path / "warmup.json"),
        WORKFLOW_DIR=str(tmp_path / "workflows"),
    ) as sidecar:
        response = sidecar.post("/workflow/checkpoint", json={"input": {}})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["prompt"]["9"]["inputs"]["ckpt_name"] == "first.safetensors"
        assert body["input"] == {"checkpoint": None}
        assert body["filenames"] and all("wf" in name for name in body["filenames"])

        given = sidecar.post("/workflow/checkpoint", json={"input": {"checkpoint": "x.ckpt"}})
        assert given.status_code == 400 and given.json()["location"] == "input.checkpoint"
