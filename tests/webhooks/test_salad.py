"""Salad deletion cost against a fake IMDS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from comfy_sidecar.runtime.salad import DeletionCost
from tests.waiting import async_wait_for

from .conftest import Receiver, make_settings


async def settle(cost: DeletionCost, imds: Receiver, count: int, value: int) -> None:
    """Wait until the IMDS got ``count`` PUTs and the client saw ``value`` acknowledged."""
    await asyncio.to_thread(imds.wait_for, count)
    await async_wait_for(lambda: cost.sent == value, timeout=5, what=f"{value} acknowledged")


def test_only_changes_are_sent_and_zero_on_close(receiver: Any) -> None:
    imds: Receiver = receiver()
    settings = make_settings(SALAD_MACHINE_ID="m-1", SALAD_IMDS_URL=imds.url)

    async def go() -> None:
        cost = DeletionCost(settings)
        cost.start()
        cost.set(3)
        await settle(cost, imds, 1, 3)
        cost.set(3)
        cost.set(3)
        await asyncio.sleep(0.1)  # time to (wrongly) resend the unchanged value: nothing to poll
        cost.set(5)
        await settle(cost, imds, 2, 5)
        cost.set(5)
        await asyncio.sleep(0.1)  # as above
        await cost.close()
        cost.set(7)  # ignored after close

    asyncio.run(go())
    reqs = imds.snapshot()
    assert [q.json() for q in reqs] == [
        {"deletion_cost": 3},
        {"deletion_cost": 5},
        {"deletion_cost": 0},
    ]
    for q in reqs:
        assert (q.method, q.path) == ("PUT", "/v1/deletion-cost")
        assert q.headers["metadata"] == "true"
        assert q.headers["content-type"] == "application/json"


def test_bursts_coalesce_to_the_latest_value(receiver: Any) -> None:
    imds: Receiver = receiver(delay_s=0.2)
    settings = make_settings(SALAD_CONTAINER_GROUP_ID="cg", SALAD_IMDS_URL=imds.url)

    async def go() -> float:
        cost = DeletionCost(settings)
        cost.start()
        took = 0.0
        for depth in range(1, 11):
            t0 = time.monotonic()
            cost.set(depth)
            took += time.monotonic() - t0
            await asyncio.sleep(0.01)  # the burst: a new queue depth every 10 ms
        await asyncio.to_thread(
            imds.wait_until, lambda reqs: reqs[-1].json() == {"deletion_cost": 10}
        )
        await async_wait_for(lambda: cost.sent == 10, timeout=5, what="10 acknowledged")
        await cost.close()
        return took

    took = asyncio.run(go())
    assert took < 0.05  # set() never waited for the slow IMDS (0.2 s per PUT)
    values = [q.json()["deletion_cost"] for q in imds.snapshot()]
    assert len(values) < 10
    assert values[-2:] == [10, 0]
    assert values == [*sorted(values[:-1]), 0]


def test_unreachable_imds_never_blocks(refused_url: str) -> None:
    settings = make_settings(SALAD_MACHINE_ID="m", SALAD_IMDS_URL=refused_url)

    async def go() -> tuple[float, float]:
        cost = DeletionCost(settings, timeout_s=0.3, retry_base_s=0.05)
        cost.start()
        t0 = time.monotonic()
        for depth in range(100):
            cost.set(depth)
        set_time = time.monotonic() - t0
        await asyncio.sleep(0.2)  # the behaviour under test: close() while PUTs are retried
        t1 = time.monotonic()
        await cost.close()
        return set_time, time.monotonic() - t1

    set_time, close_time = asyncio.run(go())
    assert set_time < 0.05
    assert close_time < 1.0


def test_nothing_is_sent_off_salad(receiver: Any) -> None:
    imds: Receiver = receiver()
    settings = make_settings(SALAD_IMDS_URL=imds.url)

    async def go() -> None:
        cost = DeletionCost(settings)
        assert not cost.enabled
        cost.start()
        cost.set(4)
        await asyncio.sleep(0.1)  # time to (wrongly) send something: nothing to poll for
        await cost.close()

    asyncio.run(go())
    assert imds.snapshot() == []
