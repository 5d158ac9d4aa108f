"""URLs in prompts and uploads of outputs, through a running sidecar, against real servers:
a plain HTTP file server and moto's S3 server (the backends themselves are covered in
tests/storage)."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BACKENDS, Sidecar, running_sidecar
from tests.conftest import png_bytes as make_png
from tests.receiver import Receiver
from tests.storage.conftest import moto_server  # noqa: F401 - fixture
from tests.storage.servers import FileServer
from tests.waiting import wait_for

BUCKET = "sidecar-e2e"


@pytest.fixture(scope="module")
def files(tiny_model: Path) -> Iterator[FileServer]:
    server = FileServer()
    server.files["red.png"] = make_png((18, 10), (200, 30, 10))
    server.files["tiny.safetensors"] = tiny_model.read_bytes()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3(moto_server: str) -> Any:  # noqa: F811
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="inputs/blue.png", Body=make_png((9, 7), (0, 0, 250)))
    return client


@pytest.fixture(scope="module", params=BACKENDS)
def sidecar(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    moto_server: str,  # noqa: F811 - the imported fixture
    s3: Any,
    files: FileServer,
) -> Iterator[Sidecar]:
    with running_sidecar(
        request.param,
        tmp_path_factory.mktemp(f"storage-{request.param}"),
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=moto_server,
        HTTP_AUTH_HEADER_NAME="X-Key",
        HTTP_AUTH_HEADER_VALUE="k",
        HTTP_AUTH_HEADER_HOSTS="localhost",
    ) as sc:
        yield sc


def invert(image: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "url"}},
    }


def decode(b64: str) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def model_dir(sidecar: Sidecar) -> Path:
    return Path(sidecar.env.get("MODEL_DIR") or Path(sidecar.env["COMFY_HOME"]) / "models")


def test_http_url_input(sidecar: Sidecar, files: FileServer) -> None:
    before = {p for p in sidecar.backend.input_dir.rglob("*") if p.is_file()}
    response = sidecar.post("/prompt", json={"prompt": invert(files.url("/files/red.png"))})
    assert response.status_code == 200, response.text
    image = decode(response.json()["images"][0])
    assert image.size == (18, 10)
    # The staged input is gone after the job; the cache keeps the download by URL hash.
    assert {p for p in sidecar.backend.input_dir.rglob("*") if p.is_file()} == before
    cache = Path(sidecar.env["CACHE_DIR"])
    assert any(p.suffix == ".png" and len(p.stem) == 32 for p in cache.iterdir())


def test_s3_url_input(sidecar: Sidecar) -> None:
    response = sidecar.post("/prompt", json={"prompt": invert(f"s3://{BUCKET}/inputs/blue.png")})
    assert response.status_code == 200, response.text
    assert decode(response.json()["images"][0]).size == (9, 7)


def test_model_url_in_upscale_loader(sidecar: Sidecar, files: FileServer) -> None:
    url = files.url("/files/tiny.safetensors")
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 32, "height": 24, "batch_size": 1, "color": 7},
        },
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": url}},
        "3": {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]},
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "mu"}},
    }
    response = sidecar.post("/prompt", json={"prompt": prompt})
    assert response.status_code == 200, response.text
    body = response.json()
    assert decode(body["images"][0]).size == (64, 48)
    name = body["prompt"]["2"]["inputs"]["model_name"]
    assert name.endswith(".safetensors") and len(name) == 32 + len(".safetensors")
    staged = model_dir(sidecar) / "upscale_models" / name
    sidecar.staged_models.append(staged)
    assert staged.exists()


def test_eight_prompts_share_one_download(sidecar: Sidecar, files: FileServer) -> None:
    name = f"shared-{sidecar.backend.kind}.png"  # the file server is shared by both backends
    files.files[name] = make_png((12, 12), (1, 2, 3))
    files.delay_s = 0.5
    url = files.url(f"/files/{name}")
    results: list[Any] = [None] * 8

    def run(i: int) -> None:
        results[i] = sidecar.post("/prompt", json={"prompt": invert(url)})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        files.delay_s = 0.0
    assert all(r is not None and r.status_code == 200 for r in results)
    assert files.count("GET", f"/files/{name}") == 1


def test_missing_url_is_400_with_location(sidecar: Sidecar, files: FileServer) -> None:
    response = sidecar.post("/prompt", json={"prompt": invert(files.url("/files/nope.png"))})
    assert response.status_code == 400, response.text
    assert response.json()["location"] == "prompt.1.inputs.image"


def test_credentials_apply_to_media_urls(sidecar: Sidecar, files: FileServer) -> None:
    url = files.url("/auth/red.png")
    refused = sidecar.post("/prompt", json={"prompt": invert(url)})
    assert refused.status_code == 400
    allowed = sidecar.post(
        "/prompt",
        json={
            "prompt": invert(url),
            "credentials": [
                {
                    "url_pattern": f"http://127.0.0.1:{files.port}/auth/*",
                    "auth": {"type": "bearer", "token": "secret"},
                }
            ],
        },
    )
    assert allowed.status_code == 200, allowed.text
    assert "credentials" not in allowed.json()
    assert "secret" not in allowed.text


def test_operator_header_only_for_allowed_hosts(sidecar: Sidecar, files: FileServer) -> None:
    name = f"hdr-{sidecar.backend.kind}.png"  # the file server is shared by both backends
    files.files[name] = make_png((5, 5))
    other = sidecar.post("/prompt", json={"prompt": invert(files.url(f"/auth/{name}"))})
    assert other.status_code == 400  # 127.0.0.1 is not in HTTP_AUTH_HEADER_HOSTS
    sent = [h for m, p, h in files.requests if p == f"/auth/{name}"]
    assert sent and all("X-Key" not in h for h in sent)
    allowed = sidecar.post(
        "/prompt", json={"prompt": invert(files.url(f"/auth/{name}", host="localhost"))}
    )
    assert allowed.status_code == 200, allowed.text


def test_sync_upload_to_s3(sidecar: Sidecar, s3: Any) -> None:
    prompt = invert(base64.b64encode(make_png((8, 8))).decode())
    response = sidecar.post(
        "/prompt",
        json={"prompt": prompt, "id": "up-s3", "s3": {"bucket": BUCKET, "prefix": "out/"}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["images"] == [f"s3://{BUCKET}/out/up-s3_url_00001_.png"]
    obj = s3.get_object(Bucket=BUCKET, Key="out/up-s3_url_00001_.png")["Body"].read()
    assert decode(base64.b64encode(obj).decode()).size == (8, 8)
    assert body["s3"] == {"bucket": BUCKET, "prefix": "out/", "async": False}


def test_async_upload_with_webhook_v2(sidecar: Sidecar, files: FileServer, receiver: Any) -> None:
    hook: Receiver = receiver()
    prompt = invert(base64.b64encode(make_png((6, 6))).decode())
    response = sidecar.post(
        "/prompt",
        json={
            "prompt": prompt,
            "id": "up-http",
            "webhook_v2": hook.url,
            "http_upload": {"url_prefix": files.url("/upload/"), "async": True},
        },
    )
    assert response.status_code == 202
    (request,) = hook.wait_for(1, timeout=60)
    body = request.json()
    assert body["type"] == "prompt.complete"
    assert body["images"] == [files.url("/upload/up-http_url_00001_.png")]
    assert "up-http_url_00001_.png" in files.uploads


def test_upload_failure_is_502(sidecar: Sidecar, files: FileServer) -> None:
    prompt = invert(base64.b64encode(make_png((6, 6))).decode())
    response = sidecar.post(
        "/prompt",
        json={"prompt": prompt, "id": "up-fail", "http_upload": {"url_prefix": files.url("/fail")}},
    )
    assert response.status_code == 502, response.text
    assert "up-fail_url_00001_.png" in response.json()["error"]
    assert response.json()["location"] == "http_upload"
    # The failed job's output was still cleaned up.
    wait_for(
        lambda: not any(sidecar.backend.output_dir.rglob("up-fail*")),
        timeout=5,
        what="the failed job's outputs to be removed",
    )


def test_traversal_in_upload_prefix_is_refused(sidecar: Sidecar) -> None:
    prompt = invert(base64.b64encode(make_png((6, 6))).decode())
    response = sidecar.post(
        "/prompt", json={"prompt": prompt, "s3": {"bucket": BUCKET, "prefix": "../etc/"}}
    )
    assert response.status_code == 400, response.text
