"""Instance figures (issue 12): throughput of 2 ComfyUI instances vs 1 on a CPU-bound prompt,
and the idle gap between two queued jobs on one instance.

    COMFY_HOME=~/.cache/real-comfyui python bench/instances_bench.py [--jobs 12] [--blocks 2]
        [--size 1024] [--blurs 2] [--gap-jobs 30]
    python bench/instances_bench.py --double     # the ComfyUI double (a smoke run: its
                                                 # ImageBlur sleeps, so it is not CPU-bound)

(a) Two sidecars run side by side, one with ``COMFYUI_INSTANCES=1``, one with
``COMFYUI_INSTANCES=2`` (CMD holds ``{port}``). Every ComfyUI child gets one torch thread:
ComfyUI has no flag for it, so CMD is ``env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 <python>
main.py --cpu --port {port} ...``. The prompt is EmptyImage ``--size``² (random colour, so
never cached) -> ImageBlur x ``--blurs`` (radius 31: a torch conv2d, CPU-bound) -> SaveImage.
A block submits ``--jobs`` jobs at once with ``POST /jobs`` and waits for all; throughput is
jobs / (last ``completed_at`` - first submit). Blocks alternate between the two sidecars
(1, 2, 1, 2, ...), so both see the same machine load. Goal: ratio >= 1.7 on this 2-core
machine.

(b) One sidecar with one instance and ``MAX_JOBS_PER_INSTANCE=2`` gets ``--gap-jobs`` small
jobs (EmptyImage 256² random colour -> ImageInvert -> SaveImage) at once. Each job's ``GET
/jobs/{id}`` ``stats.comfy_execution`` holds ComfyUI's own ``execution_start`` and
``execution_success`` frame timestamps (ms since epoch); sorted by start, the idle gap is
start[n+1] - end[n]. Goal: p50 <= 5 ms.

Printed, never asserted; ``/proc/loadavg`` is printed with each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import (  # noqa: E402
    REAL_AVAILABLE,
    Backend,
    Sidecar,
    basic_prompt,
    make_sidecar,
    slow_prompt,
)
from tests.waiting import wait_for  # noqa: E402

ONE_THREAD = "env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start(kind: str, tmp: Path, instances: int, **env: str) -> Sidecar:
    backend = Backend(kind, tmp / "comfy")
    sidecar = make_sidecar(
        backend,
        tmp,
        CMD=ONE_THREAD + backend.cmd("{port}"),  # type: ignore[arg-type]  # the template
        COMFYUI_INSTANCES=str(instances),
        LOG_LEVEL="warn",
        **env,
    )
    sidecar.start()
    return sidecar


def wait_all_ready(sidecar: Sidecar) -> None:
    sidecar.wait_ready(300)
    wait_for(
        lambda: all(i["phase"] == "ready" for i in sidecar.get("/ready").json()["instances"]),
        timeout=300,
        what="every instance ready",
    )


def epoch_s(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def run_block(sidecar: Sidecar, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Submit every prompt at once; the final job bodies (each must complete)."""
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=600) as http:
        ids = []
        for prompt in prompts:
            response = await http.post("/jobs", json={"prompt": prompt})
            response.raise_for_status()
            ids.append(response.json()["id"])

        async def done(job_id: str) -> dict[str, Any]:
            while True:
                body: dict[str, Any] = (
                    await http.get(f"/jobs/{job_id}", params={"wait": 60})
                ).json()
                if body["completed_at"]:
                    assert body["status"] == "completed", body
                    return body

        return list(await asyncio.gather(*(done(i) for i in ids)))


async def throughput(sidecar: Sidecar, args: argparse.Namespace) -> float:
    prompts = [slow_prompt(blurs=args.blurs, size=args.size) for _ in range(args.jobs)]
    started = time.time()
    jobs = await run_block(sidecar, prompts)
    return len(jobs) / (max(epoch_s(j["completed_at"]) for j in jobs) - started)


def random_prompt() -> dict[str, Any]:
    prompt = basic_prompt(batch=1, size=256, prefix="gap")
    prompt["1"]["inputs"]["color"] = random.randrange(1 << 24)
    return prompt


async def main_async(args: argparse.Namespace) -> None:
    kind = "double" if args.double or not REAL_AVAILABLE else "real"
    root = Path(tempfile.mkdtemp(prefix="bench-instances-"))
    one = start(kind, root / "one", 1)
    two = start(kind, root / "two", 2)
    rates: dict[int, list[tuple[float, str]]] = {1: [], 2: []}
    try:
        wait_all_ready(one)
        wait_all_ready(two)
        await run_block(one, [slow_prompt(blurs=1, size=256)])  # warm each instance's torch
        await run_block(two, [slow_prompt(blurs=1, size=256) for _ in range(2)])
        for _ in range(args.blocks):
            for n, sidecar in ((1, one), (2, two)):
                rates[n].append((await throughput(sidecar, args), loadavg()))
    finally:
        two.stop()
    gap_jobs: list[dict[str, Any]] = []
    try:
        # (b) on the single-instance sidecar, restarted with MAX_JOBS_PER_INSTANCE=2 set.
        one.stop()
        one = start(kind, root / "gap", 1, MAX_JOBS_PER_INSTANCE="2")
        wait_all_ready(one)
        await run_block(one, [random_prompt() for _ in range(4)])
        gap_jobs = await run_block(one, [random_prompt() for _ in range(args.gap_jobs)])
        gap_load = loadavg()
    finally:
        one.stop()
        shutil.rmtree(root, ignore_errors=True)
    spans = sorted(
        (j["stats"]["comfy_execution"]["start"], j["stats"]["comfy_execution"]["end"])
        for j in gap_jobs
    )
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
    durations = [end - begin for begin, end in spans]

    print(f"backend: {kind} ComfyUI, one torch thread per child (OMP_NUM_THREADS=1)")
    print(
        f"(a) {args.jobs} jobs per block, EmptyImage {args.size}² -> ImageBlur x {args.blurs} -> "
        f"SaveImage, blocks alternating 1, 2, 1, 2, ...:"
    )
    for n in (1, 2):
        print(
            f"    {n} instance(s): "
            + ", ".join(f"{r:.3f} jobs/s (load {load})" for r, load in rates[n])
        )
    r1 = statistics.mean(r for r, _ in rates[1])
    r2 = statistics.mean(r for r, _ in rates[2])
    print(f"    ratio 2 vs 1: {r2 / r1:.2f}x   (goal >= 1.7x)")
    print(
        f"(b) {len(gap_jobs)} jobs at once on one instance (MAX_JOBS_PER_INSTANCE=2), "
        "EmptyImage 256² -> ImageInvert -> SaveImage:"
    )
    print(
        f"    execution end -> next execution start: p50 {statistics.median(gaps):.0f} ms, "
        f"min {min(gaps)} ms, max {max(gaps)} ms   (goal p50 <= 5 ms)   load {gap_load}"
    )
    print(f"    (execution p50 {statistics.median(durations):.0f} ms per job)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", action="store_true", help="the ComfyUI double")
    parser.add_argument("--jobs", type=int, default=12, help="jobs per throughput block")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per sidecar")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--blurs", type=int, default=2)
    parser.add_argument("--gap-jobs", type=int, default=30)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
