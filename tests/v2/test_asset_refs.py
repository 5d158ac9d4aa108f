"""``core/ASSET`` references of a submitted workflow (:func:`resolve_assets`, what
``POST /api/v2/jobs`` calls), over the two asset services the container chooses from: the
in-process one (staged into INPUT_DIR as hard links) and the shared one (a real redis-server:
a ``data:`` URL or the object's URL for the replica that claims the job). Plus the holds: a
job's assets are kept while the job is retained, and released once it is not."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

from comfy_sidecar.assets import AssetStore
from comfy_sidecar.assets.service import AssetService, LocalAssets
from comfy_sidecar.assets.shared import SharedAssets
from comfy_sidecar.config import load_settings
from comfy_sidecar.errors import MissingAsset
from comfy_sidecar.http.adapters.comfy_v2.assets import AssetInputs
from comfy_sidecar.net.redisconn import connect
from comfy_sidecar.pipeline.staging import FolderStaging, InlineStaging, Staging
from comfy_sidecar.storage import Storage
from tests.assets.support import Clock, chunks_of
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, used by name

MIB = 1024 * 1024


def ref(asset_id: str, **info: str) -> dict[str, Any]:
    return {"__type": "core/ASSET", "info": {"id": asset_id, **info}}


def load_image(reference: Any) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": reference}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "o"}},
    }


async def add(assets: AssetService, data: bytes, name: str = "photo.png") -> Any:
    received = await assets.receive(chunks_of(data))
    created = await assets.add(
        received, file_path=name, content_type=None, expected_hash=None, tags=()
    )
    return created.asset


class Retained:
    """``is_retained`` for the tests: the job ids listed in :attr:`jobs` are kept."""

    def __init__(self) -> None:
        self.jobs: set[str] = set()

    async def __call__(self, job_id: str) -> bool:
        return job_id in self.jobs


@asynccontextmanager
async def local(
    tmp_path: Path, retained: Retained, clock: Clock | None = None
) -> AsyncIterator[tuple[LocalAssets, Staging, Path]]:
    settings = load_settings({"HOME": str(tmp_path), "INPUT_DIR": str(tmp_path / "input")})
    assets = LocalAssets(
        AssetStore(tmp_path / "assets"),
        tmp_path / "input",
        max_upload_bytes=64 * MIB,
        is_retained=retained,
        clock=clock or Clock(),
    )
    await assets.start()
    try:
        yield assets, FolderStaging(settings, Storage(settings)), tmp_path / "input"
    finally:
        await assets.close()


@asynccontextmanager
async def shared(
    tmp_path: Path, url: str, retained: Retained, clock: Clock | None = None, **options: Any
) -> AsyncIterator[SharedAssets]:
    settings = load_settings({"HOME": str(tmp_path)})
    storage = Storage(settings)
    await storage.start()
    assets = SharedAssets(
        connect(url),
        tmp_path / f"tmp-{os.urandom(3).hex()}",
        storage=storage,
        spill=options.pop("spill", None),
        inline_max_bytes=options.pop("inline_max_bytes", 8 * MIB),
        inline_total_bytes=options.pop("inline_total_bytes", 0),
        max_upload_bytes=options.pop("max_upload_bytes", 64 * MIB),
        retention_s=options.pop("retention_s", 3600),
        is_retained=retained,
        clock=clock or Clock(),
        **options,
    )
    await assets.start()
    try:
        yield assets
    finally:
        await assets.close()
        await storage.close()


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


# --- in-process ----------------------------------------------------------------------------


def test_a_reference_becomes_a_hard_link_in_the_jobs_media_folder(tmp_path: Path) -> None:
    data = os.urandom(50_000)

    async def main() -> None:
        async with local(tmp_path, Retained()) as (assets, staging, input_dir):
            asset = await add(assets, data)
            workflow = load_image(ref(asset.id, hash="blake3:ignored", file_path="x.jpg"))
            workflow["3"] = {
                "class_type": "VHS_LoadImages",
                "inputs": {"directory": [ref(asset.id), {"keep": ref(asset.id)}]},
            }
            resolved = await AssetInputs(assets, staging).resolve(workflow, "job-1")
            name = f".comfy-sidecar/job-1-media/{asset.id}.png"
            assert resolved["1"]["inputs"]["image"] == name
            assert resolved["3"]["inputs"]["directory"] == [name, {"keep": name}]
            assert resolved["2"] is workflow["2"]  # untouched nodes are shared, not copied
            assert workflow["1"]["inputs"]["image"]["__type"] == "core/ASSET"  # not changed
            staged = input_dir / name
            blob = tmp_path / "assets" / "blobs" / blake3(data).hexdigest()
            assert staged.read_bytes() == data
            assert staged.stat().st_ino == blob.stat().st_ino and not staged.is_symlink()
            assert assets.store.holders(asset.id) == ["job-1"]

            await assets.delete(asset.id)  # the job still reads it: its bytes stay
            assert blob.is_file() and staged.read_bytes() == data

    run(main)


def test_a_workflow_without_references_comes_back_as_a_copy(tmp_path: Path) -> None:
    async def main() -> None:
        async with local(tmp_path, Retained()) as (assets, staging, input_dir):
            workflow = load_image("photo.png")
            resolved = await AssetInputs(assets, staging).resolve(workflow, "job-2")
            assert resolved == workflow and resolved is not workflow
            assert not (input_dir / ".comfy-sidecar").exists()

    run(main)


@pytest.mark.parametrize(
    ("reference", "location"),
    [
        (ref("9f8a1c0d-2b3e-4f56-8a7b-1c2d3e4f5a6b"), "workflow.1.inputs.image"),
        ({"__type": "core/ASSET", "info": {"hash": "blake3:00"}}, "workflow.1.inputs.image"),
        ({"__type": "core/ASSET", "info": "photo.png"}, "workflow.1.inputs.image"),
        ({"__type": "core/ASSET"}, "workflow.1.inputs.image"),
    ],
    ids=["unknown", "no-id", "info-not-object", "no-info"],
)
def test_a_bad_reference_is_missing_asset_and_leaves_nothing_staged_or_held(
    tmp_path: Path, reference: dict[str, Any], location: str
) -> None:
    async def main() -> None:
        async with local(tmp_path, Retained()) as (assets, staging, input_dir):
            good = await add(assets, b"\x89PNG good")
            workflow = load_image(reference)
            workflow["0"] = {"class_type": "LoadImage", "inputs": {"image": ref(good.id)}}
            with pytest.raises(MissingAsset) as caught:
                await AssetInputs(assets, staging).resolve(workflow, "job-3")
            assert caught.value.location == location
            assert caught.value.code == "missing_asset"
            assert not (input_dir / ".comfy-sidecar" / "job-3-media").exists()
            assert assets.store.holders(good.id) == []

    run(main)


def test_a_reference_outside_a_nodes_inputs_is_missing_asset(tmp_path: Path) -> None:
    async def main() -> None:
        async with local(tmp_path, Retained()) as (assets, staging, _):
            asset = await add(assets, b"bytes")
            workflow = load_image("photo.png")
            workflow["1"]["_meta"] = {"title": ref(asset.id)}
            with pytest.raises(MissingAsset) as caught:
                await AssetInputs(assets, staging).resolve(workflow, "job-4")
            assert caught.value.location == "workflow.1._meta.title"

    run(main)


def test_a_jobs_holds_go_once_it_is_no_longer_retained(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    retained = Retained()

    async def main() -> None:
        async with local(tmp_path, retained, clock) as (assets, staging, _):
            asset = await add(assets, b"held bytes")
            await AssetInputs(assets, staging).resolve(load_image(ref(asset.id)), "job-5")
            assert await assets.release_ended() == 0  # too fresh to ask after
            clock.now += assets.hold_grace_s + 1
            retained.jobs.add("job-5")
            assert await assets.release_ended() == 0  # its job is kept
            assert assets.store.holders(asset.id) == ["job-5"]
            retained.jobs.clear()
            assert await assets.release_ended() == 1
            assert assets.store.holders(asset.id) == []

    run(main)


def test_discard_undoes_a_resolution_whose_submission_was_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with local(tmp_path, Retained()) as (assets, staging, input_dir):
            asset = await add(assets, b"bytes")
            inputs = AssetInputs(assets, staging)
            await inputs.resolve(load_image(ref(asset.id)), "job-6")
            assert (input_dir / ".comfy-sidecar" / "job-6-media").is_dir()
            await inputs.discard("job-6")
            assert not (input_dir / ".comfy-sidecar" / "job-6-media").exists()
            assert assets.store.holders(asset.id) == []

    run(main)


# --- shared (JOB_QUEUE_URL) -----------------------------------------------------------------


def test_shared_a_media_input_gets_a_data_url_of_the_inline_bytes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)

    async def main() -> None:
        async with shared(tmp_path, redis_server.url, Retained()) as assets:
            asset = await add(assets, data)
            resolved = await AssetInputs(assets, InlineStaging()).resolve(
                load_image(ref(asset.id)), "job-7"
            )
            value = resolved["1"]["inputs"]["image"]
            head, _, payload = value.partition(",")
            assert head == "data:image/png;base64"
            assert base64.b64decode(payload) == data

    run(main)


def test_shared_a_reference_no_replica_could_read_is_missing_asset(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def main() -> None:
        async with shared(tmp_path, redis_server.url, Retained()) as assets:
            asset = await add(assets, b"model bytes", "model.safetensors")
            workflow = {
                "1": {
                    "class_type": "CheckpointLoaderSimple",
                    "inputs": {"ckpt_name": ref(asset.id)},
                }
            }
            with pytest.raises(MissingAsset) as caught:
                await AssetInputs(assets, InlineStaging()).resolve(workflow, "job-8")
            assert caught.value.location == "workflow.1.inputs.ckpt_name"
            assert "media input" in caught.value.message
            held = await assets.redis.smembers("comfy-sidecar:asset:held:job-8")
            assert held == set()  # released on the way out

    run(main)


def test_shared_holds_keep_the_bytes_of_a_deleted_asset_until_the_job_goes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    clock = Clock(2_000_000_000.0)
    retained = Retained()
    data = b"\x89PNG\r\n\x1a\n held"

    async def main() -> None:
        async with shared(tmp_path, redis_server.url, retained, clock) as assets:
            asset = await add(assets, data)
            await AssetInputs(assets, InlineStaging()).resolve(load_image(ref(asset.id)), "job-9")
            await assets.delete(asset.id)
            assert await assets.has_hash(asset.hash)  # held by job-9
            clock.now += assets.hold_grace_s + 1
            assert await assets.release_ended() == 1  # job-9 is not retained
            assert not await assets.has_hash(asset.hash)
            assert int(await assets.redis.get("comfy-sidecar:asset:inline-bytes")) == 0

    run(main)
