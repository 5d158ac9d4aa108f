"""Job API figures (issue 11): SSE latency with 100 subscribers, RSS of retained jobs,
``GET /jobs/{id}`` latency under an open-loop load.

    python bench/jobs_bench.py [--subscribers 100] [--ticks 50] [--jobs 1000] [--rate 200]
        [--seconds 10]

Starts the sidecar (``python -m comfy_sidecar``) in front of the ComfyUI double
(tests/comfy_double.py; the figures are the sidecar's, the double only feeds it frames).

1. **Frame -> SSE latency.** One job runs EmptyImage 2048² -> ImageBlur (~1.5 s in the double,
   while ``--subscribers`` clients open ``GET /jobs/{id}/events``) -> DoubleTicks -> SaveImage.
   DoubleTicks is a test-only node of the double: it sends ``--ticks`` ComfyUI ``progress``
   frames (value 1..N) 20 ms apart and keeps the wall-clock time (``time.time()``) just before
   each send, served at ``GET /__double__/tick_times/{prompt_id}``. Each client (a raw asyncio
   HTTP/1.1 reader, so client-side parsing adds little) stamps ``time.time()`` when the SSE
   ``progress`` event with ``progress_value`` i arrives. Both processes read the same system
   clock, so latency = arrival - send, over every (client, tick). Goal p50 <= 5 ms.
2. **RSS of retained jobs.** ``VmRSS`` of the sidecar (``/proc/<pid>/status``) after 20
   warm-up jobs, then after ``--jobs`` more tiny jobs (EmptyImage 8² -> SaveImage, ``POST
   /jobs`` 8 at a time, each awaited with ``?wait=``) are all completed and retained
   (JOB_RETENTION_MAX = jobs + 20). Goal growth <= 20 MB.
3. **GET /jobs/{id} at --rate req/s.** Open loop: request i is sent at t0 + i/rate whatever the
   earlier ones did, for ``--seconds``, against a retained completed job (with the store full
   from part 2); latency per request on a keep-alive httpx pool. Goal p50 <= 2 ms. An open loop
   that the server cannot keep up with queues without bound, so a loaded machine shows
   seconds, not milliseconds; the p50 of 200 sequential requests is printed beside it.

Printed, never asserted; ``/proc/loadavg`` is printed with each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from overhead import rss_mb  # noqa: E402  (bench/ is sys.path[0])

from tests.conftest import Backend, Sidecar, make_sidecar  # noqa: E402


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def tiny_prompt(n: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": n},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "j"}},
    }


def ticks_prompt(ticks: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 2048, "height": 2048, "batch_size": 1, "color": int(time.time())},
        },
        "2": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0},
        },
        "3": {
            "class_type": "DoubleTicks",
            "inputs": {"image": ["2", 0], "steps": ticks, "interval_ms": 20},
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "t"}},
    }


async def subscribe(
    port: int, job_id: str, connected: asyncio.Event, count: list[int], n: int
) -> dict[int, float]:
    """Follow the job's SSE stream; {progress_value: arrival time.time()} of progress events."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: b\r\nAccept: text/event-stream\r\n"
    writer.write(request.encode() + b"\r\n")
    await writer.drain()
    arrivals: dict[int, float] = {}
    event = b""
    seen_first = False
    while True:
        line = await reader.readline()
        now = time.time()
        if not line:
            break
        if line.startswith(b"event:"):
            event = line[6:].strip()
        elif line.startswith(b"data:"):
            if not seen_first:
                seen_first = True
                count[0] += 1
                if count[0] == n:
                    connected.set()
            if event == b"progress":
                body = json.loads(line[5:])
                if body.get("progress_max") and body["current_node_type"] == "DoubleTicks":
                    arrivals.setdefault(int(body["progress_value"]), now)
            elif event == b"done":
                break
    writer.close()
    return arrivals


async def sse_latency(sidecar: Sidecar, subscribers: int, ticks: int) -> tuple[list[float], bool]:
    """Latencies (ms) of every (subscriber, tick); whether all subscribed before the ticks."""
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=120) as http:
        job = (await http.post("/jobs", json={"prompt": ticks_prompt(ticks)})).json()
        connected, count = asyncio.Event(), [0]
        tasks = [
            asyncio.ensure_future(subscribe(sidecar.port, job["id"], connected, count, subscribers))
            for _ in range(subscribers)
        ]
        await asyncio.wait_for(connected.wait(), 60)
        status = (await http.get(f"/jobs/{job['id']}")).json()
        in_time = status["current_node_type"] in (None, "EmptyImage", "ImageBlur")
        results = await asyncio.gather(*tasks)
        final = (await http.get(f"/jobs/{job['id']}")).json()
        comfy = f"http://127.0.0.1:{sidecar.comfy_port}"
        sent = (await http.get(f"{comfy}/__double__/tick_times/{final['prompt_id']}")).json()
    latencies = [
        (arrivals[i + 1] - t) * 1000
        for arrivals in results
        for i, t in enumerate(sent)
        if i + 1 in arrivals
    ]
    return latencies, in_time


