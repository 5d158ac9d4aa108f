"""The dispatcher: slots per instance, fewest jobs first, round robin, FIFO, waiting on restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from comfy_sidecar.comfy.dispatch import Dispatcher
from comfy_sidecar.errors import Unavailable


async def settle(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds (at most 100 loop turns)."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


@dataclass
class Inst:
    name: str
    accepting: bool = True


def test_fewest_jobs_first_with_round_robin_ties() -> None:
    async def main() -> None:
        a, b = Inst("0"), Inst("1")
        d = Dispatcher([a, b], per_instance=2)
        got = [(await d.acquire()).name for _ in range(4)]
        assert got == ["0", "1", "0", "1"]
        assert d.running == 4 and d.free_slots() == 0
        d.release(a)
        assert (await d.acquire()).name == "0"

    asyncio.run(main())


def test_jobs_wait_in_order_while_no_instance_accepts() -> None:
    async def main() -> None:
        a = Inst("0", accepting=False)
        d = Dispatcher([a], per_instance=1)
        order: list[int] = []

        async def job(n: int) -> None:
            inst = await d.acquire()
            order.append(n)
            d.release(inst)

        tasks = [asyncio.ensure_future(job(n)) for n in range(3)]
        await settle(lambda: d.waiting == 3)
        assert order == []  # nobody refused, nobody run
        a.accepting = True
        d.poke()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert order == [0, 1, 2]
        assert d.running == 0

    asyncio.run(main())


def test_a_cancelled_wait_gives_up_nothing() -> None:
    async def main() -> None:
        a = Inst("0")
        d = Dispatcher([a], per_instance=1)
        held = await d.acquire()
        waiting = asyncio.ensure_future(d.acquire())
        await settle(lambda: d.waiting == 1)
        waiting.cancel()
        d.release(held)  # the slot is handed to the cancelled waiter, which gives it back
        await asyncio.gather(waiting, return_exceptions=True)
        assert d.running == 0 and d.waiting == 0
        assert (await d.acquire()).name == "0"

    asyncio.run(main())


def test_an_instance_that_stops_accepting_gets_no_new_jobs() -> None:
    async def main() -> None:
        a, b = Inst("0"), Inst("1")
        d = Dispatcher([a, b], per_instance=2)
        a.accepting = False
        got = [(await d.acquire()).name for _ in range(2)]
        assert got == ["1", "1"]
        pending = asyncio.ensure_future(d.acquire())
        await asyncio.sleep(0)
        assert not pending.done()
        a.accepting = True
        d.poke()
        assert (await asyncio.wait_for(pending, 5)).name == "0"

    asyncio.run(main())


def test_close_fails_waiting_and_later_jobs_503() -> None:
    """A sidecar that stops for good (its only instance gave up) answers its waiting jobs
    Unavailable at once instead of leaving them to the HTTP server's shutdown."""

    async def main() -> None:
        d = Dispatcher([Inst("0", accepting=False)], per_instance=1)
        waiting = [asyncio.ensure_future(d.acquire()) for _ in range(2)]
        await settle(lambda: d.waiting == 2)
        d.close("ComfyUI is not ready (failed: giving up)")
        for task in waiting:
            with pytest.raises(Unavailable, match="giving up"):
                await asyncio.wait_for(task, 5)
        with pytest.raises(Unavailable):
            await d.acquire()

    asyncio.run(main())


def test_oldest_wait_is_the_age_of_the_first_job_still_waiting() -> None:
    async def main() -> None:
        now = [100.0]
        a = Inst("0", accepting=False)
        d = Dispatcher([a], per_instance=1, clock=lambda: now[0])
        assert d.oldest_wait_s == 0.0
        first = asyncio.ensure_future(d.acquire())
        await settle(lambda: d.waiting == 1)
        now[0] = 130.0
        second = asyncio.ensure_future(d.acquire())
        await settle(lambda: d.waiting == 2)
        now[0] = 145.0
        assert d.oldest_wait_s == 45.0  # the first one, 100 -> 145
        a.accepting = True
        d.poke()  # the first takes the only slot; the second (since 130) is now the oldest
        assert (await first) is a
        assert d.oldest_wait_s == 15.0
        d.release(a)
        assert (await second) is a
        assert d.oldest_wait_s == 0.0 and d.waiting == 0

    asyncio.run(main())


def test_a_higher_priority_gets_the_next_slot_fifo_within_a_priority() -> None:
    """An API key's priority: with the only slot held, three jobs of priority 0, one of 5
    and one of 10 wait; slots go to 10, then 5, then the priority-0 ones in arrival order. A
    later priority-0 job goes behind them all, and the oldest wait is still the oldest job's."""

    async def main() -> None:
        now = [0.0]
        a = Inst("0")
        d = Dispatcher([a], per_instance=1, clock=lambda: now[0])
        held = await d.acquire()
        order: list[str] = []

        async def job(name: str, priority: int) -> None:
            inst = await d.acquire(priority)
            order.append(name)
            d.release(inst)

        tasks = []
        for name, priority in (("low1", 0), ("low2", 0), ("mid", 5), ("low3", 0), ("high", 10)):
            tasks.append(asyncio.ensure_future(job(name, priority)))
            count = len(tasks)
            await settle(lambda: d.waiting == count)  # noqa: B023 (awaited at once)
            now[0] += 1
        assert d.oldest_wait_s == 5.0  # low1, waiting since 0
        d.release(held)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert order == ["high", "mid", "low1", "low2", "low3"]
        assert d.running == 0 and d.waiting == 0

    asyncio.run(main())
