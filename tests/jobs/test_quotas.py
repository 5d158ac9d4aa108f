"""Per-key quotas and priorities (issue 23, section 3), below the HTTP layer: the in-process
counters, and the Redis scripts on a real redis-server (two stores standing for two replicas):
an admission is atomic across replicas, a dead replica's places expire, a queued job's place
lasts until its end is written, and the shared queue hands out higher priorities first with
exact queue positions. The end-to-end tests are in test_quotas_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import pytest

from comfy_sidecar.config.keys import KeyPolicy
from comfy_sidecar.errors import RateLimited
from comfy_sidecar.jobs.model import JobStatus, JobView, iso, job_links, now_ms
from comfy_sidecar.jobs.quotas import NO_HOLD, LocalQuotas
from comfy_sidecar.jobs.redis.quotas import RedisQuotas
from comfy_sidecar.jobs.redis.store import RedisJobs
from tests.redis_server import RedisServer, redis_server
from tests.waiting import async_wait_for

__all__ = ["redis_server"]  # the fixture, used by name

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


# --- in-process ---------------------------------------------------------------------------------


def test_local_concurrency_is_held_from_admission_to_the_end() -> None:
    async def main() -> None:
        quotas = LocalQuotas()
        key = KeyPolicy(name="a", max_concurrent_jobs=2)
        first = await quotas.take(key, "1")
        second = await quotas.take(key, "2")
        with pytest.raises(RateLimited) as refused:
            await quotas.take(key, "3")
        body = refused.value.body()
        assert body["reason"] == "max_concurrent_jobs" and body["key"] == "a"
        assert body["limit"] == 2 and body["retry_after_s"] == 1
        first.started()  # running still counts
        with pytest.raises(RateLimited):
            await quotas.take(key, "3")
        first.release()
        first.release()  # idempotent: gives back one place, once
        await quotas.take(key, "3")
        with pytest.raises(RateLimited):
            await quotas.take(key, "4")
        second.release()
        assert quotas.active["a"] == 1
        # Another key, or a key without quotas, is not counted here.
        assert await quotas.take(KeyPolicy(name="b"), "5") is NO_HOLD
        await quotas.take(KeyPolicy(name="c", max_concurrent_jobs=1), "6")

    run(main())


def test_local_max_queue_counts_the_jobs_not_yet_running() -> None:
    async def main() -> None:
        quotas = LocalQuotas()
        key = KeyPolicy(name="q", max_queue=1)
        running = await quotas.take(key, "1")
        with pytest.raises(RateLimited, match="max_queue"):
            await quotas.take(key, "2")
        running.started()
        waiting = await quotas.take(key, "2")
        with pytest.raises(RateLimited, match="max_queue"):
            await quotas.take(key, "3")
        waiting.release()  # refused while preparing, cancelled before it ran: no longer waits
        await quotas.take(key, "3")

    run(main())


def test_local_jobs_per_minute_is_a_sliding_window() -> None:
    async def main() -> None:
        now = [1000.0]
        quotas = LocalQuotas(clock=lambda: now[0])
        key = KeyPolicy(name="m", jobs_per_minute=2, max_concurrent_jobs=5)
        await quotas.take(key, "1")
        now[0] += 20
        await quotas.take(key, "2")
        now[0] += 15
        with pytest.raises(RateLimited) as refused:
            await quotas.take(key, "3")
        body = refused.value.body()
        assert body["reason"] == "jobs_per_minute" and body["retry_after_s"] == 25  # 1060 - 1035
        assert quotas.active["m"] == 2, "a refusal takes nothing"
        now[0] = 1060.0  # the first admission left the window
        await quotas.take(key, "3")
        with pytest.raises(RateLimited):
            await quotas.take(key, "4")

    run(main())


# --- in Redis -----------------------------------------------------------------------------------

LEASE_S = 0.5


@contextlib.asynccontextmanager
async def two_stores(url: str) -> AsyncIterator[list[RedisJobs]]:
    """Two Redis job stores on one redis-server, as two replicas have."""
    made = [
        RedisJobs(url, name, retention_s=60, lease_s=LEASE_S, max_attempts=3)
        for name in ("replica-a", "replica-b")
    ]
    await made[0].ensure_group()
    try:
        yield made
    finally:
        for store in made:
            await store.close()


def with_stores(test: Callable[[list[RedisJobs]], Awaitable[None]], url: str) -> None:
    async def main() -> None:
        async with two_stores(url) as stores:
            await test(stores)

    asyncio.run(main())


def pending_view(job_id: str, owner: str | None = None) -> JobView:
    view = JobView(
        id=job_id,
        status=JobStatus.PENDING,
        endpoint="jobs",
        created_at=iso(now_ms()),
        urls=job_links(job_id),
    )
    if owner is not None:
        view.owner = owner
    return view


async def enqueue(store: RedisJobs, job_id: str, key: KeyPolicy | None = None) -> None:
    view = pending_view(job_id, None if key is None else key.name)
    _, created = await store.enqueue(
        view,
        b'{"prompt": {}}',
        job_id.encode(),
        None,
        None if key is None else msgspec.json.encode(key),
        0 if key is None else key.priority,
    )
    assert created


def test_an_admission_is_atomic_across_replicas(redis_server: RedisServer) -> None:
    """Twenty admissions at once through two replicas' connections: exactly three pass."""

    async def test(stores: list[RedisJobs]) -> None:
        replicas = [RedisQuotas(store) for store in stores]
        key = KeyPolicy(name="team-a", max_concurrent_jobs=3)
        outcomes = await asyncio.gather(
            *(replicas[n % 2].take(key, f"job-{n}", runs_here=False) for n in range(20)),
            return_exceptions=True,
        )
        admitted = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, RateLimited)]
        assert len(admitted) == 3 and len(refused) == 17, outcomes
        assert {r.reason for r in refused} == {"max_concurrent_jobs"}
        redis: Any = stores[0].redis
        assert await redis.zcard("comfy-sidecar:quota:team-a:active") == 3

    with_stores(test, redis_server.url)


