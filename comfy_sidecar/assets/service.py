"""The asset service the Comfy API v2 routes and the job submission use, whichever place keeps
the asset bytes. Chosen once at start-up with the job backend
(:mod:`comfy_sidecar.runtime.container`); routes never ask which:

- :class:`LocalAssets` (in-process): the :class:`~comfy_sidecar.assets.store.AssetStore` in
  ASSET_DIR (LRU-bounded by ASSET_STORE_GB); a job's asset is staged into ComfyUI's input
  directory as a hard link;
- :class:`~comfy_sidecar.assets.shared.SharedAssets` (``JOB_QUEUE_URL``): records in Redis,
  bytes in Redis (up to ASSET_INLINE_MB) or in the object store of ASSET_STORE_URL, so every
  replica answers for every asset and the replica that claims a job reads its assets.

Both take the same calls (:class:`AssetService`), raise the same domain errors
(:class:`~comfy_sidecar.errors.AssetNotFound`, ``BlobNotFound``, ``HashMismatch``,
``PayloadTooLarge``, :class:`~comfy_sidecar.errors.InputError`,
:class:`~comfy_sidecar.storage.errors.DiskFullError`, :class:`~comfy_sidecar.errors.Unavailable`
while Redis cannot be reached) and keep **holds**: a job holds the assets its workflow
refers to (:meth:`AssetService.hold`), so they are never evicted while the job is retained;
each service releases the holds of jobs no longer retained on its own, every
``check_interval_s``, by asking ``is_retained(job_id)`` (the job backend), once a hold is
older than ``hold_grace_s`` (a job is held a moment before it is submitted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from comfy_sidecar.assets.store import (
    Asset,
    AssetStore,
    Created,
    Received,
    discard,
    staged_file_name,
)

__all__ = ["AssetService", "Content", "IsRetained", "LocalAssets"]

log = logging.getLogger("comfy_sidecar.assets")

IsRetained = Callable[[str], Awaitable[bool]]
"""``is_retained(job_id)``: whether the job is still kept (running, waiting or retained)."""

#: Seconds a fresh hold is kept before its job is asked after.
HOLD_GRACE_S = 60.0
#: Seconds between releases of the holds of jobs no longer retained.
CHECK_INTERVAL_S = 60.0


class Content(Protocol):
    """An asset's bytes, opened for one response: ``asset`` and ``size_bytes`` (when
    opened). :meth:`chunks` closes it when done; :meth:`close` when it is never read."""

    asset: Asset
    size_bytes: int

    def chunks(self, first: int = 0, last: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``first``..``last`` (inclusive; None = to the end), streamed."""
        ...

    def close(self) -> None:
        """Release what :meth:`AssetService.open` took."""
        ...


@runtime_checkable
class AssetService(Protocol):
    """The assets of the v2 API (see the module docstring). Every method may raise
    :class:`~comfy_sidecar.errors.Unavailable` (503) while a shared store cannot be
    reached."""

    @property
    def max_upload_bytes(self) -> int:
        """The largest upload taken, in bytes (ASSET_MAX_UPLOAD_MB, or what a shared
        store can keep)."""
        ...

    async def start(self) -> None:
        """Prepare the store (idempotent; the first call of any other method waits for it).
        Raises ValueError/OSError when ASSET_DIR cannot be used."""
        ...

    async def close(self) -> None:
        """Stop the background work and release connections."""
        ...

    async def receive(self, chunks: AsyncIterable[bytes]) -> Received:
        """Stream an upload's bytes to a temp file, hashing them with blake3 (never whole in
        memory). Raises :class:`~comfy_sidecar.errors.PayloadTooLarge` past
        :attr:`max_upload_bytes`, ``DiskFullError``. Hand the result to :meth:`add` or
        :meth:`discard`."""
        ...

    async def discard(self, received: Received) -> None:
        """Drop what :meth:`receive` took."""
        ...

    async def add(
        self,
        received: Received,
        *,
        file_path: str | None,
        content_type: str | None,
        expected_hash: str | None,
        tags: Sequence[str],
    ) -> Created:
        """A new asset over the received bytes (consumed whatever happens): ``created_new``
        False when the bytes were kept already. Raises InputError (a bad field),
        HashMismatch (``expected_hash``), ``DiskFullError``."""
        ...

    async def from_hash(self, hash_: str, *, file_path: str | None, tags: Sequence[str]) -> Created:
        """A new asset over kept bytes (``created_new`` False). Raises InputError (``hash``
        malformed), BlobNotFound."""
        ...

    async def has_hash(self, hash_: str) -> bool:
        """Whether bytes with this ``blake3:<hex>`` are kept (False for a malformed one)."""
        ...

    async def get(self, asset_id: str) -> Asset:
        """The asset. Raises AssetNotFound."""
        ...

    async def open(self, asset_id: str) -> Content:
        """The asset's bytes, for reading. Raises AssetNotFound."""
        ...

    async def delete(self, asset_id: str) -> None:
        """Remove the asset, and its bytes unless another asset or a hold uses them. Raises
        AssetNotFound."""
        ...

    async def hold(self, asset_id: str, owner: str) -> Asset:
        """Pin the asset's bytes for job ``owner`` until the job is no longer retained (or
        :meth:`release`). Raises AssetNotFound."""
        ...

    async def release(self, owner: str) -> None:
        """Drop every hold of ``owner`` now (a submission refused after its assets were
        held)."""
        ...

    async def job_input(self, asset: Asset, folder: str) -> str:
        """The value a workflow input gets for ``asset`` (held by the job already), read by
        the replica that runs the job: a file staged into ``INPUT_DIR/<folder>/`` and its
        name relative to INPUT_DIR (in-process), or a ``data:`` URL / the object's URL that
        the running replica's preprocessing writes or downloads (shared). Raises
        AssetNotFound when the bytes are gone, ``DiskFullError``."""
        ...


