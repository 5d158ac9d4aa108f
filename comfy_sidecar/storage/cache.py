"""The download cache: one file per URL in ``CACHE_DIR``, named like comfyui-api names it.

Name: ``base64url(sha256(url)).rstrip("=")[:32]`` + the extension of the URL path (Node
``path.extname``); for http(s) URLs without one the backend's fallback (Content-Disposition,
final URL, Content-Type). A file name chosen by the caller only ever names a *link*.

Differences from comfyui-api (its W-A2, W-A3, W-A5, W-B1, W-S5): downloads go to a private
temp directory and are renamed into place only when complete; concurrent requests for one URL
share one download; metadata lives in an index (``.comfy-sidecar-index.json``, written
atomically, never evicted) instead of ``.meta`` files; LRU order is our own use counter, not
atime; leased entries are never evicted; inputs are hardlinked (copied when that fails) so
ComfyUI >= 0.28's realpath check passes. Existing comfyui-api volumes are adopted at start
(``<hash><ext>`` files, with their ``.meta`` when present).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from comfy_sidecar.net.urls import scrub_url
from comfy_sidecar.observability import metrics
from comfy_sidecar.schemas import DownloadAuth
from comfy_sidecar.storage.backends.base import Backend, check_name, url_extname
from comfy_sidecar.storage.errors import (
    BackendError,
    BadRequestError,
    CacheConflictError,
    DiskFullError,
    StorageError,
    is_disk_full,
)
from comfy_sidecar.storage.files import link_or_copy

log = logging.getLogger("comfy_sidecar.cache")

INDEX_NAME = ".comfy-sidecar-index.json"
PARTIAL_PREFIX = ".partial-"
_CACHE_NAME = re.compile(r"^[A-Za-z0-9_-]{32}(\..*)?$")

EventFn = Callable[[str, dict[str, Any]], None]
"""``on_event(name, data)``: ``file_downloaded`` / ``file_uploaded`` / ``file_deleted`` with
``{url, local_path, size, duration}`` (url without credentials, size in bytes, seconds)."""


def cache_key(url: str) -> str:
    """comfyui-api's ``hashUrlBase64``: 32 base64url characters of sha256 of the exact URL."""
    digest = hashlib.sha256(url.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")[:32]


def cache_name(url: str, fallback_ext: str = "") -> str:
    """Cache file name of ``url``: key + URL path extension, else ``fallback_ext``."""
    ext = url_extname(url)
    if "/" in ext or "\x00" in ext:
        ext = ""
    return cache_key(url) + (ext or fallback_ext)


class CacheEntry(msgspec.Struct, kw_only=True):
    """One cached file, as kept in the index. Times are ms since the epoch, size in bytes.

    ``last_use`` is the LRU order: a counter taken from the cache's clock at each use, so two
    uses in one millisecond still have an order (eviction takes the lowest first). Indexes
    written before it existed (version 1) load with 0 and are ordered by ``last_used_ms``.
    """

    file: str
    url: str
    size: int
    created_ms: int
    last_used_ms: int
    last_use: int = 0
    auth_required: bool
    links: list[str] = []


class _Index(msgspec.Struct):
    version: int = 2
    entries: dict[str, CacheEntry] = {}


def _now_ms() -> int:
    return int(time.time() * 1000)


class Lease:
    """Keeps cache entries from eviction while a job uses them.

    Get one from :meth:`DownloadCache.lease`, pass it to ``get``/``stage_*``/``link``, and call
    :meth:`release` (or use it as a ``with`` context manager) when the job ends.
    Releasing twice is harmless.
    """

    def __init__(self, counts: Counter[str]) -> None:
        self._counts = counts
        self._held: Counter[str] = Counter()

    def hold(self, key: str) -> None:
        self._counts[key] += 1
        self._held[key] += 1

    def drop(self, key: str) -> None:
        if self._held[key] > 0:
            self._held[key] -= 1
            self._counts[key] -= 1
            if self._counts[key] <= 0:
                del self._counts[key]

    def release(self) -> None:
        for key, n in list(self._held.items()):
            for _ in range(n):
                self.drop(key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_meta(meta: Path) -> tuple[str, bool]:
    """(url, auth_required) from comfyui-api's ``<file>.meta`` sidecar
    ``{"authRequired", "url", "cachedAt"}``; ``("unknown", False)`` when missing or unreadable."""
    url, auth_required = "unknown", False
    if meta.is_file():
        try:
            data = msgspec.json.decode(meta.read_bytes())
            url = str(data.get("url", url))
            auth_required = bool(data.get("authRequired", False))
        except (msgspec.DecodeError, OSError, AttributeError):
            pass
    return url, auth_required


class DownloadCache:
    """URL-keyed file cache in ``cache_dir`` with in-flight dedup, an index, LRU and leases.

    ``max_bytes`` 0 means no limit (``LRU_CACHE_SIZE_GB`` x 1024^3). The methods that may
    download take the ``backend`` that serves the URL (the caller routes); the cache calls only
    its ``download`` and ``check_auth``. All public coroutines raise :class:`StorageError`.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        max_bytes: int,
        on_event: EventFn | None = None,
        progress_interval_s: float = 5.0,
    ) -> None:
        self.dir = Path(cache_dir).absolute()
        self.max_bytes = max_bytes
        self._on_event = on_event
        self._progress_interval = progress_interval_s
        self._entries: dict[str, CacheEntry] = {}
        self._clock = 0  # the last ``CacheEntry.last_use`` handed out
        self._inflight: dict[str, asyncio.Task[CacheEntry]] = {}
        self._partials: dict[str, Path] = {}  # key -> temp directory of its download
        self._urls: dict[str, str] = {}  # key -> scrubbed URL of its download in flight
        self._waiters: Counter[str] = Counter()  # key -> callers waiting for its download
        self._leases: Counter[str] = Counter()
        self._index_lock = asyncio.Lock()
        self._evict_lock = asyncio.Lock()
        self._evict_task: asyncio.Task[None] | None = None
        self._evict_again = False
        self._flush_task: asyncio.Task[None] | None = None
        self.downloads_started = 0

    # --- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directory, drop partial downloads, load the index, adopt files from a
        comfyui-api volume, and evict down to the limit."""
        await asyncio.to_thread(self._load)
        await self._save_index()
        await self.evict()

    async def close(self) -> None:
        """Cancel downloads in flight and background work; write the index."""
        tasks: list[asyncio.Task[Any]] = list(self._inflight.values())
        for extra in (self._evict_task, self._flush_task):
            if extra is not None:
                tasks.append(extra)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._save_index()

    def _load(self) -> None:
        """Rebuild the in-memory state from ``CACHE_DIR`` at start-up: drop partial downloads,
        read the index (dropping truncated entries), adopt unindexed cache files (comfyui-api's
        or a lost index's), then renumber the LRU order."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_partials()
        for key, entry in self._read_index().entries.items():
            if self._intact(entry):
                self._entries[key] = entry
        self._adopt_unindexed()
        # Renumber the LRU order 1..n: keeps a version-2 order; entries without a counter
        # (a version-1 index, adopted files) come first, ordered by their last-use time.
        ordered = sorted(self._entries.values(), key=lambda e: (e.last_use, e.last_used_ms))
        for n, entry in enumerate(ordered, 1):
            entry.last_use = n
        self._clock = len(ordered)

    def _remove_partials(self) -> None:
        """Delete what interrupted downloads left (``PARTIAL_PREFIX`` files and directories)."""
        for child in self.dir.iterdir():
            if child.name.startswith(PARTIAL_PREFIX):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def _read_index(self) -> _Index:
        """The index file, or an empty index when it is missing or unreadable."""
        path = self.dir / INDEX_NAME
        if path.exists():
            try:
                return msgspec.json.decode(path.read_bytes(), type=_Index)
            except (msgspec.DecodeError, OSError) as exc:
                log.warning("cache index unreadable, rebuilding it: %s", exc)
        return _Index()

    def _intact(self, entry: CacheEntry) -> bool:
        """True when the entry's file exists with the indexed size; a truncated file (a crash
        mid-write) is deleted, never served."""
        try:
            size = (self.dir / entry.file).stat().st_size
        except OSError:
            return False
        if size != entry.size:
            log.warning(
                "cache entry %s has %d of %d bytes; dropping it", entry.file, size, entry.size
            )
            (self.dir / entry.file).unlink(missing_ok=True)
            return False
        return True

    def _adopt_unindexed(self) -> None:
        """Add an entry for every cache-named file the index does not know, with the URL and
        auth flag of its comfyui-api ``.meta`` sidecar when there is one (else url "unknown")."""
        known = {e.file for e in self._entries.values()}
        for child in sorted(self.dir.iterdir()):
            name = child.name
            if name in known or name.endswith(".meta") or not _CACHE_NAME.match(name):
                continue
            if not child.is_file() or child.is_symlink() or name[:32] in self._entries:
                continue
            url, auth_required = _read_meta(child.with_name(name + ".meta"))
            st = child.stat()
            self._entries[name[:32]] = CacheEntry(
                file=name,
                url=url,
                size=st.st_size,
                created_ms=int(st.st_mtime * 1000),
                last_used_ms=int(st.st_mtime * 1000),
                auth_required=auth_required,
            )

    # --- index ---------------------------------------------------------------------------

    async def _save_index(self) -> None:
        """Write the index. Raises :class:`DiskFullError` when the cache's file system is
        full (ENOSPC, EDQUOT); the partial index file is removed."""
        async with self._index_lock:
            data = msgspec.json.encode(_Index(entries=dict(self._entries)))
            try:
                await asyncio.to_thread(self._write_index, data)
            except OSError as exc:
                if is_disk_full(exc):
                    raise DiskFullError("no space left in the cache for its index") from None
                raise

    async def _index_new(self, key: str, entry: CacheEntry) -> None:
        """Add ``entry`` (its file just renamed into the cache) to the index and write it.
        When the index cannot be written (:class:`DiskFullError`, answered 507) the file is
        removed and the entry dropped: a file the written index does not name would be
        adopted at the next start without its URL or ``auth_required`` (a gated file
        served to callers without credentials), and it holds space the full disk needs."""
        self._entries[key] = entry
        try:
            await self._save_index()
        except Exception:
            if self._entries.get(key) is entry:
                del self._entries[key]
            await asyncio.to_thread(functools.partial((self.dir / entry.file).unlink, True))
            raise

    def _write_index(self, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX + "index-", dir=self.dir)
        try:
            # No fsync: on ext4 (data=ordered) it would also force out every freshly
            # downloaded byte, doubling a miss's time. rename() keeps the index whole;
            # after a power loss a stale index is corrected by the size check and scan
            # in start().
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.dir / INDEX_NAME)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _touch(self, entry: CacheEntry) -> None:
        entry.last_used_ms = _now_ms()
        entry.last_use = self._tick()
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(2.0)
        await self._save_index()

    # --- lookups -------------------------------------------------------------------------

    def lease(self) -> Lease:
        """A new, empty lease (see :class:`Lease`)."""
        return Lease(self._leases)

    def entry(self, url: str) -> CacheEntry | None:
        """The index entry of ``url``, if cached."""
        return self._entries.get(cache_key(url))

    def entries(self) -> dict[str, CacheEntry]:
        """A copy of the index: key -> entry."""
        return dict(self._entries)

    def progress(self, url: str) -> int | None:
        """Bytes of ``url`` downloaded so far, or None when no download of it is in flight.
        Works for every backend: it counts the download's private temp directory (Hugging
        Face and S3 write their own part files there). The total is not known to the cache."""
        return self.progress_by_key(cache_key(url))

    def progress_by_key(self, key: str) -> int | None:
        """:meth:`progress` by cache key (:func:`cache_key`, e.g. ``GET /download/{key}``)."""
        tmpdir = self._partials.get(key)
        return None if tmpdir is None else _tree_size(tmpdir)

    async def get(
        self,
        url: str,
        auth: DownloadAuth | None,
        backend: Backend,
        lease: Lease | None = None,
        *,
        adopt: Path | None = None,
    ) -> Path:
        """Path of ``url``'s cache file, downloading it once through ``backend`` if needed.

        Concurrent calls for one URL share a single download, stopped when every one of
        them was cancelled (see :meth:`_wait_download`). An entry that needed caller
        auth is served only after ``backend.check_auth(url, auth)`` accepts the caller's auth.
        With ``lease`` the entry is held until the lease is released (the hold is dropped again
        when this raises). ``adopt``, a local file known to be ``url``'s download (see
        :meth:`stage_model`), is taken into the cache instead of downloading, when no entry
        exists. Raises :class:`StorageError`.
        """
        key = cache_key(url)
        if lease is not None:
            lease.hold(key)
        try:
            return await self._get(key, url, auth, backend, adopt)
        except BaseException:
            if lease is not None:
                lease.drop(key)
            raise

    async def _get(
        self,
        key: str,
        url: str,
        auth: DownloadAuth | None,
        backend: Backend,
        adopt: Path | None = None,
    ) -> Path:
        while True:
            entry = self._entries.get(key)
            if entry is not None:
                path = self.dir / entry.file
                if not os.path.exists(path):
                    self._entries.pop(key, None)
                    continue
                if entry.auth_required:
                    await backend.check_auth(url, auth)
                self._touch(entry)
                metrics.cache_request("hit")
                return path
            task = self._inflight.get(key)
            if task is not None:
                await self._wait_download(key, task)
                continue
            # Registered before any await: every later caller finds it.
            task = asyncio.create_task(self._download(key, url, auth, backend, adopt))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._download_done, key))
            entry = await self._wait_download(key, task)
            return self.dir / entry.file

    async def _wait_download(self, key: str, task: asyncio.Task[CacheEntry]) -> CacheEntry:
        """Wait for ``key``'s download ``task``, shared by every caller waiting for that URL.

        A caller cancelled while it waits (its job interrupted or past PROMPT_TIMEOUT_S)
        leaves the download to the others; when it was the last one, the download is stopped:
        forgotten (a later caller starts afresh), cancelled (the backend cuts its connection)
        and awaited, so its temp directory is gone before this raises
        :class:`asyncio.CancelledError`. A download still wanted by another caller -- a job
        waiting for the same URL, ``POST /download``, the manifest -- is never stopped for one
        that left."""
        self._waiters[key] += 1
        counted = True
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            counted = False
            if self._leave(key) == 0 and not task.done() and self._inflight.get(key) is task:
                del self._inflight[key]
                task.cancel()
                log.info("stopped downloading %s: no caller waits for it", self._url_of(key))
                await asyncio.wait({task})
            raise
        finally:
            if counted:
                self._leave(key)

    def _leave(self, key: str) -> int:
        """One caller stopped waiting for ``key``'s download; how many still wait."""
        self._waiters[key] -= 1
        left = self._waiters[key]
        if left <= 0:
            del self._waiters[key]
        return left

    def _url_of(self, key: str) -> str:
        """The URL (scrubbed) of ``key``'s download in flight, for the log."""
        return self._urls.get(key, key)

    def _download_done(self, key: str, task: asyncio.Task[CacheEntry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved; callers re-raise it

    async def _download(
        self,
        key: str,
        url: str,
        auth: DownloadAuth | None,
        backend: Backend,
        adopt: Path | None = None,
    ) -> CacheEntry:
        """Download ``url`` (or take the local file ``adopt``, a file named by ``url``'s cache
        name left in a model folder by an earlier cache: hardlinked, copied across file
        systems, no download) into a private temp directory, rename it into place and index
        it. ``auth_required`` is the backend's word that the caller's credentials were used
        (for an adopted file: that the caller gave some; it may be gated). A full disk raises
        :class:`DiskFullError`; nothing of a failed download is left behind (the temp
        directory is removed)."""
        clean = scrub_url(url)
        tmpdir = await self._make_tmpdir(key)
        dest = tmpdir / "data"
        started = time.monotonic()
        monitor: asyncio.Task[None] | None = None
        if adopt is None:
            self.downloads_started += 1
            metrics.cache_request("miss")
            self._partials[key] = tmpdir
            self._urls[key] = clean
            log.info("downloading %s", clean)
            monitor = asyncio.create_task(self._report_progress(key, clean, started))
        try:
            if adopt is None:
                name, used_auth = await self._fetch_into(url, dest, auth, backend)
            else:
                try:
                    await asyncio.to_thread(link_or_copy, adopt, dest)
                except OSError as exc:
                    raise _disk_error(exc, "adopting a model file") from None
                name, used_auth = adopt.name, auth is not None
            size = dest.stat().st_size
            final = self.dir / name
            os.replace(dest, final)
            now = _now_ms()
            entry = CacheEntry(
                file=name,
                url=clean,
                size=size,
                created_ms=now,
                last_used_ms=now,
                last_use=self._tick(),
                auth_required=used_auth,
            )
            await self._index_new(key, entry)
            duration = time.monotonic() - started
            if adopt is None:
                metrics.download_finished(backend.name, size, duration)
                mbps = size / 1e6 / duration if duration > 0 else 0.0
                log.info(
                    "downloaded %s: %d bytes in %.2f s (%.1f MB/s)", clean, size, duration, mbps
                )
                self.emit(
                    "file_downloaded",
                    {"url": clean, "local_path": str(final), "size": size, "duration": duration},
                )
            else:
                metrics.cache_request("hit")
                log.info(
                    "adopted %s (%d bytes) from the model folder without downloading it",
                    clean,
                    size,
                )
            self._schedule_evict()
            return entry
        finally:
            if monitor is not None:
                monitor.cancel()
                if self._partials.get(key) == tmpdir:  # not a fresh download of the same URL's
                    del self._partials[key]
                    self._urls.pop(key, None)
            await asyncio.to_thread(shutil.rmtree, tmpdir, True)

    @staticmethod
    async def _fetch_into(
        url: str, dest: Path, auth: DownloadAuth | None, backend: Backend
    ) -> tuple[str, bool]:
        """Download ``url`` to ``dest`` through ``backend``; (its cache file name, whether the
        caller's credentials were used). Raises :class:`StorageError`
        (:class:`DiskFullError` for a full disk)."""
        try:
            result = await backend.download(url, dest, auth)
        except StorageError:
            raise
        except OSError as exc:
            if is_disk_full(exc):
                raise _disk_error(exc, "download") from None
            raise BackendError(f"download failed: {exc.strerror or type(exc).__name__}") from None
        return cache_name(url, result.ext), result.used_caller_auth

    async def _make_tmpdir(self, key: str) -> Path:
        """A private temp directory for ``key``'s download in ``CACHE_DIR``, made off the
        event loop; a caller cancelled meanwhile (its download stopped at once) removes it
        before it raises, so a stopped download leaves no partial directory behind."""
        made = asyncio.ensure_future(
            asyncio.to_thread(tempfile.mkdtemp, f"{key}-", PARTIAL_PREFIX, self.dir)
        )
        try:
            return Path(await asyncio.shield(made))
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(shutil.rmtree, await made, True)
            raise

    async def _report_progress(self, key: str, clean: str, started: float) -> None:
        while True:
            await asyncio.sleep(self._progress_interval)
            done = self.progress_by_key(key) or 0
            elapsed = time.monotonic() - started
            log.info(
                "downloading %s: %.1f MB so far (%.1f MB/s)",
                clean,
                done / 1e6,
                done / 1e6 / elapsed if elapsed > 0 else 0.0,
            )

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Pass a storage event to ``on_event`` (see :data:`EventFn`); a failing handler is
        logged, never raised. Storage sends its ``file_uploaded`` through here too."""
        if self._on_event is None:
            return
        try:
            self._on_event(name, data)
        except Exception:
            log.exception("storage event handler failed for %s", name)

    # --- eviction ------------------------------------------------------------------------

    def _schedule_evict(self) -> None:
        if self.max_bytes <= 0:
            return
        if self._evict_task is not None and not self._evict_task.done():
            self._evict_again = True
            return
        self._evict_task = asyncio.create_task(self._evict_loop())

    async def _evict_loop(self) -> None:
        while True:
            self._evict_again = False
            try:
                await self.evict()
            except Exception:
                log.exception("cache eviction failed")
            if not self._evict_again:
                return

    def total_bytes(self) -> int:
        """Bytes of the files in the cache (its index)."""
        return sum(e.size for e in self._entries.values())

    def disk_space(self) -> tuple[int, int] | None:
        """``(size, avail)`` in bytes of the filesystem holding the cache directory (avail:
        what an unprivileged writer may still use, statvfs ``f_bavail``); None when it cannot
        be read (the directory is gone)."""
        try:
            usage = shutil.disk_usage(self.dir)
        except OSError:
            return None
        return usage.total, usage.free

    async def evict(self) -> list[str]:
        """Delete least-recently-used entries until the total is within ``max_bytes``; never
        a leased or downloading entry. Links we made to an evicted file are removed too (so
        the space is really freed). Returns the evicted keys."""
        if self.max_bytes <= 0:
            return []
        evicted: list[str] = []
        async with self._evict_lock:
            total = self.total_bytes()
            order = sorted(self._entries.items(), key=lambda kv: kv[1].last_use)
            for key, entry in order:
                if total <= self.max_bytes:
                    break
                if self._leases.get(key, 0) > 0 or key in self._inflight:
                    continue
                started = time.monotonic()
                path = self.dir / entry.file
                self._entries.pop(key, None)
                await asyncio.to_thread(_remove_entry, path, entry.links)
                total -= entry.size
                evicted.append(key)
                log.info("evicted %s (%d bytes)", entry.url, entry.size)
                self.emit(
                    "file_deleted",
                    {
                        "url": entry.url,
                        "local_path": str(path),
                        "size": entry.size,
                        "duration": time.monotonic() - started,
                    },
                )
            if evicted:
                await self._save_index()
        return evicted

    # --- staging -------------------------------------------------------------------------

    async def stage_input(
        self,
        url: str,
        auth: DownloadAuth | None,
        backend: Backend,
        input_dir: Path,
        name: str,
        lease: Lease | None = None,
    ) -> str:
        """Hardlink (copy if that fails) ``url``'s cache file to ``input_dir/name``, replacing
        what is there. ``name`` may contain ``/`` but no ``..``. Returns ``name`` (relative to
        ``input_dir``, what a ``LoadImage`` input takes). The link is not tracked: delete it
        when the job ends (a hardlink keeps the bytes on disk after eviction)."""
        check_name(name, "input name", allow_slash=True)
        if name.startswith("/") or not name.strip("/"):
            raise BadRequestError("input name: must be a relative file name")
        dest = Path(input_dir) / name
        await self._stage(url, auth, backend, lambda _src: dest, lease, job_input=True)
        return name

    async def stage_model(
        self,
        url: str,
        auth: DownloadAuth | None,
        backend: Backend,
        folder_dir: Path,
        lease: Lease | None = None,
    ) -> str:
        """Link ``url``'s cache file into ``folder_dir`` under the cache file name (hardlink,
        else symlink, else copy). Returns that file name, which ComfyUI will list.

        A file already in ``folder_dir`` under that name (what an earlier container leaves
        when the models volume outlives ``CACHE_DIR``) is ``url``'s download: it is adopted
        into the cache without downloading when the backend's cheap size check
        (``remote_size``, an HTTP HEAD) agrees or has no answer, and replaced atomically by a
        fresh download when the sizes differ. Raises :class:`StorageError`."""
        folder = Path(folder_dir)
        adopt: Path | None = None
        key = cache_key(url)
        if key not in self._entries and key not in self._inflight:
            found = await asyncio.to_thread(_cache_named_file, folder, url)
            if found is not None and await _size_agrees(backend, url, auth, found):
                adopt = found
        dest = await self._stage(
            url, auth, backend, lambda src: folder / src.name, lease, adopt=adopt
        )
        return dest.name

    async def link(
        self,
        url: str,
        auth: DownloadAuth | None,
        backend: Backend,
        dest: Path,
        lease: Lease | None = None,
    ) -> Path:
        """Link ``url``'s cache file at exactly ``dest`` (manifest ``local_path``, /download
        ``filename``). A link there to another URL's entry is replaced; a foreign file or a
        directory is not (:class:`CacheConflictError`). Returns ``dest``."""
        return await self._stage(url, auth, backend, lambda _src: Path(dest), lease)

    async def _stage(
        self,
        url: str,
        auth: DownloadAuth | None,
        backend: Backend,
        dest_for: Callable[[Path], Path],
        lease: Lease | None,
        *,
        job_input: bool = False,
        adopt: Path | None = None,
    ) -> Path:
        """Get ``url`` and link its cache file ``src`` at ``dest_for(src)``, held by ``lease``
        (or a lease of its own) meanwhile. A ``job_input`` link is never a symlink, replaces
        anything and is not recorded; other links replace only ours and are recorded."""
        own = lease or self.lease()
        try:
            src = await self.get(url, auth, backend, own, adopt=adopt)
            dest = dest_for(src)
            await self._place(
                src,
                dest,
                allow_symlink=not job_input,
                replace="any" if job_input else "ours",
                record=not job_input,
            )
            return dest
        finally:
            if lease is None:
                own.release()

    async def _place(
        self, src: Path, dest: Path, *, allow_symlink: bool, replace: str, record: bool
    ) -> None:
        """Link ``src`` at ``dest``. With ``record`` the link is remembered in the index
        (model folders, exact paths: a bounded set) and removed when the entry is evicted;
        per-job input links are not recorded — the pipeline deletes them after the job."""
        ours = {link for e in self._entries.values() for link in e.links}
        await asyncio.to_thread(_link_file, src, dest, allow_symlink, replace, ours, self.dir)
        entry = self._entries.get(src.name[:32])
        if record and entry is not None and str(dest) not in entry.links:
            entry.links.append(str(dest))
            self._touch(entry)


def _remove_entry(path: Path, links: list[str]) -> None:
    for link in links:
        try:
            if os.path.islink(link):
                if os.path.realpath(link) == str(path):
                    os.unlink(link)
            elif os.path.exists(path) and os.path.samefile(link, path):
                os.unlink(link)
        except OSError:
            pass
    with contextlib.suppress(OSError):
        path.unlink()


def _link_file(
    src: Path, dest: Path, allow_symlink: bool, replace: str, ours: set[str], cache_dir: Path
) -> None:
    """Put ``src`` at ``dest`` atomically: hardlink, else symlink (if allowed), else copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dest):
        try:
            if os.path.samefile(src, dest):
                return
        except OSError:
            pass
        if replace == "ours":
            is_ours = (
                os.path.islink(dest)
                or str(dest) in ours
                or os.path.dirname(os.path.realpath(dest)) == str(cache_dir)
                # named by the URL's hash: that URL's download from an earlier cache
                or (dest.name == src.name and bool(_CACHE_NAME.match(dest.name)))
            )
            if not is_ours:
                raise CacheConflictError(f"{dest.name}: exists and is not a cache link")
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise CacheConflictError(f"{dest.name}: is a directory")
    try:
        link_or_copy(src, dest, atomic=True, symlink=allow_symlink)
    except OSError as exc:
        if is_disk_full(exc):  # copied onto a full file system
            raise DiskFullError(f"{dest.name}: no space left to copy it in place") from None
        raise StorageError(f"{dest.name}: cannot link ({exc.strerror})") from None


