"""Asset uploads over HTTP (issue 22): a 256 MiB file uploaded to a running sidecar's
``POST /api/v2/assets`` with comfy-sdk (``assets.from_file(...).commit()``: local blake3, HEAD
by-hash, then the streamed multipart upload), then the same file again (a hash hit: HEAD
by-hash and a from-hash mint, no body), with the sidecar process's RSS growth (``VmRSS``
sampled every 10 ms from ``/proc``, the sidecar alone, not its ComfyUI child).

    python bench/assets_http_bench.py [--size-mib 256] [--runs 3] [--dir /tmp]

Goal: RSS growth of the sidecar <= 32 MB; the second upload sends no body. Side by side in the
same run: the same multipart body streamed with plain httpx (no SDK: no local hash, no probe)
and to a sink (a socket that reads and drops, the floor of loopback HTTP with this client).
Bytes sent are counted by a relay in front of the sidecar (tests/byte_relay.py). Runs against
the ComfyUI double; the file and the sidecar's directories are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from blake3 import blake3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.overhead import rss_mb  # noqa: E402
from tests.byte_relay import byte_relay  # noqa: E402
from tests.conftest import Backend, Sidecar, make_sidecar  # noqa: E402

CHUNK = 1 << 20


def make_file(path: Path, size: int, seed: bytes) -> None:
    xof = blake3(seed)
    with open(path, "wb") as fh:
        for offset in range(0, size, CHUNK):
            fh.write(xof.digest(length=min(CHUNK, size - offset), seek=offset))


class PeakRss:
    """Peak ``VmRSS`` of process ``pid`` in MB, sampled every 10 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = rss_mb(pid)
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))

    @property
    def growth(self) -> float:
        return self.peak - self.base


def multipart(path: Path, boundary: str) -> tuple[Iterator[bytes], int]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file_path"\r\n\r\n{path.name}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = path.stat().st_size

    def body() -> Iterator[bytes]:
        yield head
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        yield tail

    return body(), len(head) + size + len(tail)


def plain_upload(url: str, path: Path) -> httpx.Response:
    boundary = secrets.token_hex(12)
    body, length = multipart(path, boundary)
    headers = {
        "content-type": f"multipart/form-data; boundary={boundary}",
        "content-length": str(length),
    }
    with httpx.Client(timeout=600) as client:
        return client.post(f"{url}/api/v2/assets", content=body, headers=headers)


class Sink:
    """An HTTP server that reads a request body and drops it, then answers 200 (the floor)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                left = length - len(rest)
                while left > 0:
                    left -= len(conn.recv(1 << 20))
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

    def close(self) -> None:
        self.server.close()


def one_run(sidecar: Sidecar, work: Path, size: int, run: int) -> dict[str, tuple[float, float]]:
    """{step: (seconds, RSS growth MB of the sidecar)}; MB sent for the hit in ``sent``."""
    from comfy_sdk import Comfy

    assert sidecar.proc is not None
    pid = sidecar.proc.pid
    figures: dict[str, tuple[float, float]] = {}
    sdk_file = work / f"sdk-{run}.bin"
    plain_file = work / f"plain-{run}.bin"
    make_file(sdk_file, size, f"sdk {run} {time.time_ns()}".encode())
    make_file(plain_file, size, f"plain {run} {time.time_ns()}".encode())

    sink = Sink()
    try:
        started = time.perf_counter()
        response = plain_upload(sink.url, plain_file)
        assert response.status_code == 200
        figures["sink (loopback floor)"] = (time.perf_counter() - started, 0.0)
    finally:
        sink.close()

    with PeakRss(pid) as rss:
        started = time.perf_counter()
        response = plain_upload(sidecar.url, plain_file)
        elapsed = time.perf_counter() - started
    assert response.status_code == 201, response.text
    figures["httpx stream -> sidecar"] = (elapsed, rss.growth)

    with byte_relay(sidecar.port) as relay:
        os.environ["COMFY_BASE_URL"] = relay.url
        with Comfy() as client:
            with PeakRss(pid) as rss:
                started = time.perf_counter()
                first = client.assets.from_file(sdk_file)
                first.commit()
                elapsed = time.perf_counter() - started
            assert first.created_new is True
            figures["sdk from_file (new)"] = (elapsed, rss.growth)
            figures["  bytes sent, MB"] = (relay.sent / 1e6, 0.0)
            relay.reset()
            with PeakRss(pid) as rss:
                started = time.perf_counter()
                again = client.assets.from_file(sdk_file)
                again.commit()
                elapsed = time.perf_counter() - started
            assert again.created_new is False
            figures["sdk from_file (hash hit)"] = (elapsed, rss.growth)
            figures["  bytes sent, kB"] = (relay.sent / 1e3, 0.0)
    sdk_file.unlink()
    plain_file.unlink()
    return figures


def main(args: argparse.Namespace) -> None:
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="assets-http-bench-", dir=args.dir))
    sidecar = make_sidecar(
        Backend("double", work / "comfy"),
        work,
        ASSET_MAX_UPLOAD_MB=str(args.size_mib * 2),
        LOG_LEVEL="info",
    )
    runs: list[dict[str, tuple[float, float]]] = []
    try:
        sidecar.start()
        sidecar.wait_ready()
        assert sidecar.proc is not None
        idle = rss_mb(sidecar.proc.pid)
        for run in range(args.runs):
            runs.append(one_run(sidecar, work, size, run))
        after = rss_mb(sidecar.proc.pid)
    finally:
        sidecar.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{args.size_mib} MiB to POST /api/v2/assets, median of {args.runs} runs "
        f"({os.cpu_count()} CPUs); sidecar RSS idle {idle:.0f} MB, after all runs {after:.0f} MB"
    )
    print(f"{'step':28} {'seconds':>8} {'MiB/s':>8} {'sidecar RSS growth MB':>22}")
    for name in runs[0]:
        value = statistics.median(run[name][0] for run in runs)
        if name.startswith("  "):
            print(f"{name:28} {value:8.1f}")
            continue
        growth = max(run[name][1] for run in runs)
        rate = args.size_mib / value if "hit" not in name else float("nan")
        print(f"{name:28} {value:8.3f} {rate:8.0f} {growth:22.1f}")
    floor = statistics.median(run["sink (loopback floor)"][0] for run in runs)
    plain = statistics.median(run["httpx stream -> sidecar"][0] for run in runs)
    sdk = statistics.median(run["sdk from_file (new)"][0] for run in runs)
    print(
        f"sidecar / sink time: {plain / floor:.2f}; sdk (local hash + probe + upload) / sink: "
        f"{sdk / floor:.2f}  (RSS growth: max over runs)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the temporary files go")
    main(parser.parse_args())
