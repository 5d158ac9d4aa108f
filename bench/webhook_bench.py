"""Webhook delivery figures: throughput, memory of a streamed v1 body, a progress flood.

Run: ``python bench/webhook_bench.py [--file-mb 100]``. Prints numbers; asserts nothing.
The receiver is a threaded HTTP server on 127.0.0.1 in this process (it discards bodies).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from comfy_sidecar.config import load_settings
from comfy_sidecar.webhooks import WebhookDispatcher, v1_output_body


def start_receiver(delay_s: float = 0.0) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            left = int(self.headers.get("content-length") or 0)
            while left:
                left -= len(self.rfile.read(min(left, 1 << 20)))
            if delay_s:
                time.sleep(delay_s)
            try:
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
            except OSError:
                self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def throughput(url: str, n: int) -> None:
    settings = load_settings(
        {
            "HOME": "/tmp",
            "SYSTEM_WEBHOOK_URL": url,
            "SYSTEM_WEBHOOK_EVENTS": "all",
            "WEBHOOK_SECRET": "testsecret",
        }
    )
    d = WebhookDispatcher(settings, system_workers=4, system_queue_size=n)
    await d.start()
    t0 = time.perf_counter()
    for i in range(n):
        d.handle_comfy_frame(
            {"type": "executing", "data": {"node": str(i), "prompt_id": "p"}}, lambda _: "api"
        )
    enqueue = time.perf_counter() - t0
    await d.close(120)
    total = time.perf_counter() - t0
    print(
        f"system events, one lane (ordered): {n} in {total:.2f} s = {n / total:.0f}/s "
        f"(enqueue {enqueue * 1e6 / n:.1f} us/event)"
    )
    d = WebhookDispatcher(settings, system_workers=4, system_queue_size=n)
    await d.start()
    t0 = time.perf_counter()
    for i in range(n):
        d.handle_comfy_frame(
            {"type": "executing", "data": {"node": "1", "prompt_id": f"p{i}"}}, lambda _: None
        )
    await d.close(120)
    total = time.perf_counter() - t0
    print(f"system events, {n} lanes, 4 workers: {n / total:.0f}/s")


async def streamed_file(url: str, mb: int) -> None:
    settings = load_settings({"HOME": "/tmp", "WEBHOOK_SECRET": "testsecret"})
    with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
        chunk = os.urandom(1 << 20)
        for _ in range(mb):
            f.write(chunk)
        path = f.name
    try:
        d = WebhookDispatcher(settings)
        await d.start()
        rss_before = rss_mb()
        tracemalloc.start()
        t0 = time.perf_counter()
        body = v1_output_body(id="job", filename="x.png", prompt={}, stats={}, image_path=path)
        ok = await (await d.send_prompt(url, body, "job"))
        took = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        await d.close(10)
        print(
            f"v1 output.complete, {mb} MiB file -> {body.length / 2**20:.0f} MiB body: "
            f"ok={ok} {took:.2f} s ({mb / took:.0f} MiB/s incl. signing pass), "
            f"traced peak {peak / 2**20:.1f} MiB, max RSS {rss_before:.0f} -> {rss_mb():.0f} MiB"
        )
    finally:
        os.unlink(path)


async def flood(url: str) -> None:
    settings = load_settings(
        {"HOME": "/tmp", "SYSTEM_WEBHOOK_URL": url, "SYSTEM_WEBHOOK_EVENTS": "all"}
    )
    d = WebhookDispatcher(settings)
    await d.start()
    tasks0 = len(asyncio.all_tasks())
    tracemalloc.start()
    peak_pending = peak_tasks = 0
    t0 = time.perf_counter()
    for p in range(200):
        for step in range(20):
            d.handle_comfy_frame(
                {
                    "type": "progress",
                    "data": {"value": step, "max": 20, "prompt_id": f"c{p}", "node": "3"},
                },
                lambda c: "api-" + c,
            )
            peak_pending = max(peak_pending, d.pending["system"])
        peak_tasks = max(peak_tasks, len(asyncio.all_tasks()) - tasks0)
        await asyncio.sleep(0.005)
    emit = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    await d.close(1)
    c = d.counters
    print(
        f"flood: 200 prompts x 20 progress to a 50 ms receiver over {emit:.1f} s: "
        f"delivered {c['delivered']}, dropped {c['dropped']}, abandoned at close "
        f"{c['abandoned']}, peak queued {peak_pending}, extra tasks {peak_tasks}, "
        f"traced peak {peak / 2**20:.1f} MiB"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file-mb", type=int, default=100)
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    fast, fast_url = start_receiver()
    slow, slow_url = start_receiver(0.05)
    try:
        await throughput(fast_url, args.events)
        await streamed_file(fast_url, args.file_mb)
        await flood(slow_url)
    finally:
        fast.shutdown()
        slow.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
