"""A full disk (a real, tiny tmpfs) under ASSET_DIR or the input directory: uploads, records and
staged copies fail with DiskFullError, name no path, and leave nothing half-written."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from comfy_sidecar.assets.store import MARKER
from comfy_sidecar.storage.errors import DiskFullError
from tests.assets.support import chunks_of, files, read_all, started, walk
from tests.conftest import fill_up

PAGE = os.sysconf("SC_PAGE_SIZE")


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in walk(root) if p.name not in (MARKER, "filler"))


def test_an_upload_larger_than_the_disk_is_disk_full_and_leaves_nothing(
    small_tmpfs: Callable[[int], Path],
) -> None:
    root = small_tmpfs(1 << 20)

    async def main() -> None:
        async with started(root) as store:
            with pytest.raises(DiskFullError) as caught:
                await store.upload(chunks_of(os.urandom(2 << 20)), file_path="big.bin")
            assert str(root) not in str(caught.value)
            assert leftovers(root) == []
            assert len(store) == 0 and store.size_bytes == 0
            small = await store.upload(chunks_of(b"fits"), file_path="small.txt")  # room again
            assert await read_all(store, small.asset.id) == b"fits"

    asyncio.run(main())


def test_a_record_that_does_not_fit_takes_its_new_blob_with_it(
    small_tmpfs: Callable[[int], Path],
) -> None:
    root = small_tmpfs(1 << 20)
    data = os.urandom(2 * PAGE)  # exactly the room left: the blob fits, its record does not

    async def main() -> None:
        async with started(root) as store:
            filler = fill_up(root, leave_bytes=2 * PAGE)
            try:
                with pytest.raises(DiskFullError) as caught:
                    await store.upload(chunks_of(data), file_path="fits.bin")
                assert str(root) not in str(caught.value)
                assert leftovers(root) == []
                assert not store.has_hash("blake3:" + "0" * 64) and len(store) == 0
                assert store.size_bytes == 0
            finally:
                filler.unlink()

    asyncio.run(main())


def test_staging_a_copy_onto_a_full_input_disk_is_disk_full(
    tmp_path: Path, small_tmpfs: Callable[[int], Path]
) -> None:
    input_dir = small_tmpfs(64 * 1024)  # another file system than ASSET_DIR: a copy, no link
    fill_up(input_dir)

    async def main() -> None:
        async with started(tmp_path / "assets") as store:
            asset = (await store.upload(chunks_of(os.urandom(256 * 1024)), file_path="i.png")).asset
            with pytest.raises(DiskFullError) as caught:
                await store.stage(asset.id, input_dir / "job1" / "i.png")
            assert str(input_dir) not in str(caught.value)
            assert files(input_dir / "job1") == []  # no partial copy
            assert await read_all(store, asset.id)  # the asset itself is untouched

    asyncio.run(main())
