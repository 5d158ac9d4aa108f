"""The single-use ``Idempotency-Key`` store (:mod:`comfy_sidecar.http.idempotency`): a key is
used once per scope for 24 h, freed again when its request fails, and only by its own claim;
in-process and on a real redis-server (what every replica shares)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from comfy_sidecar.errors import IdempotencyKeyReuse
from comfy_sidecar.http.idempotency import (
    KEY_TTL_S,
    IdempotencyKeys,
    LocalIdempotencyKeys,
    RedisIdempotencyKeys,
    single_use,
)
from comfy_sidecar.net.redisconn import connect
from tests.assets.support import Clock
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, used by name


async def behaves_single_use(keys: IdempotencyKeys, other: IdempotencyKeys) -> None:
    with pytest.raises(ValueError):
        async with single_use(keys, "assets", "k1"):
            raise ValueError("the request failed")
    async with single_use(keys, "assets", "k1"):  # free again after the failure
        pass
    for store in (keys, other):
        with pytest.raises(IdempotencyKeyReuse) as caught:
            async with single_use(store, "assets", "k1"):
                pass
        assert caught.value.location == "Idempotency-Key"
    async with single_use(other, "jobs", "k1"):  # another scope
        pass
    async with single_use(keys, "assets", None):  # no key: nothing to check
        pass
    assert await keys.claim("assets", "k2", "mine")
    await other.free("assets", "k2", "someone else's")  # only the claimer frees it
    assert not await other.claim("assets", "k2", "again")


def test_local_keys_are_single_use_and_expire_after_a_day() -> None:
    clock = Clock(100.0)
    keys = LocalIdempotencyKeys(clock=clock)
    asyncio.run(behaves_single_use(keys, keys))
    clock.now += KEY_TTL_S + 1
    assert asyncio.run(keys.claim("assets", "k1", "later"))
    assert len(keys._keys) == 1  # the expired ones were dropped


def test_redis_keys_are_single_use_across_replicas(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def main() -> None:
        a, b = connect(redis_server.url), connect(redis_server.url)
        try:
            await behaves_single_use(RedisIdempotencyKeys(a), RedisIdempotencyKeys(b))
            ttl = await a.ttl("comfy-sidecar:idempotency:assets:k1")
            assert KEY_TTL_S - 60 < ttl <= KEY_TTL_S
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())
