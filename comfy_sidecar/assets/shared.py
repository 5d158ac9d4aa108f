"""Assets shared by every replica (``JOB_QUEUE_URL``): records in Redis, bytes in Redis or in
an object store, so an asset uploaded to one replica is read, listed, deleted and fed to jobs
by any other.

**Where the bytes live**, per blob (one per blake3 hash), decided when it is first stored:

- **inline** in Redis when it is at most ``inline_max_bytes`` (ASSET_INLINE_MB) and the bytes
  kept inline stay within ``inline_total_bytes`` (ASSET_STORE_GB; 0 = no bound);
- else in the **object store** ``spill_prefix`` (ASSET_STORE_URL, or ``<JOB_OUTPUT_URL>/.assets``)
  as ``<prefix>/<hex><ext>``, uploaded through :mod:`comfy_sidecar.storage`;
- with no object store, a larger upload is refused while it streams
  (:class:`~comfy_sidecar.errors.PayloadTooLarge`, 413: :attr:`SharedAssets.max_upload_bytes`
  is ASSET_INLINE_MB then) and a full inline store answers
  :class:`~comfy_sidecar.storage.errors.DiskFullError` (507).

A job's asset becomes (:meth:`SharedAssets.job_input`) a ``data:`` URL of the inline bytes or
the object's URL: what the replica that claims the job writes or downloads in its
preprocessing, as for any ``/prompt`` media input. Content reads (``GET .../content``) stream
inline bytes from Redis (GETRANGE, 1 MiB a round trip) and objects through the download cache
(fetched once per replica, then served from disk with ``Range``).

**Keys** (``P`` = :data:`PREFIX`): ``P:rec:<id>`` (the asset, JSON), ``P:blob:<hex>`` (a hash:
``size``, ``content_type``, ``file_path``, ``url``: empty when inline), ``P:data:<hex>`` (inline
bytes), ``P:refs:<hex>`` (a set: ``a:<asset id>`` of each asset over the blob, ``j:<job id>``
of each job holding it), ``P:expiry`` (asset ids scored by ``expires_at`` in ms), ``P:holds``
(job ids scored by their first hold, ms), ``P:held:<job id>`` (the hashes a job holds) and
``P:inline-bytes`` (bytes kept inline). A blob goes when its ``refs`` empties: the last asset
deleted or expired and no job holding it. Each change is one Lua script (atomic, one round
trip). Objects in the object store are never deleted here (no backend deletes); a lifecycle
rule of the bucket does, and must keep them longer than ASSET_RETENTION_S plus JOB_RETENTION_S.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from redis.exceptions import RedisError

from comfy_sidecar.assets.hashing import format_hash, is_hash, parse_hash
from comfy_sidecar.assets.service import CHECK_INTERVAL_S, HOLD_GRACE_S, Content, IsRetained
from comfy_sidecar.assets.store import (
    DEFAULT_CONTENT_TYPE,
    Asset,
    AssetContent,
    Created,
    Received,
    check_expected,
    check_upload,
    discard,
    file_extension,
    guess_content_type,
    receive,
)
from comfy_sidecar.config import ConfigError
from comfy_sidecar.errors import AssetNotFound, BlobNotFound, Unavailable
from comfy_sidecar.net.redisconn import read_range, write_file
from comfy_sidecar.storage import netguard
from comfy_sidecar.storage.errors import BadRequestError, DiskFullError, NotFoundError

if TYPE_CHECKING:
    from comfy_sidecar.storage import Storage, UploadSpec

__all__ = ["PREFIX", "SharedAssets"]

log = logging.getLogger("comfy_sidecar.assets")

T = TypeVar("T")

PREFIX = "comfy-sidecar:asset"
#: Bytes per Redis round trip when inline bytes are written or read.
CHUNK = 1024 * 1024
#: Seconds a partly written inline blob may live (an upload that died midway).
PARTIAL_TTL_S = 3600
#: Most expired assets removed per sweep round trip.
SWEEP_BATCH = 500


def _key(*parts: str) -> str:
    return ":".join((PREFIX, *parts))


EXPIRY, HOLDS, INLINE_BYTES = _key("expiry"), _key("holds"), _key("inline-bytes")

# --- Lua ---------------------------------------------------------------------------------

#: The asset part of MINT and CREATE: KEYS[2] refs, KEYS[3] record, KEYS[4] expiry;
#: ARGV[1] id, ARGV[2] record JSON, ARGV[3] expiry in ms ('' = none).
_ADD_ASSET = """
redis.call('SET', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[2], 'a:' .. ARGV[1])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1]) end
"""

#: KEYS blob, refs, record, expiry; ARGV as :data:`_ADD_ASSET`. A new asset over a kept
#: blob: 1, or 0 when the blob is gone.
MINT = (
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
"""
    + _ADD_ASSET
    + """
return 1
"""
)