def place_job_input(src: Path, dest: Path) -> None:
    """Put ``src`` at ``dest`` the way a job's input is placed: atomically, as a hardlink (a
    copy when one cannot be made, e.g. across file systems), never a symlink (ComfyUI >= 0.28
    refuses those), replacing whatever file is there. Blocking: call it in a thread. Raises
    :class:`DiskFullError` (nothing half-written is left) or :class:`StorageError`."""
    _link_file(src, dest, False, "any", set(), src.parent)


def _disk_error(exc: OSError, what: str) -> StorageError:
    """The storage error for ``exc``: :class:`DiskFullError` for ENOSPC / EDQUOT, else a
    plain :class:`StorageError`; the message names no path."""
    if is_disk_full(exc):
        return DiskFullError(f"{what} failed: no space left on the cache's disk (CACHE_DIR)")
    return StorageError(f"{what} failed: {exc.strerror or type(exc).__name__}")


def _cache_named_file(folder: Path, url: str) -> Path | None:
    """A regular file (not a link) in ``folder`` named by ``url``'s cache name: exactly
    :func:`cache_name` when the URL path has an extension, else the key with any extension
    (the one the download would have taken from its headers)."""
    key = cache_key(url)
    exact = cache_name(url)
    names = [exact] if exact != key else []
    if not names:
        with contextlib.suppress(OSError):
            names = sorted(
                child.name
                for child in folder.iterdir()
                if child.name == key or (child.name.startswith(key + ".") and len(child.name) > 33)
            )
    for name in names:
        path = folder / name
        if path.is_file() and not path.is_symlink():
            return path
    return None


