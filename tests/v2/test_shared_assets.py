"""The shared asset service (``JOB_QUEUE_URL``) on a real redis-server, two instances standing
for two replicas: records and dedup shared, bytes inline in Redis up to ASSET_INLINE_MB and
within ASSET_STORE_GB, larger ones in the object store (moto's S3 server), expiry, and Redis
going away answered as 503, never as a caller's mistake."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from comfy_sidecar.errors import AssetNotFound, PayloadTooLarge, Unavailable
from comfy_sidecar.schemas import S3Upload
from comfy_sidecar.storage.errors import DiskFullError
from tests.assets.support import Clock, chunks_of
from tests.redis_server import RedisServer, redis_server
from tests.storage.conftest import moto_server, s3_client, s3_env
from tests.v2.test_asset_refs import Retained, add, shared

__all__ = ["moto_server", "redis_server", "s3_client", "s3_env"]  # fixtures, used by name


async def read(assets: object, asset_id: str, first: int = 0, last: int | None = None) -> bytes:
    content = await assets.open(asset_id)  # type: ignore[attr-defined]
    return b"".join([chunk async for chunk in content.chunks(first, last)])


def test_an_asset_added_on_one_replica_is_deduped_read_and_deleted_on_another(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    data = os.urandom(2_500_000)  # more than one Redis round trip each way

    async def main() -> None:
        async with (
            shared(tmp_path, redis_server.url, Retained()) as a,
            shared(tmp_path, redis_server.url, Retained()) as b,
        ):
            first = await add(a, data)
            received = await b.receive(chunks_of(data))
            again = await b.add(
                received, file_path="again.png", content_type=None, expected_hash=None, tags=()
            )
            assert again.created_new is False and again.asset.hash == first.hash
            assert await b.has_hash(first.hash)
            assert (await b.get(first.id)).file_path == "photo.png"
            assert await read(b, first.id) == data
            assert await read(b, first.id, 1_000_000, 1_999_999) == data[1_000_000:2_000_000]
            minted = await b.from_hash(first.hash, file_path=None, tags=())
            assert minted.asset.file_path == "photo.png" and minted.created_new is False

            for asset_id in (first.id, again.asset.id):
                await b.delete(asset_id)
                with pytest.raises(AssetNotFound):
                    await a.get(asset_id)
            assert await a.has_hash(first.hash)  # the minted one still uses the bytes
            await a.delete(minted.asset.id)
            assert not await a.has_hash(first.hash)
            assert int(await a.redis.get("comfy-sidecar:asset:inline-bytes")) == 0
            assert not [p for p in tmp_path.rglob(".partial-*")]

    asyncio.run(main())


def test_without_an_object_store_the_inline_limits_bound_what_is_taken(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def main() -> None:
        async with shared(
            tmp_path,
            redis_server.url,
            Retained(),
            inline_max_bytes=100_000,
            inline_total_bytes=150_000,
        ) as assets:
            assert assets.max_upload_bytes == 100_000
            with pytest.raises(PayloadTooLarge):
                await assets.receive(chunks_of(os.urandom(100_001)))
            await add(assets, os.urandom(100_000))
            with pytest.raises(DiskFullError):  # ASSET_STORE_GB of inline bytes reached
                await add(assets, os.urandom(60_000))
            assert int(await assets.redis.get("comfy-sidecar:asset:inline-bytes")) == 100_000

    asyncio.run(main())


def test_bytes_over_the_inline_limit_go_to_the_object_store_and_read_back(
    tmp_path: Path,
    redis_server: RedisServer,
    s3_env: dict[str, str],
    s3_client: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    s3_client.create_bucket(Bucket="assets")  # type: ignore[attr-defined]
    small, big = os.urandom(1000), os.urandom(300_000)

    async def main() -> None:
        spill = S3Upload(bucket="assets", prefix="shared")
        async with (
            shared(
                tmp_path / "a", redis_server.url, Retained(), spill=spill, inline_max_bytes=50_000
            ) as a,
            shared(
                tmp_path / "b", redis_server.url, Retained(), spill=spill, inline_max_bytes=50_000
            ) as b,
        ):
            kept_small = await add(a, small)
            kept_big = await add(a, big, "clip.mp4")
            listed = s3_client.list_objects_v2(Bucket="assets")  # type: ignore[attr-defined]
            keys = [item["Key"] for item in listed.get("Contents", [])]
            assert keys == [f"shared/{kept_big.hash.partition(':')[2]}.mp4"]
            assert await read(b, kept_big.id) == big  # fetched from S3 by the other replica
            assert await read(b, kept_big.id, 5, 9) == big[5:10]
            assert await read(b, kept_small.id) == small
            value = await b.job_input(kept_big, "unused")
            assert value == f"s3://assets/{keys[0]}"

        # The bucket lost the object (a lifecycle rule shorter than the asset's life): a
        # replica that never read it answers that the asset is gone, not a caller's mistake.
        s3_client.delete_object(Bucket="assets", Key=keys[0])  # type: ignore[attr-defined]
        async with shared(tmp_path / "c", redis_server.url, Retained(), spill=spill) as c:
            with pytest.raises(AssetNotFound):
                await c.open(kept_big.id)

    asyncio.run(main())


def test_an_expired_asset_is_gone_at_once_and_swept_with_its_bytes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    clock = Clock(2_000_000_000.0)

    async def main() -> None:
        async with shared(tmp_path, redis_server.url, Retained(), clock, retention_s=60) as a:
            asset = await add(a, b"short-lived")
            assert asset.expires_at is not None
            clock.now += 61
            with pytest.raises(AssetNotFound):
                await a.get(asset.id)
            assert await a.has_hash(asset.hash)  # not swept yet
            assert await a.sweep() == 1
            assert not await a.has_hash(asset.hash)

    asyncio.run(main())


def test_redis_gone_is_unavailable_not_a_callers_mistake(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def main() -> None:
        async with shared(tmp_path, redis_server.url, Retained()) as a:
            asset = await add(a, b"bytes")
            redis_server.kill()
            with pytest.raises(Unavailable):
                await a.get(asset.id)
            with pytest.raises(Unavailable):
                await add(a, b"more bytes")
            assert not [p for p in tmp_path.rglob(".partial-*")]

    asyncio.run(main())


def test_an_object_store_the_ssrf_guard_refuses_stops_the_start(tmp_path: Path) -> None:
    """The replicas download a job's assets from ASSET_STORE_URL as they download a caller's
    URL: one the guard refuses would fail every such job, so the sidecar does not start."""
    from comfy_sidecar.assets.shared import SharedAssets
    from comfy_sidecar.config import ConfigError, load_settings
    from comfy_sidecar.net.redisconn import connect
    from comfy_sidecar.schemas import HTTPUpload
    from comfy_sidecar.storage import Storage

    async def main() -> None:
        settings = load_settings({"HOME": str(tmp_path), "ALLOWED_URL_HOSTS": ""})
        assets = SharedAssets(
            connect("redis://127.0.0.1:9/0"),  # never reached
            tmp_path / "tmp",
            storage=Storage(settings),
            spill=HTTPUpload(url_prefix="http://127.0.0.1:9/assets"),
            spill_prefix="http://127.0.0.1:9/assets",
            inline_max_bytes=1,
            inline_total_bytes=0,
            max_upload_bytes=10,
            retention_s=0,
            is_retained=Retained(),
        )
        with pytest.raises(ConfigError, match=r"ASSET_STORE_URL: .*ALLOWED_URL_HOSTS"):
            await assets.start()
        await assets.close()

    asyncio.run(main())
