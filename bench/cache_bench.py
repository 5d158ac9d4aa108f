"""Cache benchmark: a 1 GiB cache miss from a local HTTP server vs ``curl -o``, the RSS growth
of this process during the miss, and the time to stage a cache hit.

    python bench/cache_bench.py [--size-mib 1024] [--runs 5]

Goals (issue 3): miss throughput >= 0.9 x curl; RSS growth <= 64 MB; hit stage <= 5 ms.
The server is a separate process answering with ``sendfile`` so it is not the bottleneck.
Big temporary files are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SERVER = r"""
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
path = sys.argv[1]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        size = os.path.getsize(path)
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.flush()
        with open(path, "rb") as f:
            self.connection.sendfile(f)
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Peak RSS of this process, sampled every 10 ms in a thread."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def make_file(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for _ in range(size // len(block)):
            fh.write(block)


async def run(args: argparse.Namespace, work: Path, port: int) -> None:
    from comfy_sidecar.config import load_settings
    from comfy_sidecar.storage import Storage

    url_base = f"http://127.0.0.1:{port}/big"
    size = args.size_mib << 20

    settings = load_settings({"HOME": str(work), "CACHE_DIR": str(work / "cache")})
    storage = Storage(settings, env={})
    await storage.start()
    curl_times: list[float] = []
    miss_times: list[float] = []
    growth: list[int] = []
    curl_cpu: list[float] = []
    miss_cpu: list[float] = []
    try:
        # Interleaved runs, with dirty pages flushed (untimed) before each, so neither side
        # pays for the other's write-back.
        # One untimed warm-up of each (the first write after creating the source is slow on
        # this VM's disk whichever client goes first).
        warm = work / "warm.bin"
        subprocess.run(["curl", "-sS", "-o", str(warm), f"{url_base}.bin?w"], check=True)  # noqa: ASYNC221
        warm.unlink()
        (await storage.fetch(f"{url_base}.bin?warm", None)).unlink()
        storage.cache._entries.clear()
        for i in range(args.runs):
            out = work / f"curl-{i}.bin"
            os.sync()
            curl = ["curl", "-sS", "-o", str(out), f"{url_base}.bin?curl={i}"]
            c0 = _cpu(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(curl, check=True)  # noqa: ASYNC221 - timed on purpose, alone
            curl_times.append(time.perf_counter() - t0)
            curl_cpu.append(_cpu(resource.RUSAGE_CHILDREN) - c0)
            assert out.stat().st_size == size
            out.unlink()
            url = f"{url_base}.bin?run={i}"
            os.sync()
            base = rss_bytes()
            with RssSampler() as sampler:
                c0 = _cpu(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                path = await storage.fetch(url, None)
                miss_times.append(time.perf_counter() - t0)
                miss_cpu.append(_cpu(resource.RUSAGE_SELF) - c0)
            growth.append(sampler.peak - base)
            assert path.stat().st_size == size
            if i < args.runs - 1:
                path.unlink()
                storage.cache._entries.clear()
        hit_ms = []
        for i in range(200):
            t0 = time.perf_counter()
            await storage.stage_input(url, None, work / "input", f"hit-{i}.bin")
            hit_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        await storage.close()

    curl_best = statistics.median(curl_times)
    miss_best = statistics.median(miss_times)
    mib = size / (1 << 20)
    print(f"file: {mib:.0f} MiB from a local sendfile HTTP server")
    print(
        f"curl -o:     median {curl_best:.3f} s  ({mib / curl_best:.0f} MiB/s)  "
        f"runs {[round(t, 2) for t in curl_times]}"
    )
    print(
        f"cache miss:  median {miss_best:.3f} s  ({mib / miss_best:.0f} MiB/s)  "
        f"runs {[round(t, 2) for t in miss_times]}"
    )
    print(f"throughput ratio (cache miss / curl): {curl_best / miss_best:.2f}  (goal >= 0.9)")
    print(
        f"CPU seconds (user+sys), median: curl {statistics.median(curl_cpu):.2f}, "
        f"cache miss {statistics.median(miss_cpu):.2f} (includes the RSS sampler thread)"
    )
    print(
        f"RSS growth during miss: max {max(growth) / 1e6:.1f} MB "
        f"(runs {[round(g / 1e6, 1) for g in growth]})  (goal <= 64 MB)"
    )
    hit_ms.sort()
    print(
        f"cache hit stage_input: median {statistics.median(hit_ms):.3f} ms, "
        f"p95 {hit_ms[int(len(hit_ms) * 0.95)]:.3f} ms, max {hit_ms[-1]:.3f} ms  (goal <= 5 ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    server = None
    try:
        src = work / "big.bin"
        make_file(src, args.size_mib << 20)
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(src)], stdout=subprocess.PIPE, text=True
        )
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        asyncio.run(run(args, work, port))
    finally:
        if server is not None:
            server.terminate()
            server.wait(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
