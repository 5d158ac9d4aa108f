"""POST /download, GET /download/{key} and GET /models against a real sidecar + the double."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Backend, Sidecar, make_sidecar
from tests.storage.servers import FileServer
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def server() -> Iterator[FileServer]:
    files = FileServer()
    files.files.update(
        {
            "m1.safetensors": b"a" * 200_000,
            "m2.safetensors": b"b" * 1234,
            "slow.safetensors": b"c" * 5000,
            "noext": b"d" * 777,
        }
    )
    yield files
    files.stop()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    tmp = tmp_path_factory.mktemp("download")
    running = make_sidecar(Backend("double", tmp / "comfy"), tmp)
    (tmp / "comfy" / "models" / "loras").mkdir()
    running.start()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def models_dir(sidecar: Sidecar) -> Path:
    return sidecar.backend.comfy_home / "models"


def poll(sidecar: Sidecar, key: str, timeout: float = 20) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = sidecar.get(f"/download/{key}").json()
        return body if body["status"] != "started" else None

    return wait_for(finished, timeout=timeout, interval=0.05, what=f"download {key} to finish")


def test_async_download_then_status(sidecar: Sidecar, server: FileServer) -> None:
    url = server.url("/files/m1.safetensors")
    answer = sidecar.post("/download", json={"url": url, "model_type": "checkpoints"})
    assert answer.status_code == 202
    body = answer.json()
    assert body["url"] == url and body["model_type"] == "checkpoints"
    assert body["filename"] == "m1.safetensors" and body["status"] == "started"
    assert "size" not in body
    done = poll(sidecar, body["key"])
    assert done["status"] == "completed" and done["size"] == 200_000
    assert done["duration"] >= 0
    assert (models_dir(sidecar) / "checkpoints" / "m1.safetensors").read_bytes() == b"a" * 200_000


def test_progress_while_started(sidecar: Sidecar, server: FileServer) -> None:
    server.delay_s = 1.5
    try:
        url = server.url("/files/slow.safetensors")
        answer = sidecar.post("/download", json={"url": url, "model_type": "loras"}).json()
        now = sidecar.get(f"/download/{answer['key']}").json()
        assert now["status"] == "started" and now["bytes_done"] == 0
        assert poll(sidecar, answer["key"])["status"] == "completed"
    finally:
        server.delay_s = 0.0


def test_wait_true_gives_size_and_duration(sidecar: Sidecar, server: FileServer) -> None:
    url = server.url("/files/m2.safetensors")
    answer = sidecar.post(
        "/download",
        json={
            "url": url,
            "model_type": "upscale_models",
            "filename": "renamed.safetensors",
            "wait": True,
        },
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "completed" and body["size"] == 1234
    assert isinstance(body["duration"], float) and body["filename"] == "renamed.safetensors"
    assert (models_dir(sidecar) / "upscale_models" / "renamed.safetensors").stat().st_size == 1234
    listed = sidecar.get("/models").json()
    assert "renamed.safetensors" in listed["upscale_models"]
    # the cache holds it under its URL-hash name, not the caller's filename
    gets = server.count("GET", "/files/m2.safetensors")
    again = sidecar.post("/download", json={"url": url, "model_type": "loras", "wait": True})
    assert again.status_code == 200 and server.count("GET", "/files/m2.safetensors") == gets


def test_url_without_extension_gets_the_cache_extension(
    sidecar: Sidecar, server: FileServer
) -> None:
    url = server.url("/noext/noext?cd=model.safetensors")
    answer = sidecar.post("/download", json={"url": url, "model_type": "loras", "wait": True})
    assert answer.status_code == 200, answer.text
    assert answer.json()["filename"] == "noext.safetensors"
    assert "noext.safetensors" in sidecar.get("/models").json()["loras"]


@pytest.mark.parametrize(
    ("body", "location", "words"),
    [
        ({"model_type": "nope"}, "model_type", "no model folder 'nope'"),
        ({"url": "not a url"}, "url", "not a URL"),
        ({"url": "ftp://h/x.bin"}, "url", "not a URL"),
        ({"filename": "sub/x.safetensors"}, "filename", "plain file name"),
        ({"filename": "../x.safetensors"}, "filename", "plain file name"),
        ({"filename": ".."}, "filename", "plain file name"),
    ],
)
def test_bad_requests(
    sidecar: Sidecar, server: FileServer, body: dict[str, str], location: str, words: str
) -> None:
    request = {"url": server.url("/files/m2.safetensors"), "model_type": "loras", **body}
    answer = sidecar.post("/download", json=request)
    assert answer.status_code == 400
    assert answer.json()["location"] == location and words in answer.json()["error"]


def test_missing_field_and_remote_404(sidecar: Sidecar, server: FileServer) -> None:
    answer = sidecar.post("/download", json={"url": server.url("/files/m2.safetensors")})
    assert answer.status_code == 400 and answer.json()["location"] == "model_type"
    url = server.url("/files/absent.safetensors")
    failed = sidecar.post("/download", json={"url": url, "model_type": "loras", "wait": True})
    assert failed.status_code == 400 and failed.json()["location"] == "url"
    started = sidecar.post("/download", json={"url": url, "model_type": "loras"}).json()
    result = poll(sidecar, started["key"])
    assert result["status"] == "failed" and result["error"]
    assert sidecar.get("/download/unknownkey").status_code == 404


def test_models_is_live(sidecar: Sidecar, server: FileServer) -> None:
    before = sidecar.get("/models").json()
    assert "checkpoints" in before and "tiny-compact-x2.safetensors" in before["upscale_models"]
    assert "controlnet_new" not in before
    fresh = models_dir(sidecar) / "controlnet_new"
    fresh.mkdir()
    (fresh / "c.safetensors").write_bytes(b"x")
    after = sidecar.get("/models").json()
    assert after["controlnet_new"] == ["c.safetensors"]
    # and /download knows the new folder at once
    url = server.url("/files/m2.safetensors")
    answer = sidecar.post(
        "/download", json={"url": url, "model_type": "controlnet_new", "wait": True}
    )
    assert answer.status_code == 200
    assert "m2.safetensors" in sidecar.get("/models").json()["controlnet_new"]


def test_openapi_documents_the_routes(sidecar: Sidecar) -> None:
    doc = sidecar.get("/openapi.json").json()
    for path in ("/download", "/download/{key}", "/models"):
        assert path in doc["paths"], sorted(doc["paths"])
