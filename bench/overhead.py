"""Sidecar overhead against the floor: a client talking to the same ComfyUI directly.

    COMFY_HOME=~/.cache/real-comfyui python bench/overhead.py [--iterations 60] [--seconds 20]
    COMFY_HOME=~/.cache/real-comfyui python bench/overhead.py local [--reps 5] [--profile]
        [--baseline REF]

``local`` is the co-located floor side by side with the sidecar, repeated: each repetition runs
--iterations jobs at concurrency 1 alternating floor and sidecar, then a block of --seconds at
concurrency 4 for each (the order swaps every repetition), and reads the sidecar's CPU time
(utime + stime from /proc/<pid>/stat, all threads) around its block: CPU ms per job. It prints
one row per repetition and the medians of the ratios. ``--profile`` then samples the sidecar with
py-spy during --profile-jobs sequential jobs and prints CPU ms per job by library.

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
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from comfy_sidecar.comfy.client import ComfyClient  # noqa: E402
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
    """The co-located client: one websocket with its own client_id, prompt_id chosen up front,
    ``POST /prompt`` through the sidecar's own :class:`ComfyClient` (so both sides pay the same
    HTTP client), outputs taken from ``executed`` frames, files read (base64, as the response
    carries them) and deleted from ComfyUI's output directory."""

    def __init__(self, comfy: str, output_dir: Path) -> None:
        self.comfy = comfy
        self.output_dir = output_dir
        self.client_id = f"floor-{uuid.uuid4()}"
        self.waiters: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self.outputs: dict[str, list[dict[str, Any]]] = {}
        self.http = ComfyClient(comfy, timeout_s=60)
        self.decoder = msgspec.json.Decoder()

    async def start(self) -> None:
        ws_url = self.comfy.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        self.ws = await websockets.connect(ws_url, max_size=None, compression=None, proxy=None)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if not isinstance(message, str):
                continue
            frame = self.decoder.decode(message)
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
        await self.http.queue_prompt(prompt(f"floor_{pid}"), pid, self.client_id)
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


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread, living or gone) the process ``pid`` used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def counted_throughput(runner: Any, concurrency: int, seconds: float) -> tuple[int, float]:
    """(jobs done, seconds taken) with ``concurrency`` workers running jobs for ``seconds``."""
    done = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await runner.run()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, time.perf_counter() - started


LIBRARIES = {
    "httpx": "httpx",
    "httpcore": "httpcore",
    "h11": "h11",
    "aiohttp": "aiohttp",
    "websockets": "websockets",
    "litestar": "litestar",
    "uvicorn": "uvicorn",
    "msgspec": "msgspec",
    "comfy_sidecar": "comfy_sidecar",
    "uvloop": "event loop",
    "asyncio": "event loop",
}


