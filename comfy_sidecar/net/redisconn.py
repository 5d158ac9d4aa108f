"""One way to open a Redis client (``JOB_QUEUE_URL``) for the shared services: the job queue
(:mod:`comfy_sidecar.jobs.redis.store`), the shared asset records
(:mod:`comfy_sidecar.assets.shared`) and the Idempotency-Key store."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["connect"]


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
