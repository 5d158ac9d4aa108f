"""``Idempotency-Key`` for the Comfy API v2 (``POST /api/v2/assets``, ``POST /api/v2/jobs``):
each key is **single-use** for :data:`KEY_TTL_S` (24 h) per kind of request; a reuse is refused
with 422 ``idempotency_key_reuse``, never replayed. That is the v2 contract as comfy-sdk reads
it (``comfy_sdk/client.py`` ``submit``: "a reused key is *rejected*, not replayed";
``comfy_sdk/_errors.py``): after an ambiguous failure a client looks for what the first attempt
made instead of sending it again.

A key is claimed when the request starts (a second request with the same key while the first
still runs is refused too) and freed again when the request fails, whatever the failure (a
caller's mistake, a client gone mid-upload, a full disk): only a request that succeeded uses
its key up, so a client that retries after an error the server answered is not locked out
("a failure the server never saw leaves the key unclaimed", comfy-sdk).

Where keys are kept is chosen once, with the job backend (:mod:`comfy_sidecar.runtime.container`):
:class:`LocalIdempotencyKeys` in this process, or :class:`RedisIdempotencyKeys` (``JOB_QUEUE_URL``:
``SET NX EX``, so every replica refuses a key any replica used). Routes use
:func:`single_use` and never ask which::

    key = idempotency_key(request.headers)          # None when the header is absent
    async with single_use(idempotency, "jobs", key):
        ...                                          # raises: the key is free again
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol, runtime_checkable

from comfy_sidecar.errors import IdempotencyKeyReuse, InputError, Unavailable

log = logging.getLogger("comfy_sidecar.app")

__all__ = [
    "HEADER",
    "KEY_TTL_S",
    "IdempotencyKeys",
    "LocalIdempotencyKeys",
    "RedisIdempotencyKeys",
    "idempotency_key",
    "single_use",
]

#: The request header.
HEADER = "Idempotency-Key"
#: How long a used key stays used, in seconds (24 h).
KEY_TTL_S = 24 * 3600.0
#: Longest key (comfy-sdk's ``validate_idempotency_key``: the contract caps it at 255).
MAX_KEY_LENGTH = 255


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The request's ``Idempotency-Key``, or None when it has none. Raises
    :class:`~comfy_sidecar.errors.InputError` at ``Idempotency-Key`` for an empty one, one
    longer than 255 characters, or one that is not printable ASCII (what comfy-sdk refuses
    to send)."""
    value = headers.get(HEADER.lower())
    if value is None:
        return None
    if (
        not value
        or len(value) > MAX_KEY_LENGTH
        or not value.isascii()
        or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)
    ):
        raise InputError(
            f"expected 1 to {MAX_KEY_LENGTH} printable ASCII characters", location=HEADER
        )
    return value


@runtime_checkable
class IdempotencyKeys(Protocol):
    """Where used keys are kept. ``scope`` keeps kinds of requests apart (``assets``,
    ``jobs``); ``token`` is the claimer's own, so only it frees its claim."""

    async def claim(self, scope: str, key: str, token: str) -> bool:
        """Mark ``key`` used for :data:`KEY_TTL_S` seconds; False when it already is."""
        ...

    async def free(self, scope: str, key: str, token: str) -> None:
        """Undo :meth:`claim` (``token``'s claim only; a later claimer's stays)."""
        ...


@asynccontextmanager
async def single_use(keys: IdempotencyKeys, scope: str, key: str | None) -> AsyncIterator[None]:
    """Run the block under ``key`` (nothing to do for None): raises
    :class:`~comfy_sidecar.errors.IdempotencyKeyReuse` (422 ``idempotency_key_reuse``) when
    the key was used in the last 24 h or is in use now; frees it again when the block raises
    (cancellation included); keeps it used when the block ends normally."""
    if key is None:
        yield
        return
    token = uuid.uuid4().hex
    if not await keys.claim(scope, key, token):
        raise IdempotencyKeyReuse(
            f"this {HEADER} was already used (keys are single-use for 24 hours): "
            "look for what the first request made instead of sending it again",
            HEADER,
        )
    try:
        yield
    except BaseException:
        await asyncio.shield(keys.free(scope, key, token))
        raise


class LocalIdempotencyKeys:
    """Keys kept in this process (in-process job backend). ``ttl_s`` seconds; ``clock`` in
    seconds (monotonic; tests move it). Expired keys are dropped as new ones come, so memory
    holds at most the keys of the last ``ttl_s``."""

    def __init__(
        self, ttl_s: float = KEY_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._keys: dict[tuple[str, str], tuple[float, str]] = {}  # in claim order

    async def claim(self, scope: str, key: str, token: str) -> bool:
        """See :meth:`IdempotencyKeys.claim`."""
        now = self._clock()
        self._expire(now)
        held = self._keys.get((scope, key))
        if held is not None and held[0] > now:
            return False
        self._keys[(scope, key)] = (now + self.ttl_s, token)
        return True

    async def free(self, scope: str, key: str, token: str) -> None:
        """See :meth:`IdempotencyKeys.free`."""
        held = self._keys.get((scope, key))
        if held is not None and held[1] == token:
            del self._keys[(scope, key)]

    def _expire(self, now: float) -> None:
        while self._keys:
            first = next(iter(self._keys))
            if self._keys[first][0] > now:
                return
            del self._keys[first]


#: KEYS the key; ARGV the token. Deletes the key when it holds this token.
_FREE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisIdempotencyKeys:
    """Keys kept in Redis (``JOB_QUEUE_URL``), shared by every replica: ``comfy-sidecar:
    idempotency:<scope>:<key>`` set with ``NX`` and a ``ttl_s`` expiry. ``redis`` is a
    ``redis.asyncio`` client (:func:`comfy_sidecar.net.redisconn.connect`); its errors
    pass through (the routes answer them 503)."""

    PREFIX = "comfy-sidecar:idempotency"

    def __init__(self, redis: Any, ttl_s: float = KEY_TTL_S) -> None:
        # redis is imported in queue mode only (about 7 MB of a sidecar's RSS otherwise)
        from redis.exceptions import RedisError

        self.redis = redis
        self.ttl_s = ttl_s
        self._free = redis.register_script(_FREE)
        self._errors: tuple[type[Exception], ...] = (RedisError, OSError)

    def _key(self, scope: str, key: str) -> str:
        return f"{self.PREFIX}:{scope}:{key}"

    async def claim(self, scope: str, key: str, token: str) -> bool:
        """See :meth:`IdempotencyKeys.claim`. Raises
        :class:`~comfy_sidecar.errors.Unavailable` (503) while Redis cannot be reached."""
        try:
            done = await self.redis.set(
                self._key(scope, key), token, nx=True, ex=max(1, int(self.ttl_s))
            )
        except self._errors as exc:
            raise Unavailable(f"the Idempotency-Key store (Redis) is unreachable: {exc}") from None
        return bool(done)

    async def free(self, scope: str, key: str, token: str) -> None:
        """See :meth:`IdempotencyKeys.free`. A Redis failure is logged, not raised (the
        request's own error is what its caller hears; the key then stays used)."""
        try:
            await self._free(keys=[self._key(scope, key)], args=[token])
        except self._errors as exc:
            log.warning("cannot free an Idempotency-Key after a failed request: %s", exc)