#: KEYS blob, refs, record, expiry, data, partial data, inline-bytes; ARGV as
#: :data:`_ADD_ASSET`, then ARGV[4] size, [5] content type, [6] file path, [7] url ('' =
#: inline: the bytes are in the partial key), [8] the inline bound (0 = none). Stores the
#: blob unless it is kept already, then the asset: 1 (new bytes), 0 (kept already: the
#: partial bytes are dropped), -1 (inline store full: nothing changed, partial dropped).
CREATE = (
    """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[6])
"""
    + _ADD_ASSET
    + """
  return 0
end
if ARGV[7] == '' then
  local size = tonumber(ARGV[4])
  local cap = tonumber(ARGV[8])
  local total = tonumber(redis.call('GET', KEYS[7]) or '0')
  if cap > 0 and total + size > cap then
    redis.call('DEL', KEYS[6])
    return -1
  end
  redis.call('RENAME', KEYS[6], KEYS[5])
  redis.call('PERSIST', KEYS[5])
  redis.call('INCRBY', KEYS[7], size)
end
redis.call('HSET', KEYS[1], 'size', ARGV[4], 'content_type', ARGV[5], 'file_path', ARGV[6],
           'url', ARGV[7])
"""
    + _ADD_ASSET
    + """
return 1
"""
)

#: Removes the blob KEYS[4] (with its inline bytes KEYS[5], counted off KEYS[6]) when its refs
#: set KEYS[3] is empty.
_DROP_BLOB = """
if redis.call('SCARD', KEYS[3]) == 0 then
  local url = redis.call('HGET', KEYS[4], 'url')
  if url == '' then
    redis.call('DECRBY', KEYS[6], redis.call('STRLEN', KEYS[5]))
    redis.call('DEL', KEYS[5])
  end
  redis.call('DEL', KEYS[4])
end
"""

#: KEYS record, expiry, refs, blob, data, inline-bytes; ARGV id. Removes the asset (and its
#: blob when nothing else uses it): 1, or 0 when it was gone.
DROP = (
    """
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('SREM', KEYS[3], 'a:' .. ARGV[1])
"""
    + _DROP_BLOB
    + """
return 1
"""
)

#: KEYS record, refs, held, holds; ARGV owner, hex, now ms. 1 when the asset is kept (now
#: held by the owner), else 0.
HOLD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SADD', KEYS[2], 'j:' .. ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], 'NX', ARGV[3], ARGV[1])
return 1
"""

#: KEYS held, holds, inline-bytes; ARGV owner, key prefix. Drops every hold of the owner and
#: the blobs nothing else uses; returns how many blobs it held.
RELEASE = """
local hexes = redis.call('SMEMBERS', KEYS[1])
for _, hex in ipairs(hexes) do
  local refs = ARGV[2] .. ':refs:' .. hex
  redis.call('SREM', refs, 'j:' .. ARGV[1])
  if redis.call('SCARD', refs) == 0 then
    local blob = ARGV[2] .. ':blob:' .. hex
    local data = ARGV[2] .. ':data:' .. hex
    if redis.call('HGET', blob, 'url') == '' then
      redis.call('DECRBY', KEYS[3], redis.call('STRLEN', data))
      redis.call('DEL', data)
    end
    redis.call('DEL', blob)
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return #hexes
"""


class _Record(msgspec.Struct, kw_only=True):
    """``P:rec:<id>``: the asset and its blob's hash (hex)."""

    asset: Asset
    digest: str


class _Blob(msgspec.Struct, kw_only=True):
    """``P:blob:<hex>``, read back."""

    digest: str
    size: int
    content_type: str
    file_path: str | None
    url: str  # '' = inline


