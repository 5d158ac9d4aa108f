"""Upload benchmark: a 256 MiB output uploaded to moto's S3 server through ``Storage.upload``
(boto3 transfer manager, 8 MiB parts), with this process's RSS growth during the upload.

    python bench/upload_bench.py [--size-mib 256] [--runs 2]

Goal (issue 3): RSS growth <= 64 MB. Also runs the HTTP PUT path against a local server that
discards the body, for comparison. Temporary files are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache_bench import RssSampler, make_file, rss_bytes

SINK = r"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_PUT(self):
        left = int(self.headers["Content-Length"])
        while left:
            left -= len(self.rfile.read(min(1 << 20, left)))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


async def run(args: argparse.Namespace, work: Path, s3_url: str, sink_port: int) -> None:
    import boto3

    from comfy_sidecar.config import load_settings
    from comfy_sidecar.schemas import HTTPUpload, S3Upload
    from comfy_sidecar.storage import Storage

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_url,
    }
    client = boto3.client(
        "s3",
        endpoint_url=s3_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="bench")
    src = work / "output.png"
    make_file(src, args.size_mib << 20)
    size = src.stat().st_size
    storage = Storage(load_settings({"HOME": str(work), "CACHE_DIR": str(work / "cache")}), env=env)
    await storage.start()
    try:
        # warm-up: imports boto3 and builds the client, so RSS growth is the transfer's own
        small = work / "small.png"
        small.write_bytes(b"x" * 1024)
        await storage.upload(small, S3Upload(bucket="bench", prefix="warm"), "small.png")
        for target, spec in (
            ("S3 (moto)", S3Upload(bucket="bench", prefix="out")),
            ("HTTP PUT", HTTPUpload(url_prefix=f"http://127.0.0.1:{sink_port}/up")),
        ):
            for i in range(args.runs):
                base = rss_bytes()
                with RssSampler() as sampler:
                    t0 = time.perf_counter()
                    url = await storage.upload(src, spec, f"o{i}.png")
                    dt = time.perf_counter() - t0
                print(
                    f"{target}: {size / 2**20:.0f} MiB in {dt:.2f} s "
                    f"({size / 2**20 / dt:.0f} MiB/s), RSS growth "
                    f"{(sampler.peak - base) / 1e6:.1f} MB (goal <= 64 MB) -> {url}"
                )
        head = client.head_object(Bucket="bench", Key="out/o0.png")
        assert head["ContentLength"] == size, head
    finally:
        await storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="upload-bench-"))
    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        wait_port(port)
        assert sink.stdout is not None
        sink_port = int(sink.stdout.readline())
        asyncio.run(run(args, work, f"http://127.0.0.1:{port}", sink_port))
    finally:
        for proc in (moto, sink):
            proc.terminate()
            proc.wait(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
