"""The asset store on real files: blake3 while streaming, dedup by hash, from-hash, holds and
LRU eviction, expiry, reads by range, staging, registered outputs hashed lazily, and what a
restart reads back."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from blake3 import blake3

from comfy_sidecar.assets import AssetStore, staged_file_name
from comfy_sidecar.assets.store import MARKER
from comfy_sidecar.errors import AssetNotFound, BlobNotFound, HashMismatch, InputError
from comfy_sidecar.storage.errors import OutputMissingError
from tests.assets.support import Clock, chunks_of, files, read_all, started, walk
from tests.waiting import async_wait_for


def b3(data: bytes) -> str:
    return "blake3:" + blake3(data).hexdigest()


def test_an_upload_is_hashed_with_blake3_as_it_streams_and_kept_whole(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 12345)  # several write pieces and a ragged end

    async def main() -> None:
        async with started(tmp_path / "assets") as store:
            created = await store.upload(chunks_of(data, 70001), file_path="photo.png")
            asset = created.asset
            assert created.created_new is True
            assert asset.hash == b3(data)
            assert asset.size_bytes == len(data)
            assert asset.content_type == "image/png"  # from the file name
            assert asset.file_path == "photo.png" and asset.job_id is None
            assert asset.created_at.tzinfo is not None and asset.expires_at is None
            assert await read_all(store, asset.id) == data
            assert files(tmp_path / "assets" / "blobs") == [blake3(data).hexdigest()]
            assert files(tmp_path / "assets" / "tmp") == []
            assert store.has_hash(b3(data)) and store.size_bytes == len(data)

    asyncio.run(main())


def test_the_same_bytes_again_are_a_dedup_hit_with_their_own_asset(tmp_path: Path) -> None:
    data = os.urandom(200_000)

    async def main() -> None:
        async with started(tmp_path / "assets") as store:
            first = await store.upload(chunks_of(data), file_path="a.png")
            again = await store.upload(
                chunks_of(data, 999), file_path="b.bin", content_type="image/webp"
            )
            assert (first.created_new, again.created_new) == (True, False)
            assert again.asset.id != first.asset.id
            assert again.asset.hash == first.asset.hash
            assert (again.asset.file_path, again.asset.content_type) == ("b.bin", "image/webp")
            assert len(files(tmp_path / "assets" / "blobs")) == 1  # one blob per hash
            assert store.size_bytes == len(data)
            await store.delete(first.asset.id)  # the other asset still has the bytes
            assert await read_all(store, again.asset.id) == data
            await store.delete(again.asset.id)
            assert files(tmp_path / "assets" / "blobs") == []
            assert not store.has_hash(b3(data))

    asyncio.run(main())


def test_from_hash_mints_an_asset_over_kept_bytes_and_refuses_unknown_ones(
    tmp_path: Path,
) -> None:
    data = b"some bytes the store has"

    async def main() -> None:
        async with started(tmp_path / "assets", retention_s=60) as store:
            original = (await store.upload(chunks_of(data), file_path="x.txt")).asset
            minted = await store.from_hash(b3(data).upper().replace("BLAKE3", "blake3"))
            assert minted.created_new is False
            assert minted.asset.id != original.id and minted.asset.hash == b3(data)
            assert (minted.asset.file_path, minted.asset.content_type) == ("x.txt", "text/plain")
            assert minted.asset.expires_at is not None
            renamed = await store.from_hash(b3(data), file_path="y.txt", tags=["input"])
            assert (renamed.asset.file_path, renamed.asset.tags) == ("y.txt", ("input",))
            assert await read_all(store, minted.asset.id) == data
            with pytest.raises(BlobNotFound) as missing:
                await store.from_hash(b3(b"never uploaded"))
            assert missing.value.location == "hash"
            with pytest.raises(InputError) as bad:
                await store.from_hash("sha256:" + "0" * 64)
            assert bad.value.location == "hash"
            assert not store.has_hash("blake3:nothex") and not store.has_hash(b3(b"other"))

    asyncio.run(main())


def test_expected_hash_is_checked_and_a_mismatch_keeps_nothing(tmp_path: Path) -> None:
    data = os.urandom(50_000)

    async def main() -> None:
        root = tmp_path / "assets"
        async with started(root) as store:
            with pytest.raises(HashMismatch) as caught:
                await store.upload(chunks_of(data), file_path="a.bin", expected_hash=b3(b"x"))
            assert caught.value.fields == {"expected_hash": b3(b"x"), "hash": b3(data)}
            assert [p.name for p in walk(root) if p.name != MARKER] == []
            assert len(store) == 0
            ok = await store.upload(chunks_of(data), file_path="a.bin", expected_hash=b3(data))
            assert ok.asset.hash == b3(data)
            with pytest.raises(InputError) as bad:
                await store.upload(chunks_of(data), file_path="a.bin", expected_hash="md5:00")
            assert bad.value.location == "expected_hash"

    asyncio.run(main())


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("content_type", {"content_type": "text/html\r\nSet-Cookie: a=b"}),
        ("content_type", {"content_type": "no-slash"}),
        ("file_path", {"file_path": ""}),
        ("file_path", {"file_path": "a\x00b"}),
        ("tags", {"tags": [""]}),
    ],
)
def test_bad_fields_are_refused_before_any_byte_is_written(
    tmp_path: Path, field: str, kwargs: dict[str, object]
) -> None:
    read: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        read.append(b"x")
        yield b"x"

    async def main() -> None:
        async with started(tmp_path / "assets") as store:
            options: dict[str, object] = {"file_path": "a.txt", **kwargs}
            with pytest.raises(InputError) as caught:
                await store.upload(body(), **options)  # type: ignore[arg-type]
            assert caught.value.location == field
            assert read == []

    asyncio.run(main())


def test_a_body_cut_midway_leaves_nothing_behind(tmp_path: Path) -> None:
    async def cut() -> AsyncIterator[bytes]:
        yield os.urandom(3 * 1024 * 1024)  # written already
        raise ConnectionResetError("client went away")

    async def main() -> None:
        root = tmp_path / "assets"
        async with started(root) as store:
            with pytest.raises(ConnectionResetError):
                await store.upload(cut(), file_path="a.bin")
            assert [p.name for p in walk(root) if p.name != MARKER] == []
            assert len(store) == 0 and store.size_bytes == 0

    asyncio.run(main())


def test_the_least_recently_used_blob_is_evicted_with_its_assets(tmp_path: Path) -> None:
    blobs = {name: os.urandom(1000) for name in "ABCD"}

    async def main() -> None:
        async with started(tmp_path / "assets", max_bytes=3000) as store:
            ids = {}
            for name in "ABC":
                ids[name] = (await store.upload(chunks_of(blobs[name]), file_path=name)).asset.id
            twin = (await store.from_hash(b3(blobs["B"]))).asset.id  # a use of B
            await read_all(store, ids["A"])  # A is now the most recently used
            ids["D"] = (await store.upload(chunks_of(blobs["D"]), file_path="D")).asset.id
            # order of use: C (oldest), B, A, D: C goes
            assert store.find(ids["C"]) is None
            assert all(store.find(ids[n]) for n in "ABD") and store.find(twin)
            assert store.size_bytes == 3000
            assert blake3(blobs["C"]).hexdigest() not in files(tmp_path / "assets" / "blobs")
            assert not (tmp_path / "assets" / "records" / f"{ids['C']}.json").exists()
            with pytest.raises(AssetNotFound):
                await store.open(ids["C"])
            ids["E"] = (await store.upload(chunks_of(os.urandom(1000)), file_path="E")).asset.id
            assert store.find(ids["B"]) is None and store.find(twin) is None  # B next

    asyncio.run(main())


def test_a_held_blob_is_never_evicted_until_its_owner_releases_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path / "assets", max_bytes=2000) as store:
            a = (await store.upload(chunks_of(os.urandom(1000)), file_path="a")).asset
            b = (await store.upload(chunks_of(os.urandom(1000)), file_path="b")).asset
            store.hold(a.id, "job-1")
            store.hold(a.id, "job-1")  # one hold
            store.hold(b.id, "job-2")
            c = (await store.upload(chunks_of(os.urandom(1000)), file_path="c")).asset
            # a and b are held: the store goes over its bound rather than evict them
            assert store.find(a.id) and store.find(b.id) and store.find(c.id)
            assert store.size_bytes == 3000
            assert sorted(store.holders(a.id)) == ["job-1"]
            await store.release("job-1")  # a is the least recently used unheld blob again
            assert store.find(a.id) is None and store.find(b.id) and store.find(c.id)
            assert store.size_bytes == 2000
            await store.release("nobody")

    asyncio.run(main())


def test_a_deleted_or_expired_asset_keeps_its_bytes_while_held(tmp_path: Path) -> None:
    clock = Clock()
    data = os.urandom(4096)

    async def main() -> None:
        root = tmp_path / "assets"
        async with started(root, retention_s=10, clock=clock) as store:
            kept = (await store.upload(chunks_of(data), file_path="k")).asset
            held = (await store.upload(chunks_of(data[::-1]), file_path="h")).asset
            store.hold(held.id, "job")
            assert kept.expires_at == datetime.fromtimestamp(clock.now + 10, UTC)
            clock.now += 11
            assert store.find(kept.id) is None and store.find(held.id) is None
            with pytest.raises(AssetNotFound):
                store.hold(kept.id, "late")
            assert await store.sweep() == 2
            assert files(root / "records") == []
            assert files(root / "blobs") == [blake3(data[::-1]).hexdigest()]  # still held
            await store.release("job")
            assert files(root / "blobs") == []
            unknown = await asyncio.gather(store.delete(kept.id), return_exceptions=True)
            assert isinstance(unknown[0], AssetNotFound)

    asyncio.run(main())


def test_range_reads_stream_the_slice_asked_for(tmp_path: Path) -> None:
    data = os.urandom(1_000_003)

    async def main() -> None:
        async with started(tmp_path / "assets") as store:
            asset = (await store.upload(chunks_of(data), file_path="r.bin")).asset
            for first, last in [(0, 0), (10, 99_999), (999_000, 1_000_002), (0, 1_000_002)]:
                content = await store.open(asset.id)
                assert content.size_bytes == len(data)
                pieces = [c async for c in content.chunks(first, last, chunk_size=4096)]
                assert b"".join(pieces) == data[first : last + 1]
                assert max(len(p) for p in pieces) <= 4096
            content = await store.open(asset.id)
            tail = b"".join([c async for c in content.chunks(1_000_000)])
            assert tail == data[1_000_000:]
            for first, last in [(-1, 5), (5, len(data)), (10, 5)]:
                content = await store.open(asset.id)
                with pytest.raises(ValueError):
                    content.chunks(first, last)
            empty = (await store.upload(chunks_of(b""), file_path="e.txt")).asset
            assert empty.size_bytes == 0 and empty.hash == b3(b"")
            assert await read_all(store, empty.id) == b""

    asyncio.run(main())


def test_an_open_read_survives_the_asset_being_deleted(tmp_path: Path) -> None:
    data = os.urandom(300_000)

    async def main() -> None:
        async with started(tmp_path / "assets") as store:
            asset = (await store.upload(chunks_of(data), file_path="d.bin")).asset
            async with await store.open(asset.id) as content:
                stream = content.chunks(chunk_size=65536)
                first = await anext(stream)
                await store.delete(asset.id)
                rest = b"".join([c async for c in stream])
            assert first + rest == data
            assert files(tmp_path / "assets" / "blobs") == []

    asyncio.run(main())


def test_staging_hardlinks_into_the_input_dir_never_a_symlink(tmp_path: Path) -> None:
    data = os.urandom(10_000)

    async def main() -> None:
        async with started(tmp_path / "assets") as store:
            asset = (await store.upload(chunks_of(data), file_path="me.JPG")).asset
            name = staged_file_name(asset)
            assert name == asset.id + ".JPG"
            dest = tmp_path / "input" / ".comfy-sidecar" / "job1" / name
            dest.parent.mkdir(parents=True)
            dest.write_bytes(b"an older file")
            assert await store.stage(asset.id, dest) == dest
            assert not dest.is_symlink() and dest.read_bytes() == data
            blob = tmp_path / "assets" / "blobs" / blake3(data).hexdigest()
            assert os.path.samefile(dest, blob)
            assert files(dest.parent) == [name]  # no temp file left beside it
            with pytest.raises(AssetNotFound):
                await store.stage("no-such-id", tmp_path / "input" / "x")

    asyncio.run(main())


def test_staged_names_keep_only_a_plain_extension(tmp_path: Path) -> None:
    async def main() -> None:
        async with started(tmp_path / "assets") as store:
            odd = await store.upload(
                chunks_of(b"x"), file_path="../../etc/passwd.d/x.$(rm)", content_type="image/png"
            )
            assert staged_file_name(odd.asset) == odd.asset.id + ".png"
            none = await store.upload(chunks_of(b"y"), file_path=None)
            assert none.asset.content_type == "application/octet-stream"
            assert staged_file_name(none.asset).startswith(none.asset.id)

    asyncio.run(main())


def test_a_registered_output_is_linked_not_read_and_hashed_in_the_background(
    tmp_path: Path,
) -> None:
    data = os.urandom(2 * 1024 * 1024 + 7)
    output = tmp_path / "jobs" / "job-7" / "ComfyUI_00001_.png"
    output.parent.mkdir(parents=True)
    output.write_bytes(data)

    async def main() -> None:
        root = tmp_path / "assets"
        async with started(root, max_bytes=1000) as store:
            asset = await store.register_output(output, job_id="job-7")
            assert asset.hash is None  # "null while lazily computed"
            assert (asset.job_id, asset.file_path, asset.size_bytes) == (
                "job-7",
                "ComfyUI_00001_.png",
                len(data),
            )
            assert asset.content_type == "image/png"
            assert os.stat(output).st_nlink == 2  # a hard link into the store, not a copy
            assert store.holders(asset.id) == ["job-7"]  # held by its job: over the bound
            assert await store.wait_hash(asset.id) == b3(data)
            found = store.find(asset.id)
            assert found is not None and found.hash == b3(data)
            assert store.has_hash(b3(data))
            minted = await store.from_hash(b3(data))  # outputs dedup like uploads once hashed
            assert await read_all(store, minted.asset.id) == data
            output.unlink()  # the job store drops its copy: the store keeps the bytes
            assert await read_all(store, asset.id) == data
            with pytest.raises(OutputMissingError):
                await store.register_output(tmp_path / "jobs" / "gone.png", job_id="job-7")
            with pytest.raises(OutputMissingError):
                await store.register_output(tmp_path / "jobs", job_id="job-7")
        async with started(root) as store:  # the hash was recorded
            again = store.find(asset.id)
            assert again is not None and again.hash == b3(data)

    asyncio.run(main())


def test_an_output_on_another_file_system_is_referenced_in_place(
    tmp_path: Path, small_tmpfs: object
) -> None:
    other = small_tmpfs(4 * 1024 * 1024)  # type: ignore[operator]
    data = os.urandom(100_000)
    output = other / "out.webp"
    output.write_bytes(data)

    async def main() -> None:
        root = tmp_path / "assets"
        async with started(root) as store:
            asset = await store.register_output(output, job_id="j")
            assert files(root / "blobs") == []  # no copy made
            assert os.stat(output).st_nlink == 1
            assert store.size_bytes == 0  # not the store's bytes
            assert await store.wait_hash(asset.id) == b3(data)
            assert await read_all(store, asset.id) == data
            output.unlink()
            with pytest.raises(AssetNotFound):
                await store.open(asset.id)

    asyncio.run(main())


def test_a_restart_reads_back_assets_and_drops_leftovers(tmp_path: Path) -> None:
    data = os.urandom(5000)
    root = tmp_path / "assets"

    async def first_run() -> str:
        async with started(root) as store:
            return (await store.upload(chunks_of(data), file_path="keep.bin")).asset.id

    async def second_run(asset_id: str) -> None:
        async with started(root, max_bytes=10_000) as store:
            asset = store.find(asset_id)
            assert asset is not None and asset.hash == b3(data) and asset.file_path == "keep.bin"
            assert await read_all(store, asset_id) == data
            assert store.size_bytes == len(data)
            assert (await store.upload(chunks_of(data), file_path="again")).created_new is False

    asset_id = asyncio.run(first_run())
    (root / "tmp" / ".partial-crashed").write_bytes(b"half an upload")
    (root / "blobs" / ("f" * 64)).write_bytes(b"a blob no record names")
    asyncio.run(second_run(asset_id))
    assert files(root / "tmp") == []
    assert files(root / "blobs") == [blake3(data).hexdigest()]


def test_a_foreign_directory_is_never_used(tmp_path: Path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")

    async def main() -> None:
        store = AssetStore(foreign)
        with pytest.raises(ValueError, match="not a comfy-sidecar asset directory"):
            await store.start()
        await store.close()

    asyncio.run(main())
    assert files(foreign) == ["thesis.tex"]


def test_expired_assets_are_swept_on_their_own(tmp_path: Path) -> None:
    clock = Clock()

    async def main() -> None:
        root = tmp_path / "assets"
        async with started(root, retention_s=5, clock=clock, sweep_interval_s=0.01) as store:
            await store.upload(chunks_of(b"short-lived"), file_path="s.txt")
            forever = await store.upload(chunks_of(b"kept"), file_path="k", retention_s=0)
            assert forever.asset.expires_at is None
            clock.now += 6
            kept = [blake3(b"kept").hexdigest()]
            await async_wait_for(
                lambda: len(store) == 1 and files(root / "blobs") == kept,
                what="the expired asset and its bytes swept",
            )
            assert store.find(forever.asset.id) is not None

    asyncio.run(main())
