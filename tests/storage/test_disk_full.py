"""A full cache disk (a real, tiny tmpfs): the download and the index write fail with
DiskFullError (answered 507), say so without a server path, and leave no partial entry."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from comfy_sidecar.storage import DiskFullError
from comfy_sidecar.storage.cache import INDEX_NAME, PARTIAL_PREFIX
from tests.conftest import fill_up
from tests.storage.servers import FileServer

PAGE = os.sysconf("SC_PAGE_SIZE")


def test_a_download_larger_than_the_disk_is_disk_full(
    make_storage: Any, http_server: FileServer, small_tmpfs: Callable[[int], Path]
) -> None:
    cache_dir = small_tmpfs(1 << 20)
    http_server.files["big.bin"] = os.urandom(2 << 20)

    async def main() -> None:
        storage = make_storage(CACHE_DIR=str(cache_dir))
        await storage.start()
        try:
            with storage.lease() as lease, pytest.raises(DiskFullError) as caught:
                await storage.fetch(http_server.url("/files/big.bin"), None, lease)
            assert str(cache_dir) not in str(caught.value)
            assert storage.cache.entries() == {}
            assert sorted(p.name for p in cache_dir.iterdir()) == [INDEX_NAME]  # no partial
        finally:
            await storage.close()

    asyncio.run(main())


def test_an_index_write_on_a_full_disk_is_disk_full(
    make_storage: Any, http_server: FileServer, small_tmpfs: Callable[[int], Path]
) -> None:
    cache_dir = small_tmpfs(1 << 20)
    http_server.files["fits.bin"] = b"x" * (2 * PAGE)  # exactly the room left: the index is not

    async def main() -> None:
        storage = make_storage(CACHE_DIR=str(cache_dir))
        await storage.start()
        filler = fill_up(cache_dir, leave_bytes=2 * PAGE)
        try:
            with storage.lease() as lease, pytest.raises(DiskFullError) as caught:
                await storage.fetch(http_server.url("/files/fits.bin"), None, lease)  # was OSError
            assert str(cache_dir) not in str(caught.value)
            partials = [p for p in cache_dir.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
            assert partials == []  # not even the index's temporary file
        finally:
            filler.unlink()
            await storage.close()

    asyncio.run(main())


def test_a_download_whose_index_cannot_be_written_leaves_no_file(
    make_storage: Any, http_server: FileServer, small_tmpfs: Callable[[int], Path]
) -> None:
    """The file downloads (it fits exactly) but the index cannot be written: the 507 leaves
    no cache file the written index does not name. Such a file was adopted at the next start
    without its URL or auth flag (a gated download then served to anyone) and held the space
    the full disk needed. Once there is room, the same URL downloads and is indexed."""
    cache_dir = small_tmpfs(1 << 20)
    http_server.files["fits.bin"] = b"x" * (2 * PAGE)
    url = http_server.url("/files/fits.bin")

    async def main() -> None:
        storage = make_storage(CACHE_DIR=str(cache_dir))
        await storage.start()
        filler = fill_up(cache_dir, leave_bytes=2 * PAGE)
        try:
            with storage.lease() as lease, pytest.raises(DiskFullError):
                await storage.fetch(url, None, lease)
            assert sorted(p.name for p in cache_dir.iterdir()) == [INDEX_NAME, "filler"]
            assert storage.cache.entries() == {}
            filler.unlink()
            with storage.lease() as lease:
                path = await storage.fetch(url, None, lease)
            assert path.read_bytes() == http_server.files["fits.bin"]
        finally:
            filler.unlink(missing_ok=True)
            await storage.close()
        again = make_storage(CACHE_DIR=str(cache_dir))  # the next start reads the index
        await again.start()
        try:
            (entry,) = again.cache.entries().values()
            assert entry.url == url and entry.file == path.name
        finally:
            await again.close()

    asyncio.run(main())


def test_copying_an_input_onto_a_full_disk_is_disk_full(
    make_storage: Any, http_server: FileServer, small_tmpfs: Callable[[int], Path]
) -> None:
    input_dir = small_tmpfs(64 * 1024)  # another file system than the cache: a copy, no link
    filler = fill_up(input_dir)
    http_server.files["in.bin"] = os.urandom(256 * 1024)

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            with storage.lease() as lease, pytest.raises(DiskFullError) as caught:
                url = http_server.url("/files/in.bin")
                await storage.stage_input(url, None, input_dir, "job1_1.bin", lease)
            assert str(input_dir) not in str(caught.value)
            assert sorted(input_dir.iterdir()) == [filler]  # no partial copy
        finally:
            await storage.close()

    asyncio.run(main())
