"""Hugging Face and Azure Blob through a running sidecar: URLs in LoadImage and in
UpscaleModelLoader (the model must load and upscale, on a real ComfyUI too), and sync and async
uploads verified on the servers (a local Hugging Face Hub and Azurite)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BACKENDS, Sidecar, running_sidecar
from tests.conftest import png_bytes as make_png
from tests.storage.conftest import azurite  # noqa: F401 - fixture
from tests.storage.hf_hub_server import HubServer
from tests.waiting import wait_for

# Subprocess sidecars: the module shares one sidecar, whose Hugging Face client reads
# HF_ENDPOINT from the process's environment.
pytestmark = pytest.mark.sidecar_process

CONTAINER = "sidecar"


@pytest.fixture(scope="module")
def hub(tiny_model: Path) -> Iterator[HubServer]:
    server = HubServer(token="hf_e2e")
    server.repos[("model", "org/upscalers", "tiny x2.safetensors")] = tiny_model.read_bytes()
    server.repos[("dataset", "org/images", "green.png")] = make_png((11, 5), (0, 200, 0))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def blobs(azurite: str, tiny_model: Path) -> Any:  # noqa: F811
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(azurite)
    container = service.create_container(CONTAINER)
    container.upload_blob("in/yellow.png", make_png((7, 13), (250, 250, 0)))
    container.upload_blob("models/tiny.safetensors", tiny_model.read_bytes())
    return container


@pytest.fixture(scope="module", params=BACKENDS)
def sidecar(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    hub: HubServer,
    azurite: str,  # noqa: F811 - the imported fixture
    blobs: Any,
) -> Iterator[Sidecar]:
    with running_sidecar(
        request.param,
        tmp_path_factory.mktemp(f"backends-{request.param}"),
        HF_ENDPOINT=hub.endpoint,
        HF_TOKEN="hf_e2e",
        HF_HUB_DISABLE_XET="1",
        AZURE_STORAGE_CONNECTION_STRING=azurite,
    ) as sc:
        yield sc


def blob_url(blobs: Any, name: str) -> str:
    return f"{blobs.url}/{name}"


def invert(image: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "be"}},
    }


def upscale(model: str) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 8, "batch_size": 1, "color": 99},
        },
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}},
        "3": {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]},
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "beu"}},
    }


def size_of(b64: str) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).size  # type: ignore[no-any-return]


def remember_model(sidecar: Sidecar, body: dict[str, Any]) -> None:
    model_dir = Path(sidecar.env.get("MODEL_DIR") or Path(sidecar.env["COMFY_HOME"]) / "models")
    name = body["prompt"]["2"]["inputs"]["model_name"]
    sidecar.staged_models.append(model_dir / "upscale_models" / name)


def test_hf_dataset_image_input(sidecar: Sidecar, hub: HubServer) -> None:
    url = f"{hub.endpoint}/datasets/org/images/resolve/main/green.png"
    response = sidecar.post("/prompt", json={"prompt": invert(url)})
    assert response.status_code == 200, response.text
    assert size_of(response.json()["images"][0]) == (11, 5)


def test_hf_model_url_loads_and_upscales(sidecar: Sidecar, hub: HubServer) -> None:
    url = f"{hub.endpoint}/org/upscalers/resolve/main/tiny%20x2.safetensors"
    response = sidecar.post("/prompt", json={"prompt": upscale(url)})
    assert response.status_code == 200, response.text
    remember_model(sidecar, response.json())
    assert size_of(response.json()["images"][0]) == (32, 16)


def test_azure_image_input(sidecar: Sidecar, blobs: Any) -> None:
    response = sidecar.post("/prompt", json={"prompt": invert(blob_url(blobs, "in/yellow.png"))})
    assert response.status_code == 200, response.text
    assert size_of(response.json()["images"][0]) == (7, 13)


def test_azure_model_url_loads_and_upscales(sidecar: Sidecar, blobs: Any) -> None:
    response = sidecar.post(
        "/prompt", json={"prompt": upscale(blob_url(blobs, "models/tiny.safetensors"))}
    )
    assert response.status_code == 200, response.text
    remember_model(sidecar, response.json())
    assert size_of(response.json()["images"][0]) == (32, 16)


def test_sync_upload_to_azure(sidecar: Sidecar, blobs: Any) -> None:
    prompt = invert(base64.b64encode(make_png((5, 4))).decode())
    response = sidecar.post(
        "/prompt",
        json={
            "prompt": prompt,
            "id": "az-sync",
            "azure_blob_upload": {"container": CONTAINER, "blob_prefix": "out"},
        },
    )
    assert response.status_code == 200, response.text
    (url,) = response.json()["images"]
    assert url.endswith(f"/{CONTAINER}/out/az-sync_be_00001_.png")
    data = blobs.download_blob("out/az-sync_be_00001_.png").readall()
    assert size_of(base64.b64encode(data).decode()) == (5, 4)


def test_async_upload_to_azure(sidecar: Sidecar, blobs: Any) -> None:
    prompt = invert(base64.b64encode(make_png((3, 3))).decode())
    response = sidecar.post(
        "/prompt",
        json={
            "prompt": prompt,
            "id": "az-async",
            "azure_blob_upload": {"container": CONTAINER, "blob_prefix": "late/", "async": True},
        },
    )
    assert response.status_code == 202
    wait_until(lambda: blobs.get_blob_client("late/az-async_be_00001_.png").exists())


def test_sync_upload_to_hf(sidecar: Sidecar, hub: HubServer) -> None:
    prompt = invert(base64.b64encode(make_png((4, 2))).decode())
    response = sidecar.post(
        "/prompt",
        json={
            "prompt": prompt,
            "id": "hf-sync",
            "hf_upload": {"repo": "org/results", "repo_type": "dataset", "directory": "runs"},
        },
    )
    assert response.status_code == 200, response.text
    # The URL is on HF_ENDPOINT's host (huggingface.co by default).
    assert response.json()["images"] == [
        f"{hub.endpoint}/datasets/org/results/resolve/main/runs/hf-sync_be_00001_.png"
    ]
    assert ("dataset", "org/results", "runs/hf-sync_be_00001_.png") in hub.repos


def test_async_upload_to_hf(sidecar: Sidecar, hub: HubServer) -> None:
    prompt = invert(base64.b64encode(make_png((2, 2))).decode())
    response = sidecar.post(
        "/prompt",
        json={
            "prompt": prompt,
            "id": "hf-async",
            "hf_upload": {"repo": "org/later", "async": True},
        },
    )
    assert response.status_code == 202
    wait_until(lambda: ("model", "org/later", "hf-async_be_00001_.png") in hub.repos)


def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    wait_for(predicate, timeout=timeout, interval=0.05, what="the async upload")
