"""The asset store: Comfy API v2 assets (uploads and job outputs) over deduplicated blobs.

An **asset** is a record with a server-made UUID (comfy_low.models ``Asset``: ``id``, ``hash``,
``size_bytes``, ``content_type``, ``file_path``, ``created_at``, ``expires_at``, ``job_id``)
over a **blob**, the bytes. Uploaded blobs are content-addressed: one file per blake3 hash,
so the same bytes uploaded again (or minted with ``from-hash``) get a new asset record over the
blob already kept, answered ``created_new: false`` — the v2 model's "a dedup hit against bytes
the platform already had" — while ``created_new: true`` means the bytes are new. Every upload
and every ``from-hash`` mints its own asset id (``from-hash`` is "dedup mint over existing
bytes" in comfy_low.transport): deleting one never takes bytes another asset still uses.

A job's **output** is registered as an asset without reading it: the file is hardlinked into
the store (referenced by its path when a link cannot be made, e.g. across file systems), and
its hash is computed afterwards in a background thread, ``None`` meanwhile (the v2 ``Output``:
"``hash`` is lazily computed and may be null").

Layout of ``ASSET_DIR``: ``blobs/<hex>`` (uploads), ``blobs/output-<asset id>`` (outputs),
``records/<asset id>.json`` (one record each, written to a temp name and renamed), ``tmp/``
(uploads being received; emptied at start) and the marker ``.comfy-sidecar-assets``. The store
is kept across restarts: records and blobs are read back at start, blobs no record names are
removed.

**Bounds.** ``max_bytes`` (ASSET_STORE_GB) caps the blobs' total size: after each new blob the
least recently used (uploaded, minted, read or staged last) blobs are evicted with every asset
over them, except blobs a **hold** pins — :meth:`AssetStore.hold` ``(asset_id, owner)`` pins
an asset's blob for ``owner`` (a job id) until :meth:`AssetStore.release` ``(owner)``; a job's
registered outputs are held by the job from the start. The newest blob is never evicted by its
own arrival, so the store may exceed the bound by that blob, or by what holds pin. Assets also
expire at their ``expires_at`` (ASSET_RETENTION_S for uploads); a held blob outlives its
expired records until released.

**Disk faults.** Every file is written under a temp name and renamed into place; on ENOSPC or
EDQUOT the temp file is removed and :class:`~comfy_sidecar.storage.errors.DiskFullError` is
raised (its message names no path).

Everything runs on one event loop; file I/O goes to threads. Domain errors (HTTP statuses are
the edge's): :class:`~comfy_sidecar.errors.AssetNotFound`, ``BlobNotFound``, ``HashMismatch``,
:class:`~comfy_sidecar.errors.InputError` (a bad field), ``DiskFullError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mimetypes
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import msgspec

from comfy_sidecar.assets.hashing import format_hash, hash_file, is_hash, new_hasher, parse_hash
from comfy_sidecar.errors import (
    AssetNotFound,
    BlobNotFound,
    HashMismatch,
    InputError,
    PayloadTooLarge,
)
from comfy_sidecar.storage.cache import place_job_input
from comfy_sidecar.storage.errors import DiskFullError, OutputMissingError, is_disk_full

if TYPE_CHECKING:
    from blake3 import blake3

    from comfy_sidecar.config import Settings

log = logging.getLogger("comfy_sidecar.assets")

#: The file that marks a directory as the store's own.
MARKER = ".comfy-sidecar-assets"
BLOBS, RECORDS, TMP = "blobs", "records", "tmp"
#: An upload's bytes are handed to the writing thread in pieces of about this size.
WRITE_CHUNK = 1024 * 1024
#: Largest piece :meth:`AssetContent.chunks` yields by default.
READ_CHUNK = 256 * 1024
DEFAULT_CONTENT_TYPE = "application/octet-stream"
_MAX_FILE_PATH = 1024
_MAX_TAGS, _MAX_TAG = 64, 256
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_CONTENT_TYPE = re.compile(
    rf'{_TOKEN}/{_TOKEN}([ \t]*;[ \t]*{_TOKEN}=({_TOKEN}|"[^"\\\x00-\x1f\x7f]*"))*', re.ASCII
)
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,16}")
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)


class Asset(msgspec.Struct, kw_only=True, frozen=True):
    """One asset, with the v2 ``Asset`` field names. ``hash`` is ``blake3:<hex>``, None while
    an output's hash is being computed; ``size_bytes`` in bytes; ``file_path`` the client's
    file name (an output's file name); times are aware UTC; ``expires_at`` None = kept until
    deleted or evicted; ``job_id`` only on outputs; ``tags`` as uploaded."""

    id: str
    hash: str | None
    size_bytes: int
    content_type: str
    file_path: str | None
    created_at: datetime
    expires_at: datetime | None = None
    job_id: str | None = None
    tags: tuple[str, ...] = ()


class Created(NamedTuple):
    """An asset just minted, and whether its bytes are new to the store (the v2
    ``created_new``: False for a dedup hit)."""

    asset: Asset
    created_new: bool


class _Record(msgspec.Struct, kw_only=True):
    """An asset as written to ``records/<id>.json``: ``blob`` is the blob's file name under
    ``blobs/``, or an absolute path for an output referenced in place (``external``)."""

    asset: Asset
    blob: str
    external: bool = False


@dataclass(eq=False)
class _Blob:
    """Bytes on disk and who uses them: asset ids over it, holds, LRU position."""

    path: Path
    size: int
    digest: str | None  # hex; None until an output is hashed
    external: bool
    content_type: str
    file_path: str | None
    last_use: int
    assets: set[str] = field(default_factory=set)
    holds: int = 0
    removed: bool = False
    hashed: asyncio.Future[str] | None = None  # made by wait_hash, resolved by the worker
    hash_error: OSError | None = None


@dataclass
class _Entry:
    asset: Asset
    blob: _Blob


def _now() -> datetime:
    return datetime.now(UTC)


def guess_content_type(name: str | None) -> str:
    """The media type of a file name by its extension (Python's ``mimetypes``, as comfy-sdk
    guesses), else ``application/octet-stream``."""
    if name:
        guessed, _ = mimetypes.guess_type(name, strict=False)
        if guessed:
            return guessed
    return DEFAULT_CONTENT_TYPE


def staged_file_name(asset: Asset) -> str:
    """A file name for ``asset`` in ComfyUI's input directory: ``<asset id><ext>``, the
    extension from ``file_path`` (else from ``content_type``) so nodes that look at it
    (``LoadImage``'s PIL, VHS's video loaders) see the right kind; nothing of the client's name
    but a plain 1-16 character extension is used."""
    return asset.id + file_extension(asset.file_path, asset.content_type)


def file_extension(file_path: str | None, content_type: str) -> str:
    """``file_path``'s extension when it is a plain 1-16 character one (``.png``), else the
    one ``content_type`` gives, else ''."""
    suffix = PurePosixPath(file_path or "").suffix
    if not _EXTENSION.fullmatch(suffix):
        suffix = mimetypes.guess_extension(content_type.split(";")[0].strip()) or ""
    return suffix


def _check_file_path(file_path: str | None) -> str | None:
    if file_path is None:
        return None
    if (
        not isinstance(file_path, str)
        or not file_path
        or len(file_path) > _MAX_FILE_PATH
        or "\x00" in file_path
    ):
        raise InputError(
            f"expected a file name of 1 to {_MAX_FILE_PATH} characters without NUL", "file_path"
        )
    return file_path


def _check_content_type(content_type: str | None, file_path: str | None) -> str:
    """The given media type (it becomes a response header, so CR/LF and the like are
    refused), or the one ``file_path``'s extension gives."""
    if content_type is None or not content_type.strip():
        return guess_content_type(file_path)
    content_type = content_type.strip()
    if len(content_type) > 255 or not _CONTENT_TYPE.fullmatch(content_type):
        raise InputError("expected a media type such as image/png", "content_type")
    return content_type


def _check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    checked = tuple(tags)
    if len(checked) > _MAX_TAGS or any(
        not isinstance(tag, str) or not tag or len(tag) > _MAX_TAG or "\x00" in tag
        for tag in checked
    ):
        raise InputError(f"expected at most {_MAX_TAGS} tags of 1 to {_MAX_TAG} characters", "tags")
    return checked


def check_upload(
    file_path: str | None,
    content_type: str | None,
    expected_hash: str | None,
    tags: Iterable[str],
) -> tuple[str | None, str, str | None, tuple[str, ...]]:
    """The fields of an upload checked: (``file_path``, the media type — given, else guessed
    from ``file_path`` —, ``expected_hash``'s 64 hex digits or None, the tags). Raises
    :class:`~comfy_sidecar.errors.InputError` naming the field (``file_path``,
    ``content_type``, ``expected_hash``, ``tags``)."""
    file_path = _check_file_path(file_path)
    checked_type = _check_content_type(content_type, file_path)
    expected = parse_hash(expected_hash, "expected_hash") if expected_hash else None
    return file_path, checked_type, expected, _check_tags(tags)


@dataclass(frozen=True)
class Received:
    """An upload's bytes, received into a temp file: ``path``, their blake3 ``digest`` (64
    hex digits) and ``size`` in bytes."""

    path: Path
    digest: str
    size: int

    @property
    def hash(self) -> str:
        """``blake3:<hex>``."""
        return format_hash(self.digest)


async def receive(chunks: AsyncIterable[bytes], directory: Path, *, max_bytes: int = 0) -> Received:
    """Write the bytes ``chunks`` yields to a new temp file in ``directory``, hashing them
    with blake3 on the way (about :data:`WRITE_CHUNK` bytes buffered at most; the writes and
    the hashing run in a thread).

    ``max_bytes`` (0 = no limit): more bytes than that raise
    :class:`~comfy_sidecar.errors.PayloadTooLarge` (field ``limit_bytes``) as soon as they
    arrive. Raises :class:`~comfy_sidecar.storage.errors.DiskFullError` on a full disk;
    whatever ``chunks`` raises (the client went away) passes through. The temp file is
    removed on any error; otherwise the caller owns it (:func:`discard`)."""
    tmp = directory / f".partial-{uuid.uuid4().hex}"
    hasher = new_hasher()
    size = 0
    try:
        handle = await asyncio.to_thread(open, tmp, "xb")
        try:
            pending: list[bytes] = []
            buffered = 0
            async for chunk in chunks:
                if not chunk:
                    continue
                if max_bytes and size + buffered + len(chunk) > max_bytes:
                    raise PayloadTooLarge(
                        f"the upload is larger than {max_bytes} bytes", limit_bytes=max_bytes
                    )
                pending.append(bytes(chunk))
                buffered += len(chunk)
                if buffered >= WRITE_CHUNK:
                    await asyncio.to_thread(_write, handle, hasher, pending)
                    size += buffered
                    pending, buffered = [], 0
            if pending:
                await asyncio.to_thread(_write, handle, hasher, pending)
                size += buffered
        finally:
            await asyncio.to_thread(handle.close)
    except BaseException as exc:
        await _discard(tmp)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise DiskFullError("no space left in the asset store (ASSET_DIR)") from None
        raise
    return Received(tmp, hasher.hexdigest(), size)


def check_expected(received: Received, expected: str | None) -> None:
    """Raise :class:`~comfy_sidecar.errors.HashMismatch` (fields ``expected_hash``, ``hash``)
    when ``expected`` (64 hex digits, or None: nothing to check) is not ``received``'s
    digest. The temp file is left to the caller."""
    if expected is not None and expected != received.digest:
        raise HashMismatch(
            "the uploaded bytes do not match expected_hash",
            location="expected_hash",
            expected_hash=format_hash(expected),
            hash=received.hash,
        )


async def discard(received: Received) -> None:
    """Remove ``received``'s temp file (harmless when it is gone)."""
    await _discard(received.path)


class AssetContent:
    """An asset's bytes, opened: reading goes on even if the asset is deleted or evicted
    meanwhile. Use ``async with`` or :meth:`close` (:meth:`chunks` closes it when it ends).
    ``size_bytes`` is the blob's size when opened."""

    def __init__(self, asset: Asset, handle: BinaryIO, size_bytes: int) -> None:
        self.asset = asset
        self.size_bytes = size_bytes
        self._handle = handle

    def chunks(
        self, first: int = 0, last: int | None = None, *, chunk_size: int = READ_CHUNK
    ) -> AsyncIterator[bytes]:
        """Bytes ``first`` to ``last`` (inclusive offsets, HTTP ``Range`` semantics; ``last``
        None = to the end) in pieces of at most ``chunk_size``, each read in a thread. An
        empty asset yields nothing. Raises ValueError for offsets outside the asset (the edge
        parses ``Range`` with :func:`comfy_sidecar.http.ranges.parse_range` first, which
        answers 416 for those) at once, before any read. Closes the file when done."""
        last = self.size_bytes - 1 if last is None else last
        if first < 0 or last >= self.size_bytes or first > last + 1 or chunk_size < 1:
            self.close()
            raise ValueError(f"range {first}-{last} is outside 0-{self.size_bytes - 1}")
        return self._read(first, last, chunk_size)

    async def _read(self, first: int, last: int, chunk_size: int) -> AsyncIterator[bytes]:
        try:
            fd = self._handle.fileno()
            offset = first
            while offset <= last:
                size = min(chunk_size, last - offset + 1)
                chunk = await asyncio.to_thread(os.pread, fd, size, offset)
                if not chunk:  # the file shrank: end early rather than loop
                    return
                offset += len(chunk)
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        """Close the file (harmless twice)."""
        self._handle.close()

    async def __aenter__(self) -> AssetContent:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AssetStore:
    """Assets and their blobs under ``directory`` (see the module docstring).

    ``max_bytes``: bound of the blobs' total size (0 = none). ``retention_s``: default life
    of an uploaded or minted asset in seconds (0 = no ``expires_at``). ``sweep_interval_s``:
    seconds between removals of expired assets. ``clock``: unix seconds (tests move it).
    Call :meth:`start` before use and :meth:`close` at the end.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_bytes: int = 0,
        retention_s: float = 0,
        sweep_interval_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self.sweep_interval_s = sweep_interval_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._by_digest: dict[str, list[_Blob]] = {}
        self._blobs: set[_Blob] = set()
        self._holds: dict[str, set[_Blob]] = {}
        self._total = 0
        self._tick = 0
        self._lock = asyncio.Lock()
        self._hash_queue: asyncio.Queue[_Blob] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asset-hash")
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> AssetStore:
        """The store ASSET_DIR, ASSET_STORE_GB (GiB) and ASSET_RETENTION_S describe."""
        return cls(
            settings.asset_dir,
            max_bytes=int(settings.asset_store_gb * 1024**3),
            retention_s=settings.asset_retention_s,
        )

    # --- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Read back what an earlier sidecar kept, remove temp files and blobs no record names,
        queue unhashed outputs for hashing, and start the sweeper and the hashing worker.

        Raises ValueError when ``directory`` is a non-empty directory the store did not make
        (a mistyped ASSET_DIR never loses anyone's files), OSError when it cannot be made."""
        records = await asyncio.to_thread(self._load)
        by_path: dict[Path, _Blob] = {}
        for record in records:
            self._adopt(record, by_path)
        for blob in list(self._blobs):
            if blob.digest is None:
                self._queue_hash(blob)
        async with self._lock:
            await self._evict(keep=None)
        self._tasks = [
            asyncio.create_task(self._hash_worker(), name="asset-hash"),
            asyncio.create_task(self._sweeper(), name="asset-sweep"),
        ]

    async def close(self) -> None:
        """Stop the sweeper and the hashing worker (a hash being computed is dropped; it is
        computed again at the next start)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> list[_Record]:
        marker = self.dir / MARKER
        if self.dir.is_dir() and not marker.exists() and any(self.dir.iterdir()):
            raise ValueError(f"{self.dir} is not empty and is not a comfy-sidecar asset directory")
        for sub in (BLOBS, RECORDS, TMP):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            marker.write_text("comfy-sidecar asset store: blobs/, records/, tmp/\n")
        for child in (self.dir / TMP).iterdir():
            _remove_path(child)
        records: list[_Record] = []
        now = self._clock()
        named: set[str] = set()
        decoder = msgspec.json.Decoder(_Record)
        for path in (self.dir / RECORDS).iterdir():
            record: _Record | None = None
            if path.suffix == ".json" and path.stem == _uuid_or_none(path.stem):
                with contextlib.suppress(OSError, msgspec.DecodeError):
                    record = decoder.decode(path.read_bytes())
            if record is None or record.asset.id != path.stem:
                _remove_path(path)  # a temp file, or not ours
                continue
            blob_path = self._blob_path(record)
            expires = record.asset.expires_at
            if (expires is not None and expires.timestamp() <= now) or not blob_path.is_file():
                path.unlink(missing_ok=True)
                continue
            if not record.external:
                named.add(record.blob)
            records.append(record)
        for child in (self.dir / BLOBS).iterdir():
            if child.name not in named:
                _remove_path(child)
        records.sort(key=lambda record: record.asset.created_at)
        return records

    def _blob_path(self, record: _Record) -> Path:
        return Path(record.blob) if record.external else self.dir / BLOBS / record.blob

    def _adopt(self, record: _Record, by_path: dict[Path, _Blob]) -> None:
        """Add a record read back at start to the in-memory indexes."""
        path = self._blob_path(record)
        blob = by_path.get(path)
        if blob is None:
            digest = is_hash(record.asset.hash) if record.asset.hash else None
            blob = _Blob(
                path=path,
                size=record.asset.size_bytes,
                digest=digest,
                external=record.external,
                content_type=record.asset.content_type,
                file_path=record.asset.file_path,
                last_use=self._next_tick(),
            )
            self._add_blob(blob)
            by_path[path] = blob
        else:
            blob.last_use = self._next_tick()
        blob.assets.add(record.asset.id)
        self._entries[record.asset.id] = _Entry(record.asset, blob)

    # --- lookups -------------------------------------------------------------------------

    def find(self, asset_id: str) -> Asset | None:
        """The kept, unexpired asset ``asset_id``, or None (any string is accepted)."""
        entry = self._live(asset_id)
        return entry.asset if entry is not None else None

    def get(self, asset_id: str) -> Asset:
        """The asset ``asset_id``. Raises :class:`~comfy_sidecar.errors.AssetNotFound`."""
        return self._entry(asset_id).asset

    def has_hash(self, hash_: str) -> bool:
        """Whether the store holds bytes with this ``blake3:<hex>`` hash (``HEAD
        /api/v2/assets/by-hash/{hash}``); False for a malformed hash and for outputs whose
        hash is still being computed."""
        digest = is_hash(hash_)
        return digest is not None and self._blob_for(digest) is not None

    @property
    def size_bytes(self) -> int:
        """Total size of the blobs the store owns (outputs referenced in place not counted)."""
        return self._total

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, asset_id: str) -> _Entry | None:
        entry = self._entries.get(asset_id)
        if entry is None:
            return None
        expires = entry.asset.expires_at
        if expires is not None and expires.timestamp() <= self._clock():
            return None
        return entry

    def _entry(self, asset_id: str) -> _Entry:
        entry = self._live(asset_id)
        if entry is None:
            raise AssetNotFound(f"no asset with id {asset_id!r}", location="id")
        return entry

    def _blob_for(self, digest: str) -> _Blob | None:
        for blob in self._by_digest.get(digest, ()):
            if not blob.removed and (not blob.external or blob.path.is_file()):
                return blob
        return None

    # --- creating assets -----------------------------------------------------------------

    async def upload(
        self,
        chunks: AsyncIterable[bytes],
        *,
        file_path: str | None,
        content_type: str | None = None,
        expected_hash: str | None = None,
        tags: Sequence[str] = (),
        retention_s: float | None = None,
    ) -> Created:
        """Store the bytes ``chunks`` yields (``POST /api/v2/assets``' ``file`` part) as a new
        asset, hashing them with blake3 as they are written to a temp file (never whole in
        memory: at most about :data:`WRITE_CHUNK` bytes are buffered): :meth:`receive`, then
        :meth:`add`, with the fields checked before any byte is read.

        ``file_path``: the client's file name (multipart field ``file_path``). ``content_type``:
        the ``content_type`` field or the part's type; None or blank = guessed from
        ``file_path``. ``expected_hash``: the ``expected_hash`` field comfy-sdk sends (its
        local blake3); the bytes must match it. ``retention_s``: the asset's life in seconds
        (None = the store's ``retention_s``; 0 = no ``expires_at``).

        Returns :class:`Created`: ``created_new`` False when the store already had these bytes
        (the temp file is dropped and the blob shared). Raises
        :class:`~comfy_sidecar.errors.InputError` (``file_path``, ``content_type``,
        ``expected_hash``, ``tags``) before reading anything,
        :class:`~comfy_sidecar.errors.HashMismatch` (fields ``expected_hash``, ``hash``),
        :class:`~comfy_sidecar.storage.errors.DiskFullError`; whatever ``chunks`` raises
        (the client went away) passes through. Nothing is left behind on any error."""
        check_upload(file_path, content_type, expected_hash, tags)
        received = await self.receive(chunks)
        return await self.add(
            received,
            file_path=file_path,
            content_type=content_type,
            expected_hash=expected_hash,
            tags=tags,
            retention_s=retention_s,
        )

    async def receive(self, chunks: AsyncIterable[bytes], max_bytes: int = 0) -> Received:
        """:func:`receive` into the store's ``tmp/`` (same file system as the blobs: the
        bytes are renamed into place, never copied). Pass the result to :meth:`add` or
        :func:`discard`."""
        return await receive(chunks, self.dir / TMP, max_bytes=max_bytes)

    async def add(
        self,
        received: Received,
        *,
        file_path: str | None,
        content_type: str | None = None,
        expected_hash: str | None = None,
        tags: Sequence[str] = (),
        retention_s: float | None = None,
    ) -> Created:
        """Make the bytes :meth:`receive` took a new asset (the fields as :meth:`upload`
        says); ``received``'s temp file is consumed (moved into place or removed) whatever
        happens. Raises :class:`~comfy_sidecar.errors.InputError` for a bad field,
        :class:`~comfy_sidecar.errors.HashMismatch`, ``DiskFullError``."""
        try:
            file_path, content_type, expected, checked_tags = check_upload(
                file_path, content_type, expected_hash, tags
            )
            check_expected(received, expected)
        except BaseException:
            await discard(received)
            raise
        expires = self._expiry(retention_s)
        commit = asyncio.ensure_future(
            self._commit_upload(
                received.path,
                received.digest,
                received.size,
                content_type,
                file_path,
                checked_tags,
                expires,
            )
        )
        return await asyncio.shield(commit)  # a cancelled request still leaves a whole store

    async def _commit_upload(
        self,
        tmp: Path,
        digest: str,
        size: int,
        content_type: str,
        file_path: str | None,
        tags: tuple[str, ...],
        expires: datetime | None,
    ) -> Created:
        async with self._lock:
            blob = self._blob_for(digest)
            created_new = blob is None
            if blob is None:
                dest = self.dir / BLOBS / digest
                try:
                    await asyncio.to_thread(os.replace, tmp, dest)
                except BaseException:
                    await _discard(tmp)
                    raise
                blob = _Blob(
                    path=dest,
                    size=size,
                    digest=digest,
                    external=False,
                    content_type=content_type,
                    file_path=file_path,
                    last_use=self._next_tick(),
                )
                self._add_blob(blob)
            else:
                await _discard(tmp)
            asset = Asset(
                id=str(uuid.uuid4()),
                hash=format_hash(digest),
                size_bytes=blob.size,
                content_type=content_type,
                file_path=file_path,
                created_at=_now(),
                expires_at=expires,
                tags=tags,
            )
            await self._add_asset(asset, blob)
            await self._evict(keep=blob)
            return Created(asset, created_new)

    async def from_hash(
        self,
        hash_: str,
        *,
        file_path: str | None = None,
        tags: Sequence[str] = (),
        retention_s: float | None = None,
    ) -> Created:
        """Mint a new asset over bytes the store already holds (``POST
        /api/v2/assets/from-hash``, body ``{hash, file_path?, tags?}``); ``created_new`` is
        always False. ``file_path`` None takes the name the bytes were first stored under; the
        content type is the bytes' first one, or the one ``file_path`` gives when that first
        one was the default.

        Raises :class:`~comfy_sidecar.errors.InputError` (``hash`` malformed, ``file_path``,
        ``tags``), :class:`~comfy_sidecar.errors.BlobNotFound` (no such bytes, or an output
        whose hash is not computed yet), ``DiskFullError``."""
        digest = parse_hash(hash_, "hash")
        file_path = _check_file_path(file_path)
        checked_tags = _check_tags(tags)
        expires = self._expiry(retention_s)
        async with self._lock:
            blob = self._blob_for(digest)
            if blob is None:
                raise BlobNotFound(f"no bytes with hash {format_hash(digest)}", location="hash")
            content_type = blob.content_type
            if file_path is not None and content_type == DEFAULT_CONTENT_TYPE:
                content_type = guess_content_type(file_path)
            asset = Asset(
                id=str(uuid.uuid4()),
                hash=format_hash(digest),
                size_bytes=blob.size,
                content_type=content_type,
                file_path=file_path if file_path is not None else blob.file_path,
                created_at=_now(),
                expires_at=expires,
                tags=checked_tags,
            )
            await self._add_asset(asset, blob)
            self._touch(blob)
            return Created(asset, False)

    async def register_output(
        self,
        path: str | Path,
        *,
        job_id: str,
        file_path: str | None = None,
        content_type: str | None = None,
        expires_at: datetime | None = None,
        hold: bool = True,
    ) -> Asset:
        """Make the output file ``path`` (already on disk, e.g. under JOBS_DIR) an asset of
        job ``job_id``, without reading it: hardlinked into the store (referenced at
        ``path`` when no link can be made, e.g. across file systems; the caller then keeps the
        file while the asset lives). The returned asset's ``hash`` is None; it is computed in
        a background thread (:meth:`wait_hash`).

        ``file_path`` defaults to the file's name, ``content_type`` to what that name gives,
        ``expires_at`` (aware) to none: pass the job's retention deadline. With ``hold`` the
        asset is held for owner ``job_id`` (:meth:`release` ``(job_id)`` when the job is
        dropped), so it is never evicted while its job is retained.

        Raises :class:`~comfy_sidecar.storage.errors.OutputMissingError` (no such regular
        file), ``DiskFullError``, :class:`~comfy_sidecar.errors.InputError`."""
        source = Path(path)
        file_path = _check_file_path(file_path if file_path is not None else source.name)
        content_type = _check_content_type(content_type, file_path)
        asset_id = str(uuid.uuid4())
        name = f"output-{asset_id}"
        dest = self.dir / BLOBS / name
        try:
            size, external = await asyncio.to_thread(_link_output, source, dest)
        except FileNotFoundError:
            raise OutputMissingError(f"{source.name}: output file missing") from None
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError("no space left in the asset store (ASSET_DIR)") from None
            raise
        commit = asyncio.ensure_future(
            self._commit_output(
                asset_id,
                source,
                dest,
                size,
                external,
                job_id,
                file_path,
                content_type,
                expires_at,
                hold,
            )
        )
        return await asyncio.shield(commit)

    async def _commit_output(
        self,
        asset_id: str,
        source: Path,
        dest: Path,
        size: int,
        external: bool,
        job_id: str,
        file_path: str | None,
        content_type: str,
        expires_at: datetime | None,
        hold: bool,
    ) -> Asset:
        async with self._lock:
            blob = _Blob(
                path=source.resolve() if external else dest,
                size=size,
                digest=None,
                external=external,
                content_type=content_type,
                file_path=file_path,
                last_use=self._next_tick(),
            )
            self._add_blob(blob)
            asset = Asset(
                id=asset_id,
                hash=None,
                size_bytes=size,
                content_type=content_type,
                file_path=file_path,
                created_at=_now(),
                expires_at=expires_at,
                job_id=job_id,
            )
            await self._add_asset(asset, blob)
            if hold:
                self._hold_blob(blob, job_id)
            self._queue_hash(blob)
            await self._evict(keep=blob)
            return asset

    async def wait_hash(self, asset_id: str) -> str:
        """The asset's ``blake3:<hex>``, waiting for an output's to be computed. Raises
        :class:`~comfy_sidecar.errors.AssetNotFound`; OSError when the output's file could not
        be read."""
        entry = self._entry(asset_id)
        if entry.asset.hash is not None:
            return entry.asset.hash
        if entry.blob.hash_error is not None:
            raise entry.blob.hash_error
        if entry.blob.hashed is None:
            entry.blob.hashed = asyncio.get_running_loop().create_future()
        return await asyncio.shield(entry.blob.hashed)

    # --- holds, deletion, expiry ---------------------------------------------------------

    def hold(self, asset_id: str, owner: str) -> Asset:
        """Pin ``asset_id``'s bytes for ``owner`` (a job id) until :meth:`release`
        ``(owner)``: never evicted meanwhile, and kept even when the asset itself is deleted
        or expires (a job that staged or produced it still runs or is retained). Holding the
        same asset twice for one owner is one hold. Raises
        :class:`~comfy_sidecar.errors.AssetNotFound`."""
        entry = self._entry(asset_id)
        self._hold_blob(entry.blob, owner)
        self._touch(entry.blob)
        return entry.asset

    def _hold_blob(self, blob: _Blob, owner: str) -> None:
        held = self._holds.setdefault(owner, set())
        if blob not in held:
            held.add(blob)
            blob.holds += 1

    async def release(self, owner: str) -> None:
        """Drop every hold of ``owner`` (unknown owners are fine); bytes no asset uses any more
        are removed, and the size bound is enforced again."""
        async with self._lock:
            for blob in self._holds.pop(owner, set()):
                blob.holds -= 1
                if blob.holds == 0 and not blob.assets:
                    await self._remove_blob(blob)
            await self._evict(keep=None)

    def holders(self, asset_id: str) -> list[str]:
        """Owners holding ``asset_id``'s bytes (any order); [] for an unknown asset."""
        entry = self._entries.get(asset_id)
        if entry is None:
            return []
        return [owner for owner, blobs in self._holds.items() if entry.blob in blobs]

    async def delete(self, asset_id: str) -> None:
        """Remove the asset ``asset_id`` (``DELETE /api/v2/assets/{id}``): its record, and its
        bytes unless another asset or a hold still uses them. Raises
        :class:`~comfy_sidecar.errors.AssetNotFound`."""
        async with self._lock:
            entry = self._entry(asset_id)
            await self._drop_asset(entry)

    async def sweep(self) -> int:
        """Remove every asset past its ``expires_at`` (and bytes nothing uses any more);
        returns how many. Runs every ``sweep_interval_s`` seconds once started."""
        async with self._lock:
            now = self._clock()
            expired = [
                entry
                for entry in self._entries.values()
                if entry.asset.expires_at is not None and entry.asset.expires_at.timestamp() <= now
            ]
            for entry in expired:
                await self._drop_asset(entry)
            return len(expired)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("removing expired assets failed")

    # --- reading and staging -------------------------------------------------------------

    async def open(self, asset_id: str) -> AssetContent:
        """Open the asset's bytes for reading (``GET /api/v2/assets/{id}/content``); counts
        as a use for the LRU order. Raises :class:`~comfy_sidecar.errors.AssetNotFound` (also
        when an output referenced in place is gone from disk)."""
        entry = self._entry(asset_id)
        blob = entry.blob
        try:
            handle = await asyncio.to_thread(open, blob.path, "rb", buffering=0)
        except FileNotFoundError:
            raise AssetNotFound(
                f"the bytes of asset {asset_id!r} are gone", location="id"
            ) from None
        self._touch(blob)
        try:
            size = os.fstat(handle.fileno()).st_size
        except OSError:
            handle.close()
            raise
        return AssetContent(entry.asset, handle, size)

    async def stage(self, asset_id: str, dest: str | Path) -> Path:
        """Put the asset's bytes at ``dest`` (in ComfyUI's input directory) for a job: a
        hardlink, or a copy when the input directory is on another file system; never a
        symlink (ComfyUI >= 0.28 refuses symlinks that leave its input directory). Replaces a
        file at ``dest``; parents are made. :meth:`hold` the asset for the job first, so it
        cannot be evicted meanwhile; remove ``dest`` when the job ends. Returns ``dest``.

        Raises :class:`~comfy_sidecar.errors.AssetNotFound`,
        :class:`~comfy_sidecar.storage.errors.DiskFullError` (a copy on a full disk; nothing
        half-written is left), :class:`~comfy_sidecar.storage.errors.StorageError`."""
        entry = self._entry(asset_id)
        target = Path(dest)
        if not await asyncio.to_thread(entry.blob.path.is_file):
            raise AssetNotFound(f"the bytes of asset {asset_id!r} are gone", location="id")
        await asyncio.to_thread(place_job_input, entry.blob.path, target)
        self._touch(entry.blob)
        return target

    # --- internals -----------------------------------------------------------------------

    def _expiry(self, retention_s: float | None) -> datetime | None:
        seconds = self.retention_s if retention_s is None else retention_s
        if seconds <= 0:
            return None
        return datetime.fromtimestamp(self._clock() + seconds, UTC)

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _touch(self, blob: _Blob) -> None:
        blob.last_use = self._next_tick()

    def _add_blob(self, blob: _Blob) -> None:
        self._blobs.add(blob)
        if blob.digest is not None:
            self._by_digest.setdefault(blob.digest, []).append(blob)
        if not blob.external:
            self._total += blob.size

    async def _add_asset(self, asset: Asset, blob: _Blob) -> None:
        """Write the record and index it; on failure the blob goes if nothing else uses it."""
        record = _Record(
            asset=asset,
            blob=str(blob.path) if blob.external else blob.path.name,
            external=blob.external,
        )
        try:
            await asyncio.to_thread(self._write_record, record)
        except BaseException as exc:
            if not blob.assets and blob.holds == 0:
                await self._remove_blob(blob)
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise DiskFullError("no space left in the asset store (ASSET_DIR)") from None
            raise
        blob.assets.add(asset.id)
        self._entries[asset.id] = _Entry(asset, blob)

    def _write_record(self, record: _Record) -> None:
        final = self.dir / RECORDS / f"{record.asset.id}.json"
        tmp = final.with_name(f".partial-{record.asset.id}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "xb") as fh:
                fh.write(msgspec.json.encode(record))
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def _drop_asset(self, entry: _Entry) -> None:
        asset_id = entry.asset.id
        self._entries.pop(asset_id, None)
        entry.blob.assets.discard(asset_id)
        await asyncio.to_thread((self.dir / RECORDS / f"{asset_id}.json").unlink, missing_ok=True)
        if not entry.blob.assets and entry.blob.holds == 0:
            await self._remove_blob(entry.blob)

    async def _remove_blob(self, blob: _Blob) -> None:
        if blob.removed:
            return
        blob.removed = True
        self._blobs.discard(blob)
        if blob.hashed is not None and not blob.hashed.done():
            blob.hashed.set_exception(AssetNotFound("the asset was removed", location="id"))
        if blob.digest is not None:
            same = self._by_digest.get(blob.digest, [])
            with contextlib.suppress(ValueError):
                same.remove(blob)
            if not same:
                self._by_digest.pop(blob.digest, None)
        if not blob.external:
            self._total -= blob.size
            await asyncio.to_thread(blob.path.unlink, missing_ok=True)

    async def _evict(self, keep: _Blob | None) -> None:
        """Evict least recently used blobs no one holds, with their assets, until the owned
        blobs fit ``max_bytes``; never ``keep``. Called with the lock held."""
        if self.max_bytes <= 0 or self._total <= self.max_bytes:
            return
        candidates = sorted(
            (b for b in self._blobs if not b.external and b.holds == 0 and b is not keep),
            key=lambda b: b.last_use,
        )
        for blob in candidates:
            if self._total <= self.max_bytes:
                break
            if blob.removed or blob.holds:  # held (or gone) since the list was made
                continue
            log.info(
                "evicting %s (%d bytes, %d assets) to keep ASSET_DIR within ASSET_STORE_GB",
                blob.path.name,
                blob.size,
                len(blob.assets),
            )
            for asset_id in list(blob.assets):
                entry = self._entries.get(asset_id)
                if entry is not None:
                    await self._drop_asset(entry)  # the last one takes the blob, unless held
            if not blob.assets and not blob.holds:
                await self._remove_blob(blob)

    def _queue_hash(self, blob: _Blob) -> None:
        self._hash_queue.put_nowait(blob)

    async def _hash_worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            blob = await self._hash_queue.get()
            if blob.removed or blob.digest is not None:
                continue
            try:
                hash_ = await loop.run_in_executor(self._executor, hash_file, blob.path)
            except OSError as exc:
                log.warning("cannot hash asset blob %s: %s", blob.path.name, exc.strerror)
                blob.hash_error = exc
                if blob.hashed is not None and not blob.hashed.done():
                    blob.hashed.set_exception(exc)
                continue
            try:
                async with self._lock:
                    await self._set_hash(blob, hash_)
            except Exception:
                log.exception("recording the hash of asset blob %s failed", blob.path.name)

    async def _set_hash(self, blob: _Blob, hash_: str) -> None:
        if blob.removed:
            return
        blob.digest = is_hash(hash_)
        if blob.digest is not None:
            self._by_digest.setdefault(blob.digest, []).append(blob)
        for asset_id in list(blob.assets):
            entry = self._entries.get(asset_id)
            if entry is None:
                continue
            entry.asset = msgspec.structs.replace(entry.asset, hash=hash_)
            record = _Record(
                asset=entry.asset,
                blob=str(blob.path) if blob.external else blob.path.name,
                external=blob.external,
            )
            try:
                await asyncio.to_thread(self._write_record, record)
            except OSError as exc:  # the record keeps hash null; computed again at next start
                log.warning("cannot record the hash of asset %s: %s", asset_id, exc.strerror)
        if blob.hashed is not None and not blob.hashed.done():
            blob.hashed.set_result(hash_)


def _write(handle: BinaryIO, hasher: blake3, pieces: list[bytes]) -> None:
    data = b"".join(pieces) if len(pieces) > 1 else pieces[0]
    hasher.update(data)
    handle.write(data)


async def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        await asyncio.to_thread(path.unlink, missing_ok=True)


def _remove_path(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _uuid_or_none(text: str) -> str | None:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


def _link_output(source: Path, dest: Path) -> tuple[int, bool]:
    """Hardlink ``source`` at ``dest``; returns (size in bytes, external): external True when
    no link can be made and the file is to be referenced where it is. Raises
    FileNotFoundError when ``source`` is not a regular file, OSError (ENOSPC...)."""
    st = source.stat()
    if not source.is_file():
        raise FileNotFoundError(errno.ENOENT, "not a regular file", str(source))
    try:
        os.link(source, dest)
    except OSError as exc:
        if exc.errno in _NO_LINK:
            return st.st_size, True
        raise
    return st.st_size, False