class LocalAssets:
    """:class:`AssetService` over one :class:`AssetStore` (in-process job backend).

    ``input_dir``: ComfyUI's input directory (jobs' assets are staged under it).
    ``max_upload_bytes``: ASSET_MAX_UPLOAD_MB in bytes. ``is_retained``: see the module
    docstring; ``clock``: monotonic seconds (tests move it)."""

    def __init__(
        self,
        store: AssetStore,
        input_dir: str | Path,
        *,
        max_upload_bytes: int,
        is_retained: IsRetained,
        hold_grace_s: float = HOLD_GRACE_S,
        check_interval_s: float = CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.input_dir = Path(input_dir)
        self._max_upload = max_upload_bytes
        self._is_retained = is_retained
        self.hold_grace_s = hold_grace_s
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._owners: dict[str, float] = {}  # job id -> when it first held something
        self._start: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def max_upload_bytes(self) -> int:
        """ASSET_MAX_UPLOAD_MB in bytes."""
        return self._max_upload

    async def start(self) -> None:
        """Start the store (once; later calls wait for the first) and the release loop."""
        if self._start is None:
            self._start = asyncio.ensure_future(self._begin())
        await asyncio.shield(self._start)

    async def _begin(self) -> None:
        await self.store.start()
        self._task = asyncio.create_task(self._release_loop(), name="asset-holds")

    async def close(self) -> None:
        """Stop the release loop and the store."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._start is not None and self._start.done() and not self._start.exception():
            await self.store.close()

    async def receive(self, chunks: AsyncIterable[bytes]) -> Received:
        """See :meth:`AssetService.receive`."""
        await self.start()
        return await self.store.receive(chunks, max_bytes=self._max_upload)

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
        """See :meth:`AssetService.add`."""
        await self.start()
        return await self.store.add(
            received,
            file_path=file_path,
            content_type=content_type,
            expected_hash=expected_hash,
            tags=tags,
        )

    async def from_hash(self, hash_: str, *, file_path: str | None, tags: Sequence[str]) -> Created:
        """See :meth:`AssetService.from_hash`."""
        await self.start()
        return await self.store.from_hash(hash_, file_path=file_path, tags=tags)

    async def has_hash(self, hash_: str) -> bool:
        """See :meth:`AssetService.has_hash`."""
        await self.start()
        return self.store.has_hash(hash_)

    async def get(self, asset_id: str) -> Asset:
        """See :meth:`AssetService.get`."""
        await self.start()
        return self.store.get(asset_id)

    async def open(self, asset_id: str) -> Content:
        """See :meth:`AssetService.open`."""
        await self.start()
        return await self.store.open(asset_id)

    async def delete(self, asset_id: str) -> None:
        """See :meth:`AssetService.delete`."""
        await self.start()
        await self.store.delete(asset_id)

    async def hold(self, asset_id: str, owner: str) -> Asset:
        """See :meth:`AssetService.hold`."""
        await self.start()
        asset = self.store.hold(asset_id, owner)
        self._owners.setdefault(owner, self._clock())
        return asset

    async def release(self, owner: str) -> None:
        """See :meth:`AssetService.release`."""
        await self.start()
        self._owners.pop(owner, None)
        await self.store.release(owner)

    async def job_input(self, asset: Asset, folder: str) -> str:
        """The asset hard-linked (else copied) as ``INPUT_DIR/<folder>/<asset id><ext>``
        (:func:`~comfy_sidecar.assets.store.staged_file_name`); returns that name relative
        to INPUT_DIR, which any input of a node reads as a file of the input directory."""
        name = f"{folder}/{staged_file_name(asset)}"
        await self.store.stage(asset.id, self.input_dir / name)
        return name

    async def release_ended(self) -> int:
        """Release the holds of every job no longer retained whose hold is older than
        ``hold_grace_s``; returns how many jobs'."""
        due = self._clock() - self.hold_grace_s
        released = 0
        for owner, since in list(self._owners.items()):
            if since > due or await self._is_retained(owner):
                continue
            await self.release(owner)
            released += 1
        return released

    async def _release_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            try:
                await self.release_ended()
            except Exception:
                log.exception("releasing the assets of ended jobs failed")