def test_a_dead_replicas_places_expire_and_a_live_ones_are_renewed(
    redis_server: RedisServer,
) -> None:
    """A job running on a replica (a /prompt) holds its place while that replica renews it
    with its heartbeat; a replica that died (no renewal) loses it within three leases."""

    async def test(stores: list[RedisJobs]) -> None:
        alive, dead = RedisQuotas(stores[0]), RedisQuotas(stores[1])
        key = KeyPolicy(name="team-a", max_concurrent_jobs=2)
        await alive.take(key, "alive-job")
        await dead.take(key, "dead-job")
        with pytest.raises(RateLimited):
            await alive.take(key, "third")

        async def third_admitted() -> bool:
            await alive.refresh()  # the live replica's heartbeat
            try:
                await alive.take(key, "third")
            except RateLimited:
                return False
            return True

        await async_wait_for(
            third_admitted, timeout=10, interval=0.05, what="the dead replica's place to expire"
        )
        with pytest.raises(RateLimited):  # the live one's job still counts
            await alive.take(key, "fourth")

    with_stores(test, redis_server.url)


def test_a_queued_job_keeps_its_place_until_its_end_is_written(redis_server: RedisServer) -> None:
    """A job of the shared queue counts while it waits, however long (past its renewal time:
    its hash says it lives), and its place is given back by the replica that writes its end,
    which is not the one that admitted it."""

    async def test(stores: list[RedisJobs]) -> None:
        submitter, ender = stores
        quotas = RedisQuotas(submitter)
        key = KeyPolicy(name="team-q", max_concurrent_jobs=1, max_queue=1)
        await quotas.take(key, "queued", runs_here=False)
        await enqueue(submitter, "queued", key)
        redis: Any = submitter.redis
        # Three leases later its place is checked, and kept: the job still waits.
        active = "comfy-sidecar:quota:team-q:active"
        first_score = await redis.zscore(active, "job:queued")

        async def checked_and_renewed() -> bool:
            with pytest.raises(RateLimited):
                await quotas.take(key, "other", runs_here=False)
            return bool(await redis.zscore(active, "job:queued") > first_score)

        await async_wait_for(
            checked_and_renewed, timeout=10, interval=0.05, what="the queued job's place renewed"
        )
        assert await submitter.waiting() == 1
        # Another replica claims it (it no longer waits) and ends it.
        claim = await ender.claim()
        assert claim is not None and claim.job_id == "queued"
        await ender.begin_attempt("queued", "team-q")
        assert await redis.zcard("comfy-sidecar:quota:team-q:waiting") == 0
        ended = pending_view("queued", "team-q")
        ended.status = JobStatus.COMPLETED
        assert await ender.finish("queued", ended)
        await ender.ack(claim)
        await quotas.take(key, "next", runs_here=False)

    with_stores(test, redis_server.url)


def test_jobs_per_minute_in_redis_says_when_the_window_frees(redis_server: RedisServer) -> None:

    async def test(stores: list[RedisJobs]) -> None:
        quotas = [RedisQuotas(store) for store in stores]
        key = KeyPolicy(name="team-m", jobs_per_minute=2)
        first = await quotas[0].take(key, "1")
        first.release()  # ended at once: the minute still counts it
        await quotas[1].take(key, "2")
        with pytest.raises(RateLimited) as refused:
            await quotas[0].take(key, "3")
        assert refused.value.reason == "jobs_per_minute"
        assert 55 <= refused.value.retry_after_s <= 60

    with_stores(test, redis_server.url)


def test_the_shared_queue_hands_out_higher_priorities_first(redis_server: RedisServer) -> None:
    """Jobs of priorities 0, 10 and 5 in one shared queue: claims take 10, then 5, then 0,
    FIFO within each; positions and the waiting count are exact across the streams."""

    async def test(stores: list[RedisJobs]) -> None:
        a, b = stores
        low, mid, high = (KeyPolicy(name=n, priority=p) for n, p in (("l", 0), ("m", 5), ("h", 10)))
        for job_id, key in (
            ("low-1", low),
            ("high-1", high),
            ("low-2", None),  # no key: priority 0, behind low-1
            ("mid-1", mid),
            ("high-2", high),
        ):
            await enqueue(a, job_id, key)
        assert await b.waiting() == 5
        positions = {
            j: await b.position(j) for j in ("high-1", "high-2", "mid-1", "low-1", "low-2")
        }
        assert positions == {"high-1": 0, "high-2": 1, "mid-1": 2, "low-1": 3, "low-2": 4}
        order = []
        for store in (a, b, a, b, a):
            claim = await store.claim()
            assert claim is not None
            order.append(claim.job_id)
            assert await b.position(claim.job_id) is None
        assert order == ["high-1", "high-2", "mid-1", "low-1", "low-2"]
        assert await a.claim() is None and await a.waiting() == 0

    with_stores(test, redis_server.url)