async def retained_rss(sidecar: Sidecar, jobs: int) -> tuple[float, float, float]:
    """(RSS MB after 20 warm-up jobs, RSS MB with ``jobs`` more retained, seconds taken)."""
    assert sidecar.proc is not None
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=120) as http:
        gate = asyncio.Semaphore(8)

        async def one(n: int) -> None:
            async with gate:
                job = (await http.post("/jobs", json={"prompt": tiny_prompt(n)})).json()
                done = (await http.get(f"/jobs/{job['id']}", params={"wait": 60})).json()
                assert done["status"] == "completed", done

        await asyncio.gather(*(one(n) for n in range(20)))
        await asyncio.sleep(1)
        before = rss_mb(sidecar.proc.pid)
        started = time.monotonic()
        await asyncio.gather(*(one(n) for n in range(20, 20 + jobs)))
        took = time.monotonic() - started
        await asyncio.sleep(1)
        listed = (await http.get("/jobs", params={"limit": 1})).json()
        assert listed["jobs"], listed
        return before, rss_mb(sidecar.proc.pid), took


async def get_latency(
    sidecar: Sidecar, rate: float, seconds: float
) -> tuple[list[float], float, float]:
    """Latencies (ms) of open-loop ``GET /jobs/{id}``, the rate they were sent at (req/s) and,
    for reference, the p50 (ms) of 200 sequential requests (closed loop)."""
    async with httpx.AsyncClient(
        base_url=sidecar.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=64)
    ) as http:
        job_id = (await http.get("/jobs", params={"limit": 1})).json()["jobs"][0]["id"]
        latencies: list[float] = []

        async def one() -> None:
            started = time.perf_counter()
            response = await http.get(f"/jobs/{job_id}")
            latencies.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()

        for _ in range(200):  # closed loop (also opens the pool's connections)
            await one()
        sequential = statistics.median(latencies)
        latencies.clear()
        tasks = []
        t0 = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        sent_rate = total / (time.perf_counter() - t0)
        await asyncio.gather(*tasks)
        return latencies, sent_rate, sequential


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    sidecar = make_sidecar(
        Backend("double", tmp / "comfy"),
        tmp,
        LOG_LEVEL="warn",
        JOB_RETENTION_MAX=str(args.jobs + 40),
        JOBS_DIR=str(tmp / "jobs"),
    )
    sidecar.start()
    try:
        sidecar.wait_ready()
        before, after, took = await retained_rss(sidecar, args.jobs)
        rss_load = loadavg()
        latencies, in_time = await sse_latency(sidecar, args.subscribers, args.ticks)
        sse_load = loadavg()
        gets, achieved, sequential = await get_latency(sidecar, args.rate, args.seconds)
        get_load = loadavg()
    finally:
        sidecar.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("backend: ComfyUI double; sidecar: python -m comfy_sidecar (LOG_LEVEL=warn)")
    print(
        f"1. frame -> SSE progress event, {args.subscribers} subscribers x {args.ticks} ticks "
        f"({len(latencies)} samples{'' if in_time else '; some subscribed late'}):"
    )
    print(
        f"   p50 {statistics.median(latencies):6.2f} ms  p90 {pct(latencies, 90):6.2f} ms  "
        f"max {max(latencies):6.2f} ms   (goal p50 <= 5 ms)   load {sse_load}"
    )
    print(f"2. RSS with {args.jobs} retained jobs ({took:.1f} s to run them):")
    print(
        f"   before {before:6.1f} MB  after {after:6.1f} MB  growth {after - before:5.1f} MB"
        f"   (goal <= 20 MB)   load {rss_load}"
    )
    print(f"3. GET /jobs/{{id}} open loop at {args.rate:g} req/s for {args.seconds:g} s:")
    print(
        f"   p50 {statistics.median(gets):6.2f} ms  p90 {pct(gets, 90):6.2f} ms  "
        f"p99 {pct(gets, 99):6.2f} ms  sent {achieved:.0f}/s   (goal p50 <= 2 ms)   "
        f"load {get_load}"
    )
    print(f"   (closed loop, one request at a time: p50 {sequential:.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
