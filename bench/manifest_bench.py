"""Manifest provisioning figures (printed, never asserted).

1. Warm second boot: a 5-model manifest, first boot fills CACHE_DIR, the second boot on the same
   cache links only; provisioning time is read from the sidecar's log line
   ``manifest provisioning took X s`` (goal <= 0.2 s).
2. Overlap: 4 models of SIZE_MB on a local HTTP server (files streamed from disk). Each alone on
   a fresh cache, then all four in one manifest on a fresh cache; wall time of the 4-model
   provisioning vs the slowest single one (goal <= 1.3x).

Run: ``python bench/manifest_bench.py [--size-mb 256] [--runs 3]`` from the repository root.
Temporary files (models, caches) are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socketserver
import subprocess
import sys
import tempfile
import time
from functools import partial
from http.server import HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Backend, Sidecar, make_sidecar  # noqa: E402

TOOK = re.compile(r"manifest provisioning took ([0-9.]+) s")


class _Handler(SimpleHTTPRequestHandler):
    """Static files; with ``rate`` (bytes/s) each connection is held to that rate, as a
    remote CDN limits one connection."""

    rate = 0.0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def copyfile(self, source: Any, outputfile: Any) -> None:
        if not self.rate:
            outputfile.flush()
            self.connection.sendfile(source)
            return
        started, sent = time.monotonic(), 0
        while chunk := source.read(1 << 20):
            outputfile.write(chunk)
            sent += len(chunk)
            ahead = sent / self.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


class _Server(socketserver.ForkingMixIn, HTTPServer):
    """One process per connection (sendfile when unthrottled): the server is never the
    bottleneck of concurrent downloads, as a real CDN is not."""


def serve_forever(directory: str, rate_mb_s: float, port_file: str) -> None:
    """Run in a separate process (``--serve``): its own GIL, like a real remote server."""
    _Handler.rate = rate_mb_s * 1e6
    server = _Server(("127.0.0.1", 0), partial(_Handler, directory=directory))
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


def serve(directory: Path, rate_mb_s: float = 0.0) -> tuple[subprocess.Popen[bytes], int]:
    port_file = directory.parent / f"port-{rate_mb_s}"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(directory), str(rate_mb_s), str(port_file)]
    )
    for _ in range(200):
        if port_file.exists() and port_file.read_text():
            return proc, int(port_file.read_text())
        time.sleep(0.05)
    raise RuntimeError("file server did not start")


def write_file(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as fh:
        for _ in range(size >> 20):
            fh.write(block)


def boot(work: Path, name: str, manifest: dict[str, Any], cache: Path) -> float:
    """Boot a sidecar (ComfyUI double) with ``manifest``; returns the provisioning seconds."""
    tmp = work / name
    tmp.mkdir()
    os.sync()  # earlier runs' dirty pages must not be written back during this one
    sidecar: Sidecar = make_sidecar(
        Backend("double", work / "comfy"),
        tmp,
        MANIFEST_JSON=json.dumps(manifest),
        CACHE_DIR=str(cache),
        LOG_LEVEL="info",
    )
    sidecar.start()
    try:
        sidecar.wait_ready(timeout=600)
        found = TOOK.findall(sidecar.log())
        if not found:
            raise RuntimeError(sidecar.log()[-3000:])
        return float(found[-1])
    finally:
        sidecar.stop()


def models(port: int, names: list[str], prefix: str) -> dict[str, Any]:
    return {
        "models": {
            "before_start": [
                {
                    "url": f"http://127.0.0.1:{port}/{n}",
                    "local_path": f"models/checkpoints/{prefix}-{n}",
                }
                for n in names
            ]
        }
    }


def overlap(work: Path, files: Path, big: list[str], rate: float, runs: int, size: int) -> None:
    proc, port = serve(files, rate)
    label = f"{rate:g} MB/s per connection" if rate else "unthrottled"
    try:
        ratios = []
        for run in range(runs):
            singles = []
            for i, n in enumerate(big):
                c = work / f"cache-{rate}-s{run}-{i}"
                prefix = f"r{rate}-s{run}"
                singles.append(boot(work, f"{prefix}-{i}", models(port, [n], prefix), c))
                shutil.rmtree(c)
            c = work / f"cache-{rate}-all{run}"
            prefix = f"r{rate}-a{run}"
            together = boot(work, prefix, models(port, big, prefix), c)
            shutil.rmtree(c)
            ratio = together / max(singles)
            ratios.append(ratio)
            print(
                f"[{label}] run {run + 1}: 4 x {size} MiB, each alone "
                + ", ".join(f"{t:.2f}" for t in singles)
                + f" s; all four {together:.2f} s; ratio to the slowest {ratio:.2f} (goal <= 1.3)"
            )
            for p in (work / "comfy" / "models" / "checkpoints").glob(f"r{rate}-*"):
                p.unlink()
        print(f"[{label}] ratio median {sorted(ratios)[len(ratios) // 2]:.2f}")
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve_forever(sys.argv[2], float(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--rate-mb-s",
        type=float,
        default=100.0,
        help="per-connection rate of the throttled server (0: skip the throttled runs)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="manifest-bench-"))
    try:
        files = work / "files"
        files.mkdir()

        # 1. warm second boot, 5 models of 8 MiB
        small = [f"small{i}.safetensors" for i in range(5)]
        for n in small:
            write_file(files / n, 8 << 20)
        proc, port = serve(files)
        try:
            cache = work / "cache-warm"
            manifest = models(port, small, "warm")
            cold = boot(work, "warm-0", manifest, cache)
            warm = [boot(work, f"warm-{i + 1}", manifest, cache) for i in range(args.runs)]
        finally:
            proc.terminate()
            proc.wait()
        print(f"5-model manifest: cold provisioning {cold:.3f} s")
        print(
            "5-model manifest, warm cache (second boot): provisioning "
            + ", ".join(f"{t:.3f}" for t in warm)
            + f" s (best {min(warm):.3f}, goal <= 0.2)"
        )

        # 2. four big models: each alone vs all four, each boot on a fresh cache
        big = [f"big{i}.safetensors" for i in range(4)]
        for n in big:
            write_file(files / n, args.size_mb << 20)
        overlap(work, files, big, 0.0, args.runs, args.size_mb)
        if args.rate_mb_s:
            overlap(work, files, big, args.rate_mb_s, args.runs, args.size_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
