"""Disk faults through a running sidecar: a full disk while downloading into the cache, writing
an input or converting an output (507, nothing half-written left, the sidecar keeps serving);
leftovers of a killed predecessor removed at start-up; outputs of failed and interrupted jobs
removed; a model folder that outlives the cache.

The full disks are real: a 2 MiB tmpfs mounted for the test (root only; skipped with the
reason where ``mount`` is not allowed). The files come from a real local HTTP server.
"""

from __future__ import annotations

import base64
import io
import os
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Backend, Sidecar, basic_prompt, png_bytes, upscale_prompt
from tests.storage.servers import FileServer
from tests.waiting import wait_for

TMPFS_BYTES = 2 * 1024 * 1024


@pytest.fixture
def files() -> Iterator[FileServer]:
    server = FileServer()
    yield server
    server.stop()


@pytest.fixture
def small_disk(small_tmpfs: Callable[..., Path]) -> Callable[[Path], Path]:
    """``small_disk(dir) -> dir``: a 2 MiB tmpfs mounted at ``dir`` (see ``small_tmpfs``).
    Request it before ``spawn``, so the sidecars stop before it is unmounted."""
    return lambda where: small_tmpfs(TMPFS_BYTES, where)


def noise_png(width: int, height: int) -> bytes:
    """A PNG of random pixels: incompressible, about 3 x width x height bytes."""
    from PIL import Image

    rng = random.Random(7)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def used_files(root: Path) -> list[Path]:
    """Every file (not directory) under ``root``, hidden ones included."""
    return sorted(p for p in root.rglob("*") if not p.is_dir())


def free_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize


def load_image(image: str, prefix: str = "disk") -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


# --- a full disk -------------------------------------------------------------------------------


def test_full_cache_disk_answers_507_and_leaves_no_partial_download(
    small_disk: Any, spawn: Any, tmp_path: Path, files: FileServer
) -> None:
    cache = small_disk(tmp_path / "cache-fs")
    files.files["big.png"] = noise_png(1000, 1000)  # ~3 MB: more than the disk
    files.files["small.png"] = png_bytes((12, 8))
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"), CACHE_DIR=str(cache))
    sidecar.wait_ready()
    assert len(files.files["big.png"]) > TMPFS_BYTES

    full = sidecar.post("/prompt", json={"prompt": load_image(files.url("/files/big.png"))})
    assert full.status_code == 507, full.text
    assert "no space left" in full.json()["error"]
    assert str(cache) not in full.text  # no server path in the message
    # No temp download, no half-written entry: only the index remains, and the space is back.
    assert [p.name for p in used_files(cache)] == [".comfy-sidecar-index.json"]
    assert free_bytes(cache) > TMPFS_BYTES - 64 * 1024
    assert sidecar.get("/health").status_code == 200

    ok = sidecar.post("/prompt", json={"prompt": load_image(files.url("/files/small.png"))})
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["images"]) == 1


def test_full_input_disk_answers_507_and_leaves_no_partial_input(
    small_disk: Any, spawn: Any, tmp_path: Path
) -> None:
    backend = Backend("double", tmp_path / "comfy")
    input_dir = small_disk(backend.input_dir)
    sidecar: Sidecar = spawn(backend)
    sidecar.wait_ready()
    big = base64.b64encode(noise_png(1000, 1000)).decode()

    full = sidecar.post("/prompt", json={"prompt": load_image(big)})
    assert full.status_code == 507, full.text
    assert "no space left" in full.json()["error"]
    assert used_files(input_dir) == []  # neither the input nor its .part
    assert free_bytes(input_dir) > TMPFS_BYTES - 64 * 1024

    small = base64.b64encode(png_bytes((12, 8))).decode()
    ok = sidecar.post("/prompt", json={"prompt": load_image(small)})
    assert ok.status_code == 200, ok.text
    assert used_files(input_dir) == []  # removed after the job


def test_full_output_disk_while_converting_answers_507(
    small_disk: Any, spawn: Any, tmp_path: Path
) -> None:
    """The PNG fits, its JPEG does not: 507, the PNG and the half-written JPEG are gone, and
    once space is freed the same request converts."""
    backend = Backend("double", tmp_path / "comfy")
    output_dir = small_disk(backend.output_dir)
    sidecar: Sidecar = spawn(backend)
    sidecar.wait_ready()
    filler = output_dir / "filler.bin"
    page = os.statvfs(output_dir).f_frsize
    filler.write_bytes(b"\0" * (free_bytes(output_dir) - page))  # one page left: the PNG's
    request = {"prompt": basic_prompt(batch=1, size=32), "convert_output": {"format": "jpeg"}}

    full = sidecar.post("/prompt", json=request)
    assert full.status_code == 507, full.text
    assert "no space left" in full.json()["error"]
    assert used_files(output_dir) == [filler]

    filler.unlink()
    ok = sidecar.post("/prompt", json=request)
    assert ok.status_code == 200, ok.text
    assert ok.json()["filenames"][0].endswith(".jpeg")
    assert used_files(output_dir) == []


# --- leftovers of a killed predecessor ----------------------------------------------------------


