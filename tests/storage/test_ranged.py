"""Parallel ranged HTTP downloads (comfy_sidecar/storage/backends/ranged.py) through the cache,
against the loopback FileServer's ``/ranged/`` route. The size threshold and piece size are
lowered so a 3 MiB file takes the ranged path in 12 pieces."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from comfy_sidecar.storage import BackendError, Storage
from comfy_sidecar.storage.backends.ranged import expected_digests
from comfy_sidecar.storage.cache import INDEX_NAME
from tests.storage.servers import FileServer

SIZE = 3 << 20
PIECE = 256 << 10


def ranged_gets(server: FileServer) -> list[str]:
    """The Range headers of the GETs the server saw (one per ranged request)."""
    with server.lock:
        return [h["Range"] for m, p, h in server.requests if m == "GET" and "Range" in h]


def run(make_storage: Any, body: Callable[[Storage], Awaitable[None]], **env: str) -> None:
    async def main() -> None:
        storage = make_storage(**env)
        storage.http.ranged_min_bytes = 1 << 20
        storage.http.ranged_piece_bytes = PIECE
        storage.http.ranged_one_stream_bps = None
        await storage.start()
        try:
            await body(storage)
        finally:
            await storage.close()

    asyncio.run(main())


def assert_nothing_left(storage: Storage, url: str) -> None:
    assert storage.cache.entry(url) is None
    assert [p.name for p in storage.cache.dir.iterdir() if p.name != INDEX_NAME] == []


def test_ranged_download_uses_parallel_ranges(make_storage: Any, http_server: FileServer) -> None:
    data = os.urandom(SIZE)
    http_server.files["m.bin"] = data
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    http_server.headers["m.bin"] = {"Content-MD5": md5}

    async def body(storage: Storage) -> None:
        url = http_server.url("/ranged/m.bin")
        path = await storage.fetch(url, None)
        assert path.read_bytes() == data
        assert storage.cache.entry(url) is not None

    run(make_storage, body, DOWNLOAD_CONNECTIONS="4")
    ranges = ranged_gets(http_server)
    assert len(ranges) == SIZE // PIECE - 1  # every piece but the first stream's
    assert f"bytes={PIECE}-{2 * PIECE - 1}" in ranges


def test_small_file_and_one_connection_use_one_get(
    make_storage: Any, http_server: FileServer
) -> None:
    http_server.files["m.bin"] = os.urandom(SIZE)
    http_server.files["s.bin"] = b"small"

    async def body(storage: Storage) -> None:
        assert (await storage.fetch(http_server.url("/ranged/s.bin"), None)).read_bytes() == (
            b"small"
        )
        path = await storage.fetch(http_server.url("/ranged/m.bin"), None)
        assert path.read_bytes() == http_server.files["m.bin"]

    run(make_storage, body, DOWNLOAD_CONNECTIONS="1")
    assert ranged_gets(http_server) == []
    assert http_server.count("GET", "/ranged/") == 2


def test_cut_piece_is_resumed_by_range(make_storage: Any, http_server: FileServer) -> None:
    data = os.urandom(SIZE)
    http_server.files["m.bin"] = data
    http_server.cut_ranges = 1

    async def body(storage: Storage) -> None:
        path = await storage.fetch(http_server.url("/ranged/m.bin"), None)
        assert path.read_bytes() == data

    run(make_storage, body)
    assert http_server.cut_ranges == 0  # the cut happened
    ranges = ranged_gets(http_server)
    # the resumption starts half-way into a piece: not on a piece boundary
    resumed = [r for r in ranges if int(r[6:].split("-")[0]) % PIECE]
    assert len(resumed) == 1
    assert len(ranges) == SIZE // PIECE


def test_cuts_beyond_retries_fail(make_storage: Any, http_server: FileServer) -> None:
    http_server.files["m.bin"] = os.urandom(SIZE)
    http_server.cut_ranges = 1000

    async def body(storage: Storage) -> None:
        url = http_server.url("/ranged/m.bin")
        with pytest.raises(BackendError, match="interrupted"):
            await storage.fetch(url, None)
        assert_nothing_left(storage, url)

    run(make_storage, body)


def test_fast_first_stream_stays_one_stream(make_storage: Any, http_server: FileServer) -> None:
    data = os.urandom(SIZE)
    http_server.files["m.bin"] = data

    async def body(storage: Storage) -> None:
        storage.http.ranged_one_stream_bps = 1.0  # any link is "fast"
        assert (await storage.fetch(http_server.url("/ranged/m.bin"), None)).read_bytes() == data

    run(make_storage, body)
    assert ranged_gets(http_server) == []


def test_server_ignoring_range_falls_back_to_one_stream(
    make_storage: Any, http_server: FileServer
) -> None:
    data = os.urandom(SIZE)
    http_server.files["m.bin"] = data
    http_server.range_mode = "ignore"

    async def body(storage: Storage) -> None:
        path = await storage.fetch(http_server.url("/ranged/m.bin"), None)
        assert path.read_bytes() == data

    run(make_storage, body)
    # the workers stop at their first 200; the first response is read to the end
    assert len(ranged_gets(http_server)) <= 7


def test_length_mismatch_is_refused(make_storage: Any, http_server: FileServer) -> None:
    http_server.files["m.bin"] = os.urandom(SIZE)
    http_server.range_mode = "wrong_total"

    async def body(storage: Storage) -> None:
        url = http_server.url("/ranged/m.bin")
        with pytest.raises(BackendError, match="length mismatch"):
            await storage.fetch(url, None)
        assert_nothing_left(storage, url)

    run(make_storage, body)


@pytest.mark.parametrize(
    "header",
    ["Content-MD5", "x-amz-checksum-sha256", "x-amz-checksum-crc32", "ETag"],
)
def test_checksum_mismatch_is_refused(
    make_storage: Any, http_server: FileServer, header: str
) -> None:
    data = os.urandom(SIZE)
    other = b"not the content"
    http_server.files["m.bin"] = data
    value = {
        "Content-MD5": base64.b64encode(hashlib.md5(other).digest()).decode(),
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(other).digest()).decode(),
        "x-amz-checksum-crc32": "AAAAAA==",
        "ETag": f'"{hashlib.md5(other).hexdigest()}"',
    }[header]
    http_server.headers["m.bin"] = {header: value, "x-amz-request-id": "r1"}

    async def body(storage: Storage) -> None:
        url = http_server.url("/ranged/m.bin")
        with pytest.raises(BackendError, match="does not match"):
            await storage.fetch(url, None)
        assert_nothing_left(storage, url)

    run(make_storage, body)


def test_matching_checksums_are_accepted(make_storage: Any, http_server: FileServer) -> None:
    data = os.urandom(SIZE)
    http_server.files["m.bin"] = data
    http_server.headers["m.bin"] = {
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(data).digest()).decode(),
        "ETag": f'"{hashlib.md5(data).hexdigest()}"',
        "x-amz-request-id": "r1",
    }

    async def body(storage: Storage) -> None:
        assert (await storage.fetch(http_server.url("/ranged/m.bin"), None)).read_bytes() == data

    run(make_storage, body)


def test_which_etags_are_checksums() -> None:
    md5 = "0" * 31 + "a"
    s3 = {"x-amz-request-id": "r"}
    assert expected_digests({**s3, "etag": f'"{md5}"'}) == {"md5": bytes.fromhex(md5)}
    assert expected_digests({**s3, "etag": f'"{md5}-12"'}) == {}  # multipart
    assert expected_digests({**s3, "etag": f'W/"{md5}"'}) == {}  # weak
    kms = {**s3, "etag": f'"{md5}"', "x-amz-server-side-encryption": "aws:kms"}
    assert expected_digests(kms) == {}
    assert expected_digests({"etag": f'"{md5}"'}) == {}  # not S3: opaque
    assert expected_digests({"x-amz-checksum-sha256": "abc=-3"}) == {}  # composite


def test_progress_of_a_ranged_download(make_storage: Any, http_server: FileServer) -> None:
    """``cache.progress`` reports the bytes written so far, not the sparse file's length."""
    data = os.urandom(SIZE)
    http_server.files["m.bin"] = data
    http_server.throttle_bps = 256 << 10  # 8 connections: about 1.5 s
    seen: list[int] = []

    async def body(storage: Storage) -> None:
        url = http_server.url("/ranged/m.bin")
        task = asyncio.create_task(storage.fetch(url, None))
        while not task.done():
            done = storage.cache.progress(url)
            if done:
                seen.append(done)
            await asyncio.sleep(0.01)
        assert (await task).read_bytes() == data

    run(make_storage, body)
    assert any(0 < n < SIZE for n in seen), seen
    assert all(n <= SIZE for n in seen)


def test_progress_counts_written_bytes_of_a_sparse_file(tmp_path: Path) -> None:
    from comfy_sidecar.storage.cache import _tree_size

    path = tmp_path / "data"
    with open(path, "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(32 << 20)
        fh.write(b"x" * (1 << 20))
    assert 1 << 20 <= _tree_size(tmp_path) < 2 << 20
