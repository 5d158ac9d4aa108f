"""A manifest that brings the tiny upscale model to a real ComfyUI, which then runs with it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REAL_AVAILABLE,
    REAL_REASON,
    Backend,
    decode_image,
    upscale_prompt,
)
from tests.manifest.conftest import manifest_env
from tests.storage.servers import FileServer

pytestmark = [pytest.mark.real_comfyui, pytest.mark.skipif(not REAL_AVAILABLE, reason=REAL_REASON)]


def test_before_start_model_then_upscale(
    spawn: Any, tmp_path: Path, files: FileServer, tiny_model: Path
) -> None:
    files.files["tiny.safetensors"] = tiny_model.read_bytes()
    name = f"manifest-{uuid.uuid4().hex[:12]}.safetensors"
    backend = Backend("real", tmp_path / "comfy")
    link = backend.comfy_home / "models" / "upscale_models" / name
    manifest = {
        "models": {
            "before_start": [
                {
                    "url": files.url("/files/tiny.safetensors"),
                    "local_path": f"models/upscale_models/{name}",
                }
            ]
        }
    }
    try:
        sidecar = spawn(backend, **manifest_env(manifest))
        sidecar.wait_ready()
        assert link.exists()
        assert name in sidecar.get("/models").json()["upscale_models"]
        prompt = upscale_prompt(size=64)
        prompt["2"]["inputs"]["model_name"] = name
        answer = sidecar.post("/prompt", json={"prompt": prompt})
        assert answer.status_code == 200, answer.text
        image = decode_image(answer.json()["images"][0])
        assert image.size == (128, 128)
    finally:
        link.unlink(missing_ok=True)
