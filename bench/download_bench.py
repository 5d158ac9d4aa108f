"""Download benchmark (issue 16, part 3): curl's single connection vs the sidecar's parallel
ranged download, side by side in one run, plus S3 (moto) with boto3's default vs the tuned
``TransferConfig``.

    python bench/download_bench.py [--size-mib 768] [--rate-mb 100] [--runs 2] [--s3-size-mib 256]

Servers (separate processes, 127.0.0.1): ``tests/storage/servers.FileServer`` serving a sparse
file from a temp dir with ``sendfile`` on its ``/ranged/`` route, once capped at ``--rate-mb``
MB/s per connection and once uncapped. Goals: capped >= 4x curl, uncapped >= 0.9x curl, RSS
growth of this process during a ranged download <= 64 MB. Printed, never asserted. The cache
file of each run is deleted at once; the temp dir at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache_bench import RssSampler, rss_bytes  # noqa: E402  (bench/ is sys.path[0])

from comfy_sidecar.config import load_settings  # noqa: E402
from comfy_sidecar.storage import Storage  # noqa: E402

SERVER = """
import sys
from pathlib import Path
from tests.storage.servers import FileServer
server = FileServer()
server.paths["model.bin"] = Path(sys.argv[1])
server.throttle_bps = float(sys.argv[2])
print(server.port, flush=True)
server.thread.join()
"""


def start_server(path: Path, rate_bps: float) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(path), str(rate_bps)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/ranged/model.bin"


def curl_s(url: str, size: int) -> float:
    started = time.monotonic()
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", url],
        check=True,
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - started
    assert int(float(out.stdout)) == size, out.stdout
    return took


async def sidecar_s(storage: Storage, url: str, size: int) -> tuple[float, int]:
    """Seconds for one cache miss of ``url`` and this process's RSS growth (bytes)."""
    base = rss_bytes()
    with RssSampler() as rss:
        started = time.monotonic()
        path = await storage.fetch(url, None)
        took = time.monotonic() - started
    assert path.stat().st_size == size
    path.unlink()
    storage.cache._entries.pop(path.name[:32], None)
    return took, rss.peak - base


async def http_rows(args: argparse.Namespace, tmp: Path) -> list[tuple[str, float, float, int]]:
    size = args.size_mib << 20
    data = tmp / "model.bin"
    with open(data, "wb") as fh:
        fh.truncate(size)  # sparse: the server reads zeros from the page cache
    rows = []
    settings = load_settings(
        {
            "HOME": str(tmp),
            "CACHE_DIR": str(tmp / "cache"),
            "COMFY_HOME": str(tmp / "comfy"),
            "DOWNLOAD_CONNECTIONS": str(args.connections),
        }
    )
    storage = Storage(settings, env={"HOME": str(tmp)})
    await storage.start()
    try:
        for label, rate in (
            (f"capped {args.rate_mb} MB/s per connection", args.rate_mb * 1e6),
            ("uncapped loopback", 0.0),
        ):
            proc, url = start_server(data, rate)
            try:
                curls, ours, growth = [], [], []
                for n in range(args.runs):
                    curls.append(await asyncio.to_thread(curl_s, f"{url}?curl={n}", size))
                    took, rss = await sidecar_s(storage, f"{url}?run={n}", size)
                    ours.append(took)
                    growth.append(rss)
                rows.append((label, statistics.median(curls), statistics.median(ours), max(growth)))
            finally:
                proc.terminate()
                proc.wait(5)
    finally:
        await storage.close()
    return rows


def s3_rows(args: argparse.Namespace, tmp: Path) -> list[tuple[str, float]]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    from comfy_sidecar.storage.backends.s3 import download_config
    from tests.storage.conftest import free_port, stop, wait_port

    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, moto)
        client: Any = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket="bench")
        src = tmp / "s3.bin"
        with open(src, "wb") as fh:
            fh.truncate(args.s3_size_mib << 20)
        client.upload_file(str(src), "bench", "model.bin")
        src.unlink()
        rows = []
        configs = (
            ("boto3 default (10 threads, 8 MiB parts)", TransferConfig()),
            ("before: 4 threads, 8 MiB parts", TransferConfig(max_concurrency=4)),
            ("tuned: download_config(8), 16 MiB parts", download_config(8)),
        )
        for label, cfg in configs:
            times = []
            for _ in range(args.runs):
                dest = tmp / "s3-out.bin"
                started = time.monotonic()
                client.download_file("bench", "model.bin", str(dest), Config=cfg)
                times.append(time.monotonic() - started)
                dest.unlink()
            rows.append((label, statistics.median(times)))
        return rows
    finally:
        stop(moto)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=768)
    parser.add_argument("--rate-mb", type=float, default=100.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--s3-size-mib", type=int, default=256)
    parser.add_argument("--connections", type=int, default=8, help="DOWNLOAD_CONNECTIONS")
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="download-bench-") as name:
        tmp = Path(name)
        rows = asyncio.run(http_rows(args, tmp))
        size_mb = (args.size_mib << 20) / 1e6
        print(
            f"\nHTTP, {args.size_mib} MiB file, median of {args.runs},"
            f" DOWNLOAD_CONNECTIONS={args.connections}"
        )
        print(f"{'server':<34} {'curl MB/s':>10} {'sidecar MB/s':>13} {'ratio':>6} {'RSS +MB':>8}")
        for label, curl, ours, rss in rows:
            print(
                f"{label:<34} {size_mb / curl:>10.0f} {size_mb / ours:>13.0f}"
                f" {curl / ours:>5.2f}x {rss / 1e6:>8.1f}"
            )
        if not args.skip_s3:
            s3 = s3_rows(args, tmp)
            mb = (args.s3_size_mib << 20) / 1e6
            print(f"\nS3 (moto), {args.s3_size_mib} MiB object, median of {args.runs}")
            print(f"{'TransferConfig':<42} {'s':>6} {'MB/s':>6}")
            for label, took in s3:
                print(f"{label:<42} {took:>6.2f} {mb / took:>6.0f}")


if __name__ == "__main__":
    main()