async def _size_agrees(backend: Backend, url: str, auth: DownloadAuth | None, found: Path) -> bool:
    """Whether ``found`` may be taken as ``url``'s download: True when the backend's cheap
    size check (an optional ``remote_size(url, auth) -> int | None`` coroutine, e.g. an HTTP
    HEAD) gives ``found``'s size or no size, or cannot be reached (5xx, connection refused);
    False when it gives another size. A refusal (not found, bad credentials) is raised."""
    remote_size = getattr(backend, "remote_size", None)
    if remote_size is None:
        return True
    try:
        size = await remote_size(url, auth)
    except BackendError as exc:
        log.info("size check of %s failed (%s); adopting the local file", scrub_url(url), exc)
        return True
    local = found.stat().st_size
    if size is not None and size != local:
        log.warning(
            "%s in the model folder has %d bytes, the URL %d; downloading it again",
            found.name,
            local,
            size,
        )
        return False
    return True


def _tree_size(path: Path) -> int:
    """Bytes written to the regular files under ``path`` (a file or directory); 0 when
    missing. A sparse file (ranged downloads write pieces out of order into one) counts its
    allocated blocks, not its length."""
    try:
        if path.is_file():
            return _written(path.stat())
        total = 0
        for root, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += _written(os.lstat(os.path.join(root, name)))
        return total
    except OSError:
        return 0


def _written(st: os.stat_result) -> int:
    return min(st.st_size, st.st_blocks * 512)


__all__ = [
    "CacheEntry",
    "DownloadCache",
    "Lease",
    "cache_key",
    "cache_name",
]
