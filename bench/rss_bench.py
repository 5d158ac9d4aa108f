"""The sidecar's resident memory: idle, after 1,000 jobs, and around big output conversions.

    python bench/rss_bench.py [--baseline main] [--jobs 1000] [--parts jc] [--python PY]

Each part runs against the ComfyUI double, for this tree's code and, with ``--baseline REF``,
for that git ref's code (``git archive``, as bench/queue_bench.py does) side by side in the same
run: both sidecars are started and measured in alternation, so the machine's load falls on both.
RSS is ``VmRSS`` of the sidecar process (not its ComfyUI child) from ``/proc``. ``--python``
runs both sidecars with another interpreter, e.g. a venv with only the sidecar's dependencies
(the test extra adds pydantic, trio, ... which Litestar and httpcore import when present).

``j`` (issue 20, item 11): idle RSS once ready (after 5 warm-up jobs and 2 s still), then
``--jobs`` ``POST /prompt`` jobs (EmptyImage 64x64 -> ImageInvert -> SaveImage, base64 output,
4 at a time, in blocks of 100 alternating between the sidecars; each is retained as a job, up
to JOB_RETENTION_MAX=1000), RSS 2 s after the last, and the difference.

``c`` (issue 20, item 10): four concurrent ``POST /prompt`` jobs each saving one 4096x4096 image,
first returned as base64 (no conversion), then with ``convert_output: {"format": "webp"}``:
RSS before, after (2 s later) and its growth, and the peak (``VmHWM``) of each step.

Prints numbers only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from overhead import rss_mb  # noqa: E402  (bench/ is sys.path[0])
from queue_bench import checkout, loadavg  # noqa: E402

from tests.conftest import Backend, Sidecar, make_sidecar  # noqa: E402


def hwm_mb(pid: int) -> float:
    """Peak resident memory (``VmHWM``) of ``pid`` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def image_prompt(size: int, prefix: str) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {
                "width": size,
                "height": size,
                "batch_size": 1,
                "color": random.randrange(1 << 24),
            },
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def run_jobs(
    http: httpx.Client, sidecar: Sidecar, bodies: list[dict[str, Any]], concurrency: int
) -> None:
    """POST every body to /prompt, ``concurrency`` at a time; each must answer 200."""

    def one(body: dict[str, Any]) -> None:
        response = http.post(f"{sidecar.url}/prompt", json=body)
        assert response.status_code == 200, response.text[:500]

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))


def settle(pid: int) -> float:
    time.sleep(2)
    return rss_mb(pid)


def part_jobs(http: httpx.Client, sidecars: dict[str, Sidecar], jobs: int) -> None:
    idle: dict[str, float] = {}
    for name, sidecar in sidecars.items():
        assert sidecar.proc is not None
        run_jobs(http, sidecar, [{"prompt": image_prompt(64, "w")} for _ in range(5)], 1)
        idle[name] = settle(sidecar.proc.pid)
    done = 0
    while done < jobs:
        block = min(100, jobs - done)
        for sidecar in sidecars.values():
            run_jobs(http, sidecar, [{"prompt": image_prompt(64, "r")} for _ in range(block)], 4)
        done += block
    load = loadavg()
    print(f"j. RSS of the sidecar (MB): idle, after {jobs} /prompt jobs (c=4), difference")
    for name, sidecar in sidecars.items():
        assert sidecar.proc is not None
        after = settle(sidecar.proc.pid)
        print(
            f"   {name:<12} idle {idle[name]:6.1f}   after {after:6.1f}   "
            f"difference {after - idle[name]:+6.1f}"
        )
    print(f"   load {load}")


def part_convert(http: httpx.Client, sidecars: dict[str, Sidecar]) -> None:
    print("c. four concurrent jobs, one 4096x4096 output each: RSS of the sidecar (MB)")
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("base64", lambda: {"prompt": image_prompt(4096, "b")}),
        (
            "webp",
            lambda: {"prompt": image_prompt(4096, "c"), "convert_output": {"format": "webp"}},
        ),
    ]
    for label, body in steps:
        for name, sidecar in sidecars.items():
            assert sidecar.proc is not None
            before = settle(sidecar.proc.pid)
            run_jobs(http, sidecar, [body() for _ in range(4)], 4)
            after = settle(sidecar.proc.pid)
            print(
                f"   {label:<7} {name:<12} before {before:6.1f}   after {after:6.1f}   "
                f"growth {after - before:+6.1f}   peak so far {hwm_mb(sidecar.proc.pid):6.1f}"
            )
    print(f"   load {loadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="GIT_REF", help="also run that ref's code")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs of part j per sidecar")
    parser.add_argument("--parts", default="jc", help="j: jobs, c: conversions")
    parser.add_argument("--python", help="interpreter that runs the sidecars (default: this)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    http = httpx.Client(timeout=300)
    try:
        for part in args.parts:
            sidecars: dict[str, Sidecar] = {}
            pythons: dict[str, str | None] = {"this tree": args.python}
            if args.baseline:
                base = checkout(args.baseline, root / f"base-{part}", args.python or sys.executable)
                pythons = {args.baseline: base} | pythons
            for name, python in pythons.items():
                tmp = root / f"{part}-{len(sidecars)}"
                tmp.mkdir()
                sidecar = make_sidecar(Backend("double", tmp / "comfy"), tmp, LOG_LEVEL="warn")
                sidecars[name] = sidecar.start(python=python)
            try:
                for sidecar in sidecars.values():
                    sidecar.wait_ready()
                if part == "j":
                    part_jobs(http, sidecars, args.jobs)
                elif part == "c":
                    part_convert(http, sidecars)
            finally:
                for sidecar in sidecars.values():
                    sidecar.stop()
    finally:
        http.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
