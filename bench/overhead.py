"""Sidecar overhead against the floor: a client talking to the same ComfyUI directly.

    COMFY_HOME=~/.cache/real-comfyui python bench/overhead.py [--iterations 60] [--seconds 20]

Starts the sidecar (python -m comfy_sidecar) with a real ComfyUI as its child (COMFY_HOME, laid
out by shared/scripts/real-comfyui.sh) or, without COMFY_HOME, the test double. The prompt is
EmptyImage(256x256, random colour) -> ImageInvert -> SaveImage. The floor client keeps one
websocket open, POSTs /prompt with its client_id and its own prompt_id, waits for
``executing{node: null}``, and reads the output file (then deletes it), as the sidecar does.

Prints: p50/p90 latency for floor and sidecar at concurrency 1 (runs alternate), throughput at
concurrency 4 (alternating blocks of --seconds), the sidecar's idle RSS, and the time from exec
to the first probe answer (over 5 fresh starts). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Backend, free_port, make_sidecar  # noqa: E402


def prompt(prefix: str) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {
                "width": 256,
                "height": 256,
                "batch_size": 1,
                "color": random.randrange(1 << 24),
            },
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


class Floor:
    """The direct client: one websocket, prompt_id chosen up front, file read from disk."""

    def __init__(self, comfy: str, output_dir: Path) -> None:
        self.comfy = comfy
        self.output_dir = output_dir
        self.client_id = f"floor-{uuid.uuid4()}"
        self.waiters: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self.outputs: dict[str, list[dict[str, Any]]] = {}
        self.http = httpx.AsyncClient(base_url=comfy, timeout=60)

    async def start(self) -> None:
        ws_url = self.comfy.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        self.ws = await websockets.connect(ws_url, max_size=None, compression=None)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if not isinstance(message, str):
                continue
            frame = json.loads(message)
            data = frame.get("data") or {}
            pid = data.get("prompt_id")
            if frame["type"] == "executed" and pid in self.waiters:
                self.outputs.setdefault(pid, []).extend(data["output"].get("images", []))
            elif frame["type"] == "executing" and data.get("node") is None and pid in self.waiters:
                self.waiters.pop(pid).set_result(self.outputs.pop(pid, []))

    async def run(self) -> float:
        started = time.perf_counter()
        pid = str(uuid.uuid4())
        future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self.waiters[pid] = future
        response = await self.http.post(
            "/prompt",
            json={"prompt": prompt(f"floor_{pid}"), "client_id": self.client_id, "prompt_id": pid},
        )
        response.raise_for_status()
        images = await future
        for image in images:
            path = self.output_dir / image["subfolder"] / image["filename"]
            base64.b64encode(path.read_bytes())
            path.unlink()
        return time.perf_counter() - started

    async def close(self) -> None:
        self.reader.cancel()
        await self.ws.close()
        await self.http.aclose()


class ViaSidecar:
    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=60)

    async def run(self) -> float:
        started = time.perf_counter()
        response = await self.http.post("/prompt", json={"prompt": prompt("sc")})
        response.raise_for_status()
        assert len(response.json()["images"]) == 1
        return time.perf_counter() - started

    async def close(self) -> None:
        await self.http.aclose()


async def throughput(runner: Any, concurrency: int, seconds: float) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await runner.run()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe_latency(runs: int, python: str) -> list[float]:
    """Seconds from exec to the first HTTP answer on /health (CMD sleeps: no ComfyUI)."""
    results = []
    for _ in range(runs):
        port = free_port()
        env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "CMD": "sleep 30"}
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "comfy_sidecar"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                results.append(time.perf_counter() - started)
                break
            except httpx.HTTPError:
                time.sleep(0.002)
        proc.terminate()
        proc.wait()
    return results


async def main_async(args: argparse.Namespace) -> None:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    kind = "real" if os.environ.get("COMFY_HOME") else "double"
    sidecar = make_sidecar(Backend(kind, tmp / "comfy"), tmp, LOG_LEVEL="warn")
    sidecar.start(python=args.python)
    try:
        sidecar.wait_ready()
        await asyncio.sleep(2)
        idle_rss = rss_mb(sidecar.proc.pid)  # type: ignore[union-attr]
        comfy = f"http://127.0.0.1:{sidecar.comfy_port}"
        floor = Floor(comfy, sidecar.backend.output_dir)
        await floor.start()
        via = ViaSidecar(sidecar.url)
        for _ in range(5):  # warm both paths
            await floor.run()
            await via.run()
        floor_lat, side_lat = [], []
        for i in range(args.iterations):
            if i % 2:
                floor_lat.append(await floor.run())
                side_lat.append(await via.run())
            else:
                side_lat.append(await via.run())
                floor_lat.append(await floor.run())
        blocks = []
        for _ in range(2):
            blocks.append(("floor", await throughput(floor, 4, args.seconds / 2)))
            blocks.append(("sidecar", await throughput(via, 4, args.seconds / 2)))
        busy_rss = rss_mb(sidecar.proc.pid)  # type: ignore[union-attr]
        await floor.close()
        await via.close()
    finally:
        sidecar.stop()

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[int(q) - 1] * 1000

    f50, s50 = statistics.median(floor_lat) * 1000, statistics.median(side_lat) * 1000
    f_tp = statistics.mean(v for k, v in blocks if k == "floor")
    s_tp = statistics.mean(v for k, v in blocks if k == "sidecar")
    probes = probe_latency(5, args.python or sys.executable)
    print(f"sidecar python: {args.python or sys.executable}")
    print(f"backend: {kind} ComfyUI; prompt EmptyImage 256x256 -> ImageInvert -> SaveImage")
    print(f"latency c=1, {args.iterations} runs each (alternating):")
    print(f"  floor   p50 {f50:7.1f} ms  p90 {pct(floor_lat, 90):7.1f} ms")
    print(f"  sidecar p50 {s50:7.1f} ms  p90 {pct(side_lat, 90):7.1f} ms")
    print(f"  ratio p50 {s50 / f50:.3f}  (goal <= 1.05)")
    print(f"throughput c=4, {args.seconds:g} s each (alternating blocks):")
    print(f"  floor {f_tp:.2f}/s  sidecar {s_tp:.2f}/s  ratio {s_tp / f_tp:.3f}  (goal >= 0.95)")
    print(f"sidecar RSS: idle {idle_rss:.1f} MB (goal <= 60), after load {busy_rss:.1f} MB")
    print(
        "exec -> first probe answer: "
        + ", ".join(f"{p * 1000:.0f}" for p in probes)
        + f" ms (max {max(probes) * 1000:.0f} ms, goal <= 500)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--python",
        help="interpreter that has comfy-sidecar installed (e.g. a "
        "clean venv with only its dependencies); default: this one",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
