"""Assets across replicas (``JOB_QUEUE_URL``): two sidecars, each in front of its own ComfyUI
double, on one real redis-server. An asset uploaded to A with comfy-sdk is read, deduplicated,
deleted and fed to a job by B: bytes kept inline in Redis, or (over ASSET_INLINE_MB) in the
object store of ASSET_STORE_URL (moto's S3 server)."""

from __future__ import annotations

import asyncio
import base64
import io
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageChops

from comfy_sidecar.config import load_settings
from comfy_sidecar.http.adapters.comfy_v2.assets import AssetInputs
from comfy_sidecar.pipeline.staging import InlineStaging
from comfy_sidecar.storage import Storage
from tests.byte_relay import byte_relay
from tests.conftest import BACKENDS, Backend, Sidecar, png_bytes
from tests.jobs.test_redis_queue import job, runs_on
from tests.redis_server import RedisServer, redis_server
from tests.storage.conftest import moto_server, s3_client, s3_env
from tests.v2.test_asset_refs import load_image, ref

__all__ = ["moto_server", "redis_server", "s3_client", "s3_env"]  # fixtures, used by name

SECRET = "shared-asset-secret-0123456789"


@pytest.fixture(params=["inline", "object-store"])
def where(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pair(
    where: str,
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[Sidecar, Sidecar, dict[str, str]]]:
    """Replicas A and B (A keeps taking requests for 60 s after SIGTERM, claiming none)."""
    env = {"ASSET_URL_SECRET": SECRET, "JOB_QUEUE_URL": redis_server.url}
    if where == "object-store":
        s3 = request.getfixturevalue("s3_env")
        request.getfixturevalue("s3_client").create_bucket(Bucket="assets")
        env |= {**s3, "ASSET_STORE_URL": "s3://assets/shared", "ASSET_INLINE_MB": "0.01"}
    a = spawn(Backend("double", tmp_path / "comfy-a"), DRAIN_DELAY_S="60", **env)
    b = spawn(Backend("double", tmp_path / "comfy-b"), **env)
    for sidecar in (a, b):
        sidecar.wait_ready()
    yield a, b, env


def sdk_client(base_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    from comfy_sdk import Comfy

    monkeypatch.setenv("COMFY_BASE_URL", base_url)
    return Comfy()


def resolve_for_job(
    tmp_path: Path, env: dict[str, str], workflow: dict[str, Any], job_id: str
) -> dict[str, Any]:
    """What the submitting replica's ``resolve_assets`` makes of ``workflow`` (the shared
    asset service over the same Redis, as the container builds it)."""
    from comfy_sidecar.runtime.container import _assets

    async def main() -> dict[str, Any]:
        settings = load_settings({"HOME": str(tmp_path), **env})
        storage = Storage(settings, env={**env, "HOME": str(tmp_path)})
        await storage.start()

        class NoJobs:
            async def get(self, job_id: str) -> None:
                return None

        assets, _ = _assets(settings, storage, NoJobs())  # type: ignore[arg-type]
        try:
            return await AssetInputs(assets, InlineStaging()).resolve(workflow, job_id)
        finally:
            await assets.close()
            await storage.close()

    return asyncio.run(main())


@pytest.mark.sidecar_process  # SIGTERMs replica A's process to drain it
def test_an_asset_uploaded_to_a_is_served_deduped_deleted_and_run_by_b(
    pair: tuple[Sidecar, Sidecar, dict[str, str]],
    where: str,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b, env = pair
    source = png_bytes((64, 48), (200, 30, 10), comment="x" * 20_000)  # > ASSET_INLINE_MB 0.01
    path = tmp_path / "photo.png"
    path.write_bytes(source)

    with sdk_client(a.url, monkeypatch) as on_a:
        asset = on_a.assets.from_file(path)
        asset_id = asset.commit()
        assert asset.created_new is True

    # B answers for it: record, content (whole and by range, through A's signed URL), by-hash.
    got = b.get(f"/api/v2/assets/{asset_id}").json()
    assert got["hash"] == asset.hash and got["size_bytes"] == len(source)
    signed = httpx.URL(got["url"])
    assert signed.host == "127.0.0.1" and signed.port == b.port
    signed_on_a = httpx.get(str(signed.copy_with(port=a.port)))  # one secret: any replica
    assert signed_on_a.status_code == 200 and signed_on_a.content == source
    ranged = httpx.get(str(signed), headers={"range": "bytes=100-199"})
    assert ranged.status_code == 206 and ranged.content == source[100:200]
    head = b.client.head(f"{b.url}/api/v2/assets/by-hash/{asset.hash}")
    assert head.status_code == 200

    # The same bytes through B: a hash hit, no body sent.
    with byte_relay(b.port) as relay, sdk_client(relay.url, monkeypatch) as on_b:
        again = on_b.assets.from_file(path)
        again.commit()
        assert again.created_new is False
        assert relay.sent < 4096, relay.sent

    # A single-use key used on A is refused on B.
    key = {"idempotency-key": f"replicas-{time.time_ns()}"}
    files = {"file": ("k.bin", b"keyed bytes")}
    assert a.post("/api/v2/assets", files=files, headers=key).status_code == 201
    reused = b.post("/api/v2/assets", files=files, headers=key)
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reuse"

    # A job whose workflow refers to it is claimed by B (A drains: it takes requests, claims
    # nothing) and reads the asset there.
    workflow = load_image(ref(asset_id))
    workflow["2"] = {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    workflow["3"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["2", 0], "filename_prefix": "from-asset"},
    }
    resolved = resolve_for_job(tmp_path, env, workflow, "asset-job-1")
    value = resolved["1"]["inputs"]["image"]
    assert value.startswith("data:image/png;base64," if where == "inline" else "s3://assets/")
    assert a.proc is not None
    a.proc.send_signal(signal.SIGTERM)
    a.wait_status("/ready", 503, timeout=30)
    submitted = a.post("/jobs", json={"id": "asset-job-1", "prompt": resolved})
    assert submitted.status_code == 202, submitted.text
    view = job(b, "asset-job-1", wait=60)
    assert view["status"] == "completed", view
    assert runs_on([a, b], view) is b
    output = b.get("/jobs/asset-job-1/outputs/0")
    assert output.status_code == 200
    inverted = ImageChops.invert(Image.open(io.BytesIO(source)).convert("RGB"))
    produced = Image.open(io.BytesIO(output.content)).convert("RGB")
    assert ImageChops.difference(produced, inverted).getbbox() is None

    # Deleted on B, gone on A.
    deleted = b.client.delete(f"{b.url}/api/v2/assets/{asset_id}")
    assert deleted.status_code == 204
    gone = a.get(f"/api/v2/assets/{asset_id}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    a.proc.kill()  # its DRAIN_DELAY_S has served its purpose (ComfyUI dies with it)
    a.proc.wait()


@pytest.mark.parametrize("kind", BACKENDS)
def test_comfyui_loads_an_uploaded_asset_through_a_reference(
    kind: str,
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A LoadImage of an asset uploaded with comfy-sdk, its ``core/ASSET`` reference resolved
    as the submitting replica does (a ``data:`` URL of the bytes kept in Redis), run by the
    ComfyUI behind the replica that claims it (the double, or a real ComfyUI)."""
    env = {"ASSET_URL_SECRET": SECRET, "JOB_QUEUE_URL": redis_server.url}
    sidecar = spawn(Backend(kind, tmp_path / "comfy"), **env)
    sidecar.wait_ready(timeout=240 if kind == "real" else None)
    source = png_bytes((40, 24), (10, 120, 240))
    path = tmp_path / "blue.png"
    path.write_bytes(source)
    with sdk_client(sidecar.url, monkeypatch) as client:
        asset_id = client.assets.from_file(path).commit()
    workflow = load_image(ref(asset_id))
    workflow["2"] = {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    workflow["3"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["2", 0], "filename_prefix": "asset"},
    }
    resolved = resolve_for_job(tmp_path, env, workflow, "real-asset-job")
    answer = sidecar.post("/prompt", json={"id": "real-asset-job", "prompt": resolved}, timeout=240)
    assert answer.status_code == 200, answer.text
    produced = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).convert("RGB")
    inverted = ImageChops.invert(Image.open(io.BytesIO(source)).convert("RGB"))
    extrema = ImageChops.difference(produced, inverted).getextrema()
    assert max(high for _, high in extrema) <= 1, extrema  # ComfyUI rounds through float32
