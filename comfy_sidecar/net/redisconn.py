"""One way to open a Redis client (``JOB_QUEUE_URL``) for the shared services: the job queue
(:mod:`comfy_sidecar.jobs.redis.store`), the shared asset records
(:mod:`comfy_sidecar.assets.shared`) and the Idempotency-Key store; and one way to put a file
into a Redis string (:func:`write_file`) and read it back (:func:`read_range`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["connect", "read_range", "write_file"]


def connect(url: str) -> Any:
    """A ``redis.asyncio.Redis`` for ``url`` (``redis://`` or ``rediss://``), not connected
    yet: no socket timeout (blocking reads wait as long as they ask), 5 s to connect, a
    health check of pooled connections every 10 s, and a command that meets a closed
    connection (a Redis restart) retried on a new one, up to 3 times with backoff.

    Typed ``Any``: redis-py's reply types are unions over RESP2/RESP3 that every call
    narrows."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=None,
        socket_connect_timeout=5,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


async def write_file(client: Any, key: str, path: Path, ttl_s: int, chunk_bytes: int) -> None:
    """Stream the file ``path`` into the Redis string ``key`` through ``client`` (a
    ``redis.asyncio.Redis``), expiring in ``ttl_s`` seconds: ``SET`` of the first chunk, then
    ``APPEND`` of each next one, at most ``chunk_bytes`` bytes per round trip, read off the event
    loop (never whole in memory). An empty file makes an empty string. Raises what the client
    raises (``redis.exceptions.RedisError``) and ``OSError`` from reading ``path``."""
    with path.open("rb") as handle:
        first = True
        while True:
            chunk = await asyncio.to_thread(handle.read, chunk_bytes)
            if first:
                await client.set(key, chunk, ex=ttl_s)
                first = False
            elif chunk:
                await client.append(key, chunk)
            if len(chunk) < chunk_bytes:
                return


async def read_range(
    client: Any, key: str, first: int, last: int, chunk_bytes: int
) -> AsyncIterator[bytes]:
    """Bytes ``first``..``last`` (inclusive) of the Redis string ``key`` through ``client``,
    one ``GETRANGE`` of at most ``chunk_bytes`` bytes per chunk; stops early when the string
    is shorter. Raises what the client raises (``redis.exceptions.RedisError``)."""
    at = first
    while at <= last:
        chunk: bytes = await client.getrange(key, at, min(last, at + chunk_bytes - 1))
        if not chunk:
            return
        yield chunk
        at += len(chunk)