def profile_summary(path: Path) -> list[tuple[str, float]]:
    """Shares of the samples by library in a py-spy speedscope file, largest first: a sample
    counts for the innermost listed library on its stack (``other`` when none)."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    owner = []
    for frame in frames:
        where = frame.get("file", "") + " " + frame.get("name", "")
        owner.append(next((lib for key, lib in LIBRARIES.items() if f"/{key}/" in where), None))
    totals: dict[str, float] = {}
    for profile in doc["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            lib = next((owner[i] for i in reversed(stack) if owner[i]), "other")
            totals[lib] = totals.get(lib, 0.0) + weight
    whole = sum(totals.values()) or 1.0
    return sorted(((k, v / whole) for k, v in totals.items()), key=lambda kv: -kv[1])


async def local_async(args: argparse.Namespace) -> None:
    """The ``local`` mode: floor and sidecar side by side, ``--reps`` times; with
    ``--baseline REF`` a second sidecar running REF's code (its own ComfyUI) joins every
    rotation, so the two sidecars are measured under the same load."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-local-"))
    kind = "real" if os.environ.get("COMFY_HOME") else "double"
    sidecar = make_sidecar(Backend(kind, tmp / "comfy"), tmp, LOG_LEVEL="warn")
    sidecar.start(python=args.python)
    parties = [("sidecar", sidecar)]
    if args.baseline:
        from queue_bench import checkout

        base_tmp = tmp / "baseline"
        base_tmp.mkdir()
        python = checkout(args.baseline, base_tmp / "code", args.python or sys.executable)
        base = make_sidecar(Backend(kind, base_tmp / "comfy"), base_tmp, LOG_LEVEL="warn")
        base.start(python=python)
        parties.append(("baseline", base))
    rows: list[dict[str, float]] = []
    profile: list[tuple[str, float]] = []
    profile_cpu = 0.0
    try:
        for _, party in parties:
            party.wait_ready()
        pids = {name: party.proc.pid for name, party in parties}  # type: ignore[union-attr]
        floor = Floor(f"http://127.0.0.1:{sidecar.comfy_port}", sidecar.backend.output_dir)
        await floor.start()
        runners: dict[str, Any] = {"floor": floor}
        for name, party in parties:
            runners[name] = ViaSidecar(party.url)
        names = list(runners)
        for _ in range(5):  # warm every path
            for runner in runners.values():
                await runner.run()
        for rep in range(args.reps):
            latencies: dict[str, list[float]] = {name: [] for name in names}
            for i in range(args.iterations):
                shift = (i + rep) % len(names)
                for name in names[shift:] + names[:shift]:
                    latencies[name].append(await runners[name].run())
            row: dict[str, float] = {}
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                cpu_before = cpu_s(pids[name]) if name in pids else 0.0
                done, took = await counted_throughput(runners[name], 4, args.seconds)
                row[f"{name} jobs/s"] = done / took
                if name in pids:
                    row[f"{name} cpu"] = (cpu_s(pids[name]) - cpu_before) * 1000 / done
            for name in names:
                row[f"{name} p50"] = statistics.median(latencies[name]) * 1000
            rows.append(row)
            print(
                f"rep {rep + 1}: "
                + " | ".join(
                    f"{name} p50 {row[name + ' p50']:6.1f} ms c=4 {row[name + ' jobs/s']:5.2f}/s"
                    + (f" CPU {row[name + ' cpu']:.2f} ms/job" if name in pids else "")
                    for name in names
                ),
                flush=True,
            )
        if args.profile:
            cpu_before = cpu_s(pids["sidecar"])
            profile = await profile_sidecar(
                runners["sidecar"], pids["sidecar"], args.profile_jobs, tmp / "profile.json"
            )
            profile_cpu = (cpu_s(pids["sidecar"]) - cpu_before) * 1000 / args.profile_jobs
        for runner in runners.values():
            await runner.close()
    finally:
        for _, party in parties:
            party.stop()
    med = statistics.median
    print(f"backend: {kind} ComfyUI; prompt EmptyImage 256x256 -> ImageInvert -> SaveImage")
    print(f"{args.reps} repetitions of {args.iterations} sequential jobs each (rotating order)")
    print(f"and {args.seconds:g} s at c=4 each; medians over repetitions:")
    for name in names[1:]:
        print(
            f"  {name:8s} p50 {med(r[name + ' p50'] for r in rows):6.1f} ms "
            f"(floor ratio {med(r[name + ' p50'] / r['floor p50'] for r in rows):.3f}, <= 1.15) "
            f"| c=4 {med(r[name + ' jobs/s'] for r in rows):5.2f}/s "
            f"(floor ratio {med(r[name + ' jobs/s'] / r['floor jobs/s'] for r in rows):.3f}, "
            f">= 0.90) | CPU {med(r[name + ' cpu'] for r in rows):.2f} ms/job"
        )
    print(
        f"  floor    p50 {med(r['floor p50'] for r in rows):6.1f} ms | c=4 "
        f"{med(r['floor jobs/s'] for r in rows):5.2f}/s"
    )
    if args.baseline:
        print(
            f"  sidecar / baseline ({args.baseline}): CPU per job "
            f"{med(r['sidecar cpu'] / r['baseline cpu'] for r in rows):.3f}, c=4 throughput "
            f"{med(r['sidecar jobs/s'] / r['baseline jobs/s'] for r in rows):.3f}, p50 "
            f"{med(r['sidecar p50'] / r['baseline p50'] for r in rows):.3f}"
        )
    if profile:
        print(
            f"py-spy, {args.profile_jobs} sequential jobs: {profile_cpu:.2f} ms CPU/job "
            "(/proc/<pid>/stat); samples by innermost library:"
        )
        for lib, share in profile:
            print(f"  {lib:14s} {share:4.0%}  {share * profile_cpu:5.2f} ms")


async def profile_sidecar(
    via: ViaSidecar, pid: int, jobs: int, out: Path
) -> list[tuple[str, float]]:
    """Run ``jobs`` sequential jobs under ``py-spy record``; CPU ms per job by library."""
    rate = 250
    spy = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "py-spy"),
        "record",
        "--format",
        "speedscope",
        "--rate",
        str(rate),
        "--nonblocking",
        "-o",
        str(out),
        "-p",
        str(pid),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await asyncio.sleep(1)  # py-spy attaches
    for _ in range(jobs):
        await via.run()
    spy.send_signal(signal.SIGINT)
    await asyncio.wait_for(spy.wait(), 60)
    return profile_summary(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=["full", "local"], default="full")
    parser.add_argument("--iterations", type=int, help="sequential jobs each side (60; local: 30)")
    parser.add_argument("--seconds", type=float, help="c=4 seconds each side (20; local: 8)")
    parser.add_argument("--reps", type=int, default=5, help="local: repetitions")
    parser.add_argument("--profile", action="store_true", help="local: py-spy the sidecar")
    parser.add_argument("--profile-jobs", type=int, default=200)
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="local: also run a sidecar from git REF's code (e.g. main) in every rotation",
    )
    parser.add_argument(
        "--python",
        help="interpreter that has comfy-sidecar installed (e.g. a "
        "clean venv with only its dependencies); default: this one",
    )
    args = parser.parse_args()
    local = args.mode == "local"
    args.iterations = args.iterations or (30 if local else 60)
    args.seconds = args.seconds or (8.0 if local else 20.0)
    asyncio.run(local_async(args) if local else main_async(args))


if __name__ == "__main__":
    main()