def test_leftovers_of_a_killed_sidecar_are_removed_at_start(
    spawn: Any, backend: Backend, tmp_path: Path
) -> None:
    backend.prepare()
    ours = backend.input_dir / ".comfy-sidecar"
    (ours / "old-job").mkdir(parents=True)
    (ours / "old-job" / "00000.png").write_bytes(png_bytes())
    (ours / "old-job_1.png").write_bytes(png_bytes())
    (ours / "old-job_2.png.part").write_bytes(b"half")
    user = backend.input_dir / "old-job_1.png"  # the user's, even named like ours
    user.write_bytes(png_bytes())
    # ComfyUI's temp dir: --temp-directory X means X/temp for a real ComfyUI.
    temp = backend.base / "temp" / ("temp" if backend.kind == "real" else "")
    temp.mkdir(parents=True, exist_ok=True)
    (temp / "ComfyUI_temp_abcde_00001_.png").write_bytes(png_bytes())
    cache = tmp_path / "cache"
    (cache / ".partial-old-x1").mkdir(parents=True)
    (cache / ".partial-old-x1" / "data").write_bytes(b"half a download")
    (cache / ".partial-index-x2").write_bytes(b"{")

    sidecar: Sidecar = spawn(backend, CACHE_DIR=str(cache))
    sidecar.wait_ready()
    assert used_files(ours) == []
    assert user.read_bytes() == png_bytes()
    assert used_files(temp) == []
    assert [p.name for p in cache.iterdir()] == [".comfy-sidecar-index.json"]


# --- outputs of failed and interrupted jobs -----------------------------------------------------


def early_save_prompt(tail: dict[str, Any], size: int) -> dict[str, Any]:
    """EmptyImage -> SaveImage "early" (an output node, so ComfyUI saves it as soon as its
    image exists), and the same image into ``tail`` (nodes from "3" on, the last a SaveImage).
    The colour is random so no node is served from ComfyUI's cache."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {
                "width": size,
                "height": size,
                "batch_size": 1,
                "color": random.randrange(1 << 24),
            },
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "early"},
        },
        **tail,
    }


def test_outputs_of_a_failed_job_are_removed(spawn: Any, tmp_path: Path) -> None:
    backend = Backend("double", tmp_path / "comfy")
    sidecar: Sidecar = spawn(backend)
    sidecar.wait_ready()
    prompt = early_save_prompt(
        {
            "3": {
                "class_type": "DoubleOutOfMemory",
                "inputs": {"image": ["1", 0], "times": 1, "key": str(uuid.uuid4())},
            },
            "4": {
                "class_type": "SaveImage",
                "inputs": {"images": ["3", 0], "filename_prefix": "x"},
            },
        },
        size=16,
    )
    response = sidecar.post("/prompt", json={"prompt": prompt, "id": "failing-job"})
    assert response.status_code == 503, response.text  # out of memory, OOM_RETRY off
    assert "removed 1 output file(s)" in sidecar.log()
    assert used_files(backend.output_dir) == []


def test_outputs_of_an_interrupted_job_are_removed(spawn: Any, backend: Backend) -> None:
    sidecar: Sidecar = spawn(backend)
    sidecar.wait_ready()
    tail: dict[str, Any] = {}
    for i in range(3, 9):
        tail[str(i)] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [str(i - 1) if i > 3 else "1", 0], "blur_radius": 31, "sigma": 5.0},
        }
    tail["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}}
    prompt = early_save_prompt(tail, size=2048)
    result: dict[str, Any] = {}

    def run() -> None:
        result["response"] = sidecar.post(
            "/prompt", json={"prompt": prompt, "id": "cancelled-job"}, timeout=300
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(
            lambda: any("early" in p.name for p in used_files(backend.output_dir)),
            timeout=120,
            what="the early SaveImage to write its file",
        )
        assert sidecar.post("/interrupt", json={"id": "cancelled-job"}).status_code == 200
    finally:
        thread.join(300)
    response = result["response"]
    assert response.status_code == 499, response.text
    assert used_files(backend.output_dir) == []


# --- a model folder that outlives the cache -----------------------------------------------------


def test_second_sidecar_on_the_same_models_adopts_the_file(
    spawn: Any, backend: Backend, tmp_path: Path, files: FileServer, tiny_model: Path
) -> None:
    """Two sidecars in turn on one models folder, each with its own CACHE_DIR (the models
    volume persisted, the cache did not): the second finds the file under the URL's cache
    name, does not download it again, and answers 200."""
    files.files["tiny.safetensors"] = tiny_model.read_bytes()
    url = files.url("/files/tiny.safetensors")
    prompt = upscale_prompt(size=32)
    prompt["2"]["inputs"]["model_name"] = url
    models = backend.base / "models"

    first: Sidecar = spawn(backend, MODEL_DIR=str(models))
    first.wait_ready()
    response = first.post("/prompt", json={"prompt": prompt})
    assert response.status_code == 200, response.text
    first.stop()
    assert files.count("GET", "/files/tiny.safetensors") == 1

    second: Sidecar = spawn(backend, MODEL_DIR=str(models))
    assert second.env["CACHE_DIR"] != first.env["CACHE_DIR"]
    second.wait_ready()
    response = second.post("/prompt", json={"prompt": prompt})
    assert response.status_code == 200, response.text
    assert files.count("GET", "/files/tiny.safetensors") == 1  # not downloaded again
    assert "from the model folder without downloading it" in second.log()
