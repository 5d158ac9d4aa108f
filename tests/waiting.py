"""Wait for a condition with a deadline, instead of sleeping for a guessed time.

``wait_for(lambda: ..., what="the job is running")`` polls every ``interval`` seconds and
returns the first truthy value the predicate gives; after ``timeout`` seconds it raises
AssertionError naming ``what`` (and the last value seen). ``async_wait_for`` is the same inside
an event loop; its predicate may be a plain function or return an awaitable.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.01, what: str
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises AssertionError("timed out after <timeout> s waiting for <what> ...") at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(timeout, what, value))
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], Any | Awaitable[Any]],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a deadline for the polling, not for one await
    interval: float = 0.01,
    what: str,
) -> Any:
    """:func:`wait_for` for coroutines: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(timeout, what, value))
        await asyncio.sleep(interval)


def _timed_out(timeout: float, what: str, value: Any) -> str:
    return f"timed out after {timeout:g} s waiting for {what} (last: {value!r})"
