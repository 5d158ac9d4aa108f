"""Comfy API v2 figures (issue 22), measured with the official comfy-sdk as a client.

    python bench/v2_bench.py sdk [--jobs 40] [--proxy /tmp/proxyvenv/bin/comfy-api-proxy]
    python bench/v2_bench.py frames [--runs 5] [--ticks 50]

1. **sdk** (needs a real ComfyUI: ``COMFY_HOME``). The sidecar starts its ComfyUI as usual
   (CPU); ``comfy-api-proxy`` 0.1.6 (installed apart: ``python3 -m venv /tmp/proxyvenv &&
   /tmp/proxyvenv/bin/pip install comfy-api-proxy==0.1.6``; never in this repo's venv) runs in
   front of that same ComfyUI (``--comfyui http://127.0.0.1:<its port>``). Each round runs one
   job through each, in alternating order, with the SDK the way its quickstart does:
   ``submit``, follow ``events()`` to the terminal status, ``refresh``, download the output
   (``Output.to_bytes``: ``GET /api/v2/assets/{id}/content``). The workflow is
   EmptyImage 256² -> ImageInvert -> SaveImage with a fresh colour per job (no cache hit on
   either side). Printed per surface: p50 and p95 of each step and of the whole job, and
   the sidecar's p50 as a ratio of the proxy's. ``comfyui`` is ComfyUI's own time for each
   job (``execution_start`` to ``execution_success`` in its ``/history``, for either surface's
   jobs), ``surface`` the rest: what the API in front of it added; on a loaded machine
   ComfyUI's own time varies most, so the ``surface`` ratio is printed too, and each front
   process's CPU time per job (``/proc/<pid>/stat``: what load does not blur). Goals:
   sidecar p50 <= 0.8 x the proxy's; the sidecar's p95 <= 1.5 x its own p50.
2. **frames** (the ComfyUI double). One job runs EmptyImage 2048² -> ImageBlur (~1.5 s in the
   double, while an SDK client opens ``events()``) -> DoubleTicks -> SaveImage. DoubleTicks
   (tests/comfy_double.py) sends ``--ticks`` ComfyUI ``progress`` frames 20 ms apart and keeps
   the wall-clock time just before each send (``GET /__double__/tick_times/{prompt_id}``);
   the SDK client (``job.events()``, pattern-matched ``Progress``) stamps ``time.time()`` when
   the v2 ``progress`` event with ``step`` i arrives. Latency = arrival - send, over every
   tick of ``--runs`` jobs. Goal p50 <= 5 ms.

Printed, never asserted; ``/proc/loadavg`` is printed with each figure.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from comfy_sdk import Comfy  # noqa: E402
from comfy_sdk.events import Progress, StatusChange  # noqa: E402
from overhead import cpu_s, prompt  # noqa: E402  (bench/ is sys.path[0])

from tests.conftest import Backend, Sidecar, free_port, make_sidecar  # noqa: E402

STEPS = ("submit", "events", "refresh", "download", "total")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def client_for(url: str) -> Comfy:
    os.environ["COMFY_BASE_URL"] = url
    return Comfy(timeout=120)


def comfyui_seconds(comfy: str, prompt_id: str) -> float:
    """ComfyUI's own time for one prompt: its ``execution_start`` to ``execution_success``
    timestamps in ``/history`` (the same clock for either surface's jobs)."""
    for _ in range(50):
        entry = httpx.get(f"{comfy}/history/{prompt_id}").json().get(prompt_id)
        if entry:
            stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
            return (stamps["execution_success"] - stamps["execution_start"]) / 1000
        time.sleep(0.01)
    raise RuntimeError(f"prompt {prompt_id} is not in ComfyUI's history")


def one_job(client: Comfy, comfy: str | None = None, native: str | None = None) -> dict[str, float]:
    """One job the quickstart way; seconds spent in each step. With ``comfy`` (ComfyUI's URL)
    also ``comfyui``, ComfyUI's own time for the job, and ``surface``, the rest (what the API
    in front added); ``native`` is the sidecar's URL, where the job's prompt id is read."""
    times: dict[str, float] = {}
    start = time.perf_counter()
    job = client.submit(client.workflows.from_json(prompt("b")))
    mark = time.perf_counter()
    times["submit"] = mark - start
    for event in job.events():
        match event:
            case StatusChange(status="succeeded" | "failed" | "canceled" | "expired"):
                break
    times["events"] = time.perf_counter() - mark
    mark = time.perf_counter()
    job.refresh()
    times["refresh"] = time.perf_counter() - mark
    if job.status != "succeeded":
        raise RuntimeError(f"job {job.id} ended {job.status}: {job.error}")
    mark = time.perf_counter()
    data = job.outputs[0].to_bytes()
    times["download"] = time.perf_counter() - mark
    if not data.startswith(b"\x89PNG"):
        raise RuntimeError("the output is not a PNG")
    times["total"] = time.perf_counter() - start
    if comfy is not None:
        prompt_id = job.id
        if native is not None:
            prompt_id = httpx.get(f"{native}/jobs/{job.id}").json()["prompt_id"]
        times["comfyui"] = comfyui_seconds(comfy, prompt_id)
        times["surface"] = times["total"] - times["comfyui"]
    return times


@contextmanager
def proxy(binary: str, comfy_port: int, log: Path) -> Iterator[tuple[str, int]]:
    """comfy-api-proxy in front of the ComfyUI on ``comfy_port``; yields its base URL and
    pid."""
    port = free_port()
    argv = [binary, "run", "--comfyui", f"http://127.0.0.1:{comfy_port}", "--port", str(port)]
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/api/v2/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"comfy-api-proxy did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def report(name: str, rows: list[dict[str, float]]) -> None:
    cells = []
    for step in (*STEPS, "comfyui", "surface"):
        if step not in rows[0]:
            continue
        values = [row[step] * 1000 for row in rows]
        cells.append(
            f"{step} p50 {statistics.median(values):7.1f} p95 {percentile(values, 95):7.1f}"
        )
    print(f"  {name:8s} " + " | ".join(cells) + " (ms)")


def sdk_figures(args: argparse.Namespace, tmp: Path) -> None:
    if not os.environ.get("COMFY_HOME"):
        print("sdk: COMFY_HOME is not set (a real ComfyUI is needed); skipped")
        return
    sidecar = make_sidecar(Backend("real", tmp / "comfy"), tmp, LOG_LEVEL="warn")
    sidecar.start()
    try:
        sidecar.wait_ready(timeout=300)
        with proxy(args.proxy, sidecar.comfy_port, tmp / "proxy.log") as (proxy_url, proxy_pid):
            clients = {"sidecar": client_for(sidecar.url), "proxy": client_for(proxy_url)}
            assert sidecar.proc is not None
            pids = {"sidecar": sidecar.proc.pid, "proxy": proxy_pid}
            for client in clients.values():  # warm both (imports, connections, ComfyUI)
                for _ in range(3):
                    one_job(client)
            cpu = {name: cpu_s(pid) for name, pid in pids.items()}
            rows: dict[str, list[dict[str, float]]] = {name: [] for name in clients}
            for round_ in range(args.jobs):
                order = list(clients) if round_ % 2 == 0 else list(reversed(clients))
                comfy = f"http://127.0.0.1:{sidecar.comfy_port}"
                for name in order:
                    native = sidecar.url if name == "sidecar" else None
                    rows[name].append(one_job(clients[name], comfy, native))
            used = {name: (cpu_s(pid) - cpu[name]) * 1000 / args.jobs for name, pid in pids.items()}
            print(f"sdk: {args.jobs} jobs each, alternating (load {loadavg()}):")
            for name, measured in rows.items():
                report(name, measured)
            print(
                f"  CPU per job (the process in front of ComfyUI, /proc/<pid>/stat): sidecar "
                f"{used['sidecar']:.1f} ms, proxy {used['proxy']:.1f} ms"
            )
            ours = statistics.median(r["total"] for r in rows["sidecar"])
            theirs = statistics.median(r["total"] for r in rows["proxy"])
            p95 = percentile([r["total"] for r in rows["sidecar"]], 95)
            added = statistics.median(r["surface"] for r in rows["sidecar"])
            added_theirs = statistics.median(r["surface"] for r in rows["proxy"])
            comfyui = [r["comfyui"] for r in rows["sidecar"]]
            spread = percentile(comfyui, 95) / statistics.median(comfyui)
            print(
                f"  sidecar p50 / proxy p50 = {ours / theirs:.2f} (goal <= 0.8); "
                f"without ComfyUI's own time (surface) {added / added_theirs:.2f}; "
                f"sidecar p95 / its p50 = {p95 / ours:.2f} (goal <= 1.5); ComfyUI's own "
                f"time p95 / p50 in the same jobs = {spread:.2f}"
            )
            for client in clients.values():
                client.close()
    finally:
        sidecar.stop()


def ticks_prompt(ticks: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {
                "width": 2048,
                "height": 2048,
                "batch_size": 1,
                "color": random.randrange(1 << 24),
            },
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


def frame_latencies(sidecar: Sidecar, client: Comfy, ticks: int) -> list[float]:
    """ms from each DoubleTicks frame's send to the SDK client's ``Progress`` with its step."""
    job = client.submit(client.workflows.from_json(ticks_prompt(ticks)))
    arrivals: dict[int, float] = {}
    for event in job.events():
        match event:
            case Progress(step=step, current_node="3") if step:
                arrivals.setdefault(step, time.time())
            case StatusChange(status="succeeded" | "failed" | "canceled" | "expired"):
                break
    prompt_id = sidecar.get(f"/jobs/{job.id}").json()["prompt_id"]
    sent = httpx.get(
        f"http://127.0.0.1:{sidecar.comfy_port}/__double__/tick_times/{prompt_id}"
    ).json()
    return [(arrivals[i + 1] - at) * 1000 for i, at in enumerate(sent) if i + 1 in arrivals]


def frames_figures(args: argparse.Namespace, tmp: Path) -> None:
    sidecar = make_sidecar(Backend("double", tmp / "double"), tmp, LOG_LEVEL="warn")
    sidecar.start()
    try:
        sidecar.wait_ready()
        client = client_for(sidecar.url)
        latencies: list[float] = []
        for _ in range(args.runs):
            latencies += frame_latencies(sidecar, client, args.ticks)
        client.close()
        expected = args.runs * args.ticks
        print(
            f"frames: frame -> SSE progress to an SDK client, {len(latencies)}/{expected} ticks "
            f"(load {loadavg()}): p50 {statistics.median(latencies):.2f} ms, "
            f"p95 {percentile(latencies, 95):.2f} ms, max {max(latencies):.2f} ms (goal p50 <= 5)"
        )
    finally:
        sidecar.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="*", choices=["sdk", "frames"], default=["sdk", "frames"])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--proxy", default="/tmp/proxyvenv/bin/comfy-api-proxy")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ticks", type=int, default=50)
    args = parser.parse_args()
    parts: dict[str, Callable[[argparse.Namespace, Path], None]] = {
        "sdk": sdk_figures,
        "frames": frames_figures,
    }
    tmp = Path(tempfile.mkdtemp(prefix="v2-bench-"))
    try:
        for name in dict.fromkeys(args.part):
            parts[name](args, tmp / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
