"""A full cache disk (a real 1 MiB tmpfs as CACHE_DIR) is the sidecar's fault, not the
caller's: 507 naming the field (it was 400), no server path, and the sidecar keeps serving."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import Backend, basic_prompt
from tests.storage.servers import FileServer


def test_a_full_cache_disk_is_507_and_the_sidecar_keeps_serving(
    spawn: Any, backend: Backend, small_tmpfs: Callable[[int], Path]
) -> None:
    cache_dir = small_tmpfs(1 << 20)
    files = FileServer()
    files.files["big.png"] = os.urandom(2 << 20)
    try:
        sidecar = spawn(backend, CACHE_DIR=str(cache_dir))
        sidecar.wait_ready()
        url = files.url("/files/big.png")
        prompt = {
            "1": {"class_type": "LoadImage", "inputs": {"image": url}},
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "x"},
            },
        }
        answer = sidecar.post("/prompt", json={"prompt": prompt})
        assert answer.status_code == 507, answer.text
        assert answer.json()["location"] == "prompt.1.inputs.image"
        assert str(cache_dir) not in answer.text
        download = sidecar.post(
            "/download", json={"url": url, "model_type": "upscale_models", "wait": True}
        )
        assert download.status_code == 507, download.text
        assert download.json()["location"] == "url"
        assert str(cache_dir) not in download.text
        assert sidecar.post("/prompt", json={"prompt": basic_prompt(1)}).status_code == 200
    finally:
        files.stop()
