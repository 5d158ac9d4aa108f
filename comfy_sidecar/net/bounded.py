"""Run I/O concurrently with a cap: the downloads of one prompt, the uploads of one result,
the model downloads of a manifest step."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


async def gather_bounded(work: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run every ``work()`` concurrently, at most ``limit`` at once; results in order.

    The first failure cancels the rest (and waits for them to stop) and is raised.
    """
    gate = asyncio.Semaphore(limit)

    async def bounded(step: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await step()

    tasks = [asyncio.ensure_future(bounded(step)) for step in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