class _RedisContent:
    """An inline asset's bytes, read from Redis (a :class:`~comfy_sidecar.assets.service.Content`).
    A read meeting the bytes gone (the asset deleted meanwhile) ends early."""

    def __init__(self, asset: Asset, redis: Any, key: str, size: int) -> None:
        self.asset = asset
        self.size_bytes = size
        self._redis = redis
        self._key = key

    def chunks(self, first: int = 0, last: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``first``..``last`` (inclusive; None = to the end), :data:`CHUNK` per
        GETRANGE. Raises ValueError for a range outside the asset."""
        last = self.size_bytes - 1 if last is None else last
        if first < 0 or last >= self.size_bytes or first > last + 1:
            raise ValueError(f"range {first}-{last} is outside 0-{self.size_bytes - 1}")
        return read_range(self._redis, self._key, first, last, CHUNK)

    def close(self) -> None:
        """Nothing to release."""


def _unreachable(exc: BaseException) -> Unavailable:
    return Unavailable(f"the shared asset store (Redis) is unreachable: {exc}")


class SharedAssets:
    """:class:`~comfy_sidecar.assets.service.AssetService` in Redis (see the module docstring).

    ``redis``: a ``redis.asyncio`` client (:func:`comfy_sidecar.net.redisconn.connect`).
    ``tmp_dir``: where uploads are received (ASSET_DIR/tmp). ``storage``, ``spill`` and
    ``spill_prefix``: the object store's upload spec (``storage.upload_spec(prefix)``) and its
    URL prefix, None for inline only.
    ``inline_max_bytes`` / ``inline_total_bytes`` / ``max_upload_bytes``: ASSET_INLINE_MB,
    ASSET_STORE_GB (0 = no bound) and ASSET_MAX_UPLOAD_MB in bytes. ``retention_s``:
    ASSET_RETENTION_S. ``is_retained``, ``hold_grace_s``, ``check_interval_s``: as for
    :class:`~comfy_sidecar.assets.service.LocalAssets`; the same interval sweeps expired
    assets. ``clock``: unix seconds."""

    def __init__(
        self,
        redis: Any,
        tmp_dir: str | Path,
        *,
        storage: Storage,
        spill: UploadSpec | None,
        spill_prefix: str | None = None,
        inline_max_bytes: int,
        inline_total_bytes: int,
        max_upload_bytes: int,
        retention_s: float,
        is_retained: IsRetained,
        hold_grace_s: float = HOLD_GRACE_S,
        check_interval_s: float = CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.tmp_dir = Path(tmp_dir)
        self.storage = storage
        self.spill = spill
        self.spill_prefix = spill_prefix
        self.inline_max_bytes = inline_max_bytes
        self.inline_total_bytes = inline_total_bytes
        self._max_upload = (
            max_upload_bytes if spill is not None else min(max_upload_bytes, inline_max_bytes)
        )
        self.retention_s = retention_s
        self._is_retained = is_retained
        self.hold_grace_s = hold_grace_s
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._mint = redis.register_script(MINT)
        self._create = redis.register_script(CREATE)
        self._drop = redis.register_script(DROP)
        self._hold = redis.register_script(HOLD)
        self._release = redis.register_script(RELEASE)
        #: One publication per hash at a time in this process (an upload to the same URL
        #: would abort the one before it): the lock and how many wait on it.
        self._publishing: dict[str, tuple[asyncio.Lock, int]] = {}
        self._start: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def max_upload_bytes(self) -> int:
        """ASSET_MAX_UPLOAD_MB in bytes; without an object store, at most ASSET_INLINE_MB."""
        return self._max_upload

    # --- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Make ``tmp_dir`` (emptied) and start the sweep (once; later calls wait). Raises
        :class:`~comfy_sidecar.config.ConfigError` when the SSRF guard refuses
        ``spill_prefix`` (a job's input is downloaded from there as a caller's URL is)."""
        if self._start is None:
            self._start = asyncio.ensure_future(self._begin())
        await asyncio.shield(self._start)

    async def _begin(self) -> None:
        def prepare() -> None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            for child in self.tmp_dir.iterdir():
                if child.name.startswith(".partial-"):
                    child.unlink(missing_ok=True)

        if self.spill_prefix is not None:
            try:
                await self.storage.check_url(f"{self.spill_prefix}/_")
            except BadRequestError as exc:
                raise ConfigError(
                    f"ASSET_STORE_URL: {exc} (the replicas download jobs' assets from it as "
                    "they download a caller's URL: list its host in ALLOWED_URL_HOSTS)"
                ) from None
        await asyncio.to_thread(prepare)
        self._task = asyncio.create_task(self._loop(), name="shared-assets")

    async def close(self) -> None:
        """Stop the sweep and close the Redis connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()

    # --- uploads -----------------------------------------------------------------------------

    async def receive(self, chunks: AsyncIterable[bytes]) -> Received:
        """See :meth:`AssetService.receive`."""
        await self.start()
        return await receive(chunks, self.tmp_dir, max_bytes=self._max_upload)

    async def discard(self, received: Received) -> None:
        """See :meth:`AssetService.discard`."""
        await discard(received)

    async def add(
        self,
        received: Received,
        *,
        file_path: str | None,
        content_type: str | None,
        expected_hash: str | None,
        tags: Sequence[str],
    ) -> Created:
        """See :meth:`AssetService.add`: a dedup hit mints over the kept blob; new bytes go
        inline or to the object store (one upload at a time per hash in this process)."""
        try:
            file_path, checked_type, expected, checked_tags = check_upload(
                file_path, content_type, expected_hash, tags
            )
            check_expected(received, expected)
            return await self._add(received, file_path, checked_type, checked_tags)
        finally:
            await discard(received)

    async def _add(
        self, received: Received, file_path: str | None, content_type: str, tags: tuple[str, ...]
    ) -> Created:
        digest = received.digest
        lock, users = self._publishing.get(digest, (asyncio.Lock(), 0))
        self._publishing[digest] = (lock, users + 1)
        try:
            async with lock:
                asset = self._new_asset(digest, received.size, content_type, file_path, tags)
                if await self._guarded(self._mint_over(asset, digest)):
                    return Created(asset, False)
                return await self._publish(received, asset)
        finally:
            lock, users = self._publishing[digest]
            if users == 1:
                del self._publishing[digest]
            else:
                self._publishing[digest] = (lock, users - 1)

    async def _publish(self, received: Received, asset: Asset) -> Created:
        digest, size = received.digest, received.size
        partial = _key("partial", digest, uuid.uuid4().hex)
        url = ""
        inline = size <= self.inline_max_bytes
        if inline:
            await self._guarded(self._write_inline(partial, received.path))
        elif self.spill is not None:
            url = await self._upload(received, asset)
        else:  # receive() bounds uploads by the inline limit then
            raise DiskFullError("the upload is larger than ASSET_INLINE_MB allows")
        result = await self._guarded(self._create_blob(asset, digest, size, url, partial))
        if result == -1:  # the inline bytes are full: the object store, if any
            if self.spill is None:
                raise DiskFullError(
                    "the shared asset store is full (ASSET_STORE_GB of assets kept in Redis)"
                )
            url = await self._upload(received, asset)
            result = await self._guarded(self._create_blob(asset, digest, size, url, partial))
        return Created(asset, result == 1)

    async def _upload(self, received: Received, asset: Asset) -> str:
        assert self.spill is not None
        name = received.digest + file_extension(asset.file_path, asset.content_type).lower()
        with netguard.trusted():  # the operator's own store
            return await self.storage.upload(received.path, self.spill, name)

    async def _write_inline(self, key: str, path: Path) -> None:
        """Stream ``path`` into the string ``key`` (expiring in :data:`PARTIAL_TTL_S` unless
        :data:`CREATE` adopts it), :data:`CHUNK` bytes a round trip."""
        await write_file(self.redis, key, path, PARTIAL_TTL_S, CHUNK)

    async def _create_blob(
        self, asset: Asset, digest: str, size: int, url: str, partial: str
    ) -> int:
        keys = self._asset_keys(asset.id, digest)
        keys += [_key("data", digest), partial, INLINE_BYTES]
        args = self._asset_args(asset, digest)
        args += [size, asset.content_type, asset.file_path or "", url, self.inline_total_bytes]
        return int(await self._create(keys=keys, args=args))

    async def _mint_over(self, asset: Asset, digest: str) -> bool:
        return bool(
            await self._mint(
                keys=self._asset_keys(asset.id, digest), args=self._asset_args(asset, digest)
            )
        )

    def _asset_keys(self, asset_id: str, digest: str) -> list[str]:
        return [_key("blob", digest), _key("refs", digest), _key("rec", asset_id), EXPIRY]

    @staticmethod
    def _asset_args(asset: Asset, digest: str) -> list[Any]:
        record = msgspec.json.encode(_Record(asset=asset, digest=digest))
        expires = "" if asset.expires_at is None else int(asset.expires_at.timestamp() * 1000)
        return [asset.id, record, expires]

    def _new_asset(
        self,
        digest: str,
        size: int,
        content_type: str,
        file_path: str | None,
        tags: tuple[str, ...],
    ) -> Asset:
        expires = None
        if self.retention_s > 0:
            expires = datetime.fromtimestamp(self._clock() + self.retention_s, UTC)
        return Asset(
            id=str(uuid.uuid4()),
            hash=format_hash(digest),
            size_bytes=size,
            content_type=content_type,
            file_path=file_path,
            created_at=datetime.now(UTC),
            expires_at=expires,
            tags=tags,
        )

    async def from_hash(self, hash_: str, *, file_path: str | None, tags: Sequence[str]) -> Created:
        """See :meth:`AssetService.from_hash` (the content type and default ``file_path`` are
        the bytes' first ones, as in :meth:`AssetStore.from_hash
        <comfy_sidecar.assets.store.AssetStore.from_hash>`)."""
        digest = parse_hash(hash_, "hash")
        file_path, _, _, checked_tags = check_upload(file_path, None, None, tags)
        await self.start()
        blob = await self._guarded(self._blob(digest))
        if blob is not None:
            content_type = blob.content_type
            if file_path is not None and content_type == DEFAULT_CONTENT_TYPE:
                content_type = guess_content_type(file_path)
            asset = self._new_asset(
                digest,
                blob.size,
                content_type,
                file_path if file_path is not None else blob.file_path,
                checked_tags,
            )
            if await self._guarded(self._mint_over(asset, digest)):
                return Created(asset, False)
        raise BlobNotFound(f"no bytes with hash {format_hash(digest)}", location="hash")

    # --- reads ----------------------------------------------------------------------------------

    async def has_hash(self, hash_: str) -> bool:
        """See :meth:`AssetService.has_hash`."""
        digest = is_hash(hash_)
        if digest is None:
            return False
        return bool(await self._guarded(self.redis.exists(_key("blob", digest))))

    async def get(self, asset_id: str) -> Asset:
        """See :meth:`AssetService.get`."""
        return (await self._record(asset_id)).asset

    async def open(self, asset_id: str) -> Content:
        """See :meth:`AssetService.open`: inline bytes from Redis, an object through the
        download cache (fetched once per replica; AssetNotFound when the store lost it, a
        :class:`~comfy_sidecar.storage.errors.StorageError` when it cannot be read)."""
        record = await self._record(asset_id)
        blob = await self._guarded(self._blob(record.digest))
        if blob is None:
            raise AssetNotFound(f"the bytes of asset {asset_id!r} are gone", location="id")
        if not blob.url:
            return _RedisContent(record.asset, self.redis, _key("data", blob.digest), blob.size)
        try:
            with netguard.trusted():
                path = await self.storage.fetch(blob.url, None)
        except NotFoundError:  # the object store lost it (a lifecycle rule too short)
            raise AssetNotFound(
                f"the bytes of asset {asset_id!r} are gone", location="id"
            ) from None
        handle = await asyncio.to_thread(open, path, "rb", buffering=0)
        return AssetContent(record.asset, handle, os.fstat(handle.fileno()).st_size)

    async def delete(self, asset_id: str) -> None:
        """See :meth:`AssetService.delete`."""
        record = await self._record(asset_id)
        await self._guarded(self._drop_asset(asset_id, record.digest))

    async def _drop_asset(self, asset_id: str, digest: str) -> int:
        keys = [
            _key("rec", asset_id),
            EXPIRY,
            _key("refs", digest),
            _key("blob", digest),
            _key("data", digest),
            INLINE_BYTES,
        ]
        return int(await self._drop(keys=keys, args=[asset_id]))

    # --- jobs --------------------------------------------------------------------------------

    async def hold(self, asset_id: str, owner: str) -> Asset:
        """See :meth:`AssetService.hold`."""
        record = await self._record(asset_id)
        keys = [_key("rec", asset_id), _key("refs", record.digest), _key("held", owner), HOLDS]
        now_ms = int(self._clock() * 1000)
        if not await self._guarded(self._hold(keys=keys, args=[owner, record.digest, now_ms])):
            raise AssetNotFound(f"no asset with id {asset_id!r}", location="id")
        return record.asset

    async def release(self, owner: str) -> None:
        """See :meth:`AssetService.release`."""
        await self._guarded(
            self._release(keys=[_key("held", owner), HOLDS, INLINE_BYTES], args=[owner, PREFIX])
        )

    async def job_input(self, asset: Asset, folder: str) -> str:
        """A ``data:<content type>;base64,...`` URL of inline bytes, or the object's URL:
        what the claiming replica's preprocessing writes or downloads into its INPUT_DIR
        (``folder`` is not used: nothing is written here). Raises AssetNotFound when the
        bytes are gone."""
        digest = is_hash(asset.hash)
        blob = None if digest is None else await self._guarded(self._blob(digest))
        if blob is not None and blob.url:
            return blob.url
        data: bytes | None = None
        if blob is not None:
            data = await self._guarded(self.redis.get(_key("data", blob.digest)))
        if data is None:
            raise AssetNotFound(f"the bytes of asset {asset.id!r} are gone", location="id")
        mime = asset.content_type.split(";")[0].strip() or DEFAULT_CONTENT_TYPE
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

    # --- background -----------------------------------------------------------------------

    async def sweep(self) -> int:
        """Remove the assets past their ``expires_at`` (and blobs nothing uses any more);
        returns how many."""
        now_ms = int(self._clock() * 1000)
        ids = await self._guarded(
            self.redis.zrangebyscore(EXPIRY, "-inf", now_ms, start=0, num=SWEEP_BATCH)
        )
        removed = 0
        for raw in ids:
            asset_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            record = await self._guarded(self._load(asset_id))
            if record is None:
                await self._guarded(self.redis.zrem(EXPIRY, asset_id))
                continue
            removed += await self._guarded(self._drop_asset(asset_id, record.digest))
        return removed

    async def release_ended(self) -> int:
        """Release the holds of jobs no longer retained, held longer than ``hold_grace_s``;
        returns how many jobs'."""
        due_ms = int((self._clock() - self.hold_grace_s) * 1000)
        owners = await self._guarded(self.redis.zrangebyscore(HOLDS, "-inf", due_ms))
        released = 0
        for raw in owners:
            owner = raw.decode() if isinstance(raw, bytes) else str(raw)
            if not await self._is_retained(owner):
                await self.release(owner)
                released += 1
        return released

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            try:
                await self.sweep()
                await self.release_ended()
            except Exception:
                log.exception("sweeping the shared assets failed")

    # --- internals -------------------------------------------------------------------------

    async def _guarded(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except (RedisError, OSError) as exc:
            raise _unreachable(exc) from None

    async def _load(self, asset_id: str) -> _Record | None:
        raw = await self.redis.get(_key("rec", asset_id))
        if raw is None:
            return None
        return msgspec.json.decode(raw, type=_Record)

    async def _record(self, asset_id: str) -> _Record:
        """The kept, unexpired record. Raises AssetNotFound."""
        await self.start()
        record = await self._guarded(self._load(asset_id))
        expires = None if record is None else record.asset.expires_at
        if record is None or (expires is not None and expires.timestamp() <= self._clock()):
            raise AssetNotFound(f"no asset with id {asset_id!r}", location="id")
        return record

    async def _blob(self, digest: str) -> _Blob | None:
        fields = await self.redis.hgetall(_key("blob", digest))
        if not fields:
            return None

        def text(name: bytes) -> str:
            value = fields.get(name, b"")
            return value.decode() if isinstance(value, bytes) else str(value)

        return _Blob(
            digest=digest,
            size=int(text(b"size") or 0),
            content_type=text(b"content_type") or DEFAULT_CONTENT_TYPE,
            file_path=text(b"file_path") or None,
            url=text(b"url"),
        )
