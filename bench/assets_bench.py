"""Asset store benchmark (issue 22): a 256 MiB upload through ``AssetStore.upload`` streamed
from an async iterator of 1 MiB chunks, the same bytes again (a dedup hit), a ``from_hash``
mint, and a 256 MiB registered output hashed in the background; with this process's peak RSS
growth during each.

    python bench/assets_bench.py [--size-mib 256] [--runs 3] [--dir /tmp]

Goal: RSS growth <= 32 MB. Side by side, in the same run: the chunk source alone, and the same
stream written to a file with no hashing (the floor an upload cannot beat). The chunks are
blake3's extendable output, so every run streams the same, incompressible bytes without
holding them. Temporary files are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

from blake3 import blake3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache_bench import RssSampler

CHUNK = 1 << 20
T = TypeVar("T")


async def source(size: int, seed: bytes = b"asset bench") -> AsyncIterator[bytes]:
    """``size`` deterministic bytes in 1 MiB chunks, made as they are asked for."""
    xof = blake3(seed)
    for offset in range(0, size, CHUNK):
        yield xof.digest(length=min(CHUNK, size - offset), seek=offset)


async def drain(size: int) -> None:
    async for _ in source(size):
        pass


async def plain_write(size: int, path: Path) -> None:
    with open(path, "wb") as fh:
        async for chunk in source(size):
            await asyncio.to_thread(fh.write, chunk)
    path.unlink()


async def one_run(size: int, work: Path) -> dict[str, tuple[float, int]]:
    from comfy_sidecar.assets import AssetStore

    figures: dict[str, tuple[float, int]] = {}

    async def measure(name: str, step: Awaitable[T]) -> T:
        with RssSampler() as rss:
            base = rss.peak
            started = time.perf_counter()
            result = await step
            elapsed = time.perf_counter() - started
        figures[name] = (elapsed, rss.peak - base)
        return result

    await measure("source only (no disk)", drain(size))
    await measure("plain write, no hash", plain_write(size, work / "plain.bin"))
    store = AssetStore(work / "assets")
    await store.start()
    try:
        upload = store.upload(source(size), file_path="b")
        created = await measure("upload (blake3 + write)", upload)
        again = await measure("re-upload (dedup hit)", store.upload(source(size), file_path="c"))
        assert created.created_new and not again.created_new and created.asset.hash
        await measure("from_hash", store.from_hash(created.asset.hash))
        output = work / "output.bin"
        with open(output, "wb") as fh:
            async for chunk in source(size, b"an output"):
                fh.write(chunk)

        async def register_and_hash() -> None:
            asset = await store.register_output(output, job_id="bench")
            await store.wait_hash(asset.id)

        await measure("register output + lazy hash", register_and_hash())
    finally:
        await store.close()
        shutil.rmtree(work / "assets", ignore_errors=True)
    return figures


async def main(args: argparse.Namespace) -> None:
    size = args.size_mib << 20
    runs: list[dict[str, tuple[float, int]]] = []
    for _ in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="assets-bench-", dir=args.dir))
        try:
            runs.append(await one_run(size, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    cpus = os.cpu_count()
    print(f"{args.size_mib} MiB, 1 MiB chunks, median of {args.runs} runs ({cpus} CPUs)")
    print(f"{'step':32} {'seconds':>8} {'MiB/s':>8} {'RSS growth MB':>14}")
    for name in runs[0]:
        seconds = statistics.median(run[name][0] for run in runs)
        growth = max(run[name][1] for run in runs) / 1e6
        rate = args.size_mib / seconds if seconds > 0 else float("inf")
        rate_text = f"{rate:8.0f}" if name != "from_hash" else f"{'':>8}"
        print(f"{name:32} {seconds:8.3f} {rate_text} {growth:14.1f}")
    upload = statistics.median(run["upload (blake3 + write)"][0] for run in runs)
    plain = statistics.median(run["plain write, no hash"][0] for run in runs)
    print(f"upload / plain write time: {upload / plain:.2f}  (RSS growth: max over runs)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the temporary files go")
    asyncio.run(main(parser.parse_args()))
