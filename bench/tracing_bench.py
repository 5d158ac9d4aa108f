"""Per-job cost of OpenTelemetry tracing (issue 23), side by side in one run.

    python bench/tracing_bench.py [--jobs 200] [--reps 5]

Three sidecars, each in front of its own ComfyUI double (with COMFY_HOME, a real ComfyUI
each), alike but for tracing:

- ``off``: no OTLP endpoint (tracing off: nothing of OpenTelemetry imported);
- ``on``: ``OTEL_EXPORTER_OTLP_ENDPOINT`` is a collector on loopback (tests/otlp_server.py,
  which decodes every export), sampling 100% (the default ``parentbased_always_on``: every
  job's trace is sampled), the SDK's default batching (an export every 5 s or 512 spans);
- ``absent``: the endpoint is a loopback port nothing listens on (every export fails and
  is retried by the SDK).

Each repetition runs ``--jobs`` rounds; a round is one ``POST /prompt`` (EmptyImage 256x256
of a random colour -> ImageInvert -> SaveImage, as bench/overhead.py) on each sidecar, one
after another (the order rotates). Each sidecar's CPU time (utime + stime of every thread,
/proc/<pid>/stat) is read at the repetition's start and end: CPU ms per job, with what runs
between its jobs (the batch processor's thread encodes and exports spans in the background,
every 5 s, often while another sidecar's job runs; and the idle work every sidecar does
alike). Jobs alternate one by one so the three see the same load on a shared machine (blocks
of jobs per sidecar did not: other work on the machine came and went between blocks). Printed per
repetition and as medians, with ``on - off`` and ``absent - off`` (goal: ``on - off`` <= 0.3 ms
per job), the p50 latency, the spans per job the collector received, and each sidecar's idle
RSS after start-up. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from overhead import cpu_s, prompt, rss_mb  # noqa: E402  (bench/ is sys.path[0])

from tests.conftest import Backend, Sidecar, free_port, make_sidecar  # noqa: E402
from tests.otlp_server import OtlpServer  # noqa: E402


def one_job(sidecar: Sidecar, client: httpx.Client) -> float:
    """Seconds one ``/prompt`` job on ``sidecar`` took."""
    started = time.perf_counter()
    response = client.post(sidecar.url + "/prompt", json={"prompt": prompt("t")})
    response.raise_for_status()
    return time.perf_counter() - started


def repetition(
    sidecars: dict[str, Sidecar], client: httpx.Client, jobs: int, shift: int
) -> dict[str, float]:
    """``jobs`` rounds of one job per sidecar (order rotated by ``shift``): CPU ms per job
    (the sidecar's CPU time over the whole repetition, background threads included) and p50
    ms of each."""
    names = list(sidecars)
    names = names[shift % len(names) :] + names[: shift % len(names)]
    pids = {}
    for name in names:
        proc = sidecars[name].proc
        assert proc is not None
        pids[name] = proc.pid
    latencies: dict[str, list[float]] = {name: [] for name in names}
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    for i in range(jobs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            latencies[name].append(one_job(sidecars[name], client))
    used = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
    row: dict[str, float] = {}
    for name in names:
        row[name] = used[name] * 1000 / jobs
        row[name + " p50"] = statistics.median(latencies[name]) * 1000
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="sequential jobs per block")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (rotating order)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    kind = "real" if os.environ.get("COMFY_HOME") else "double"
    collector = OtlpServer()
    quiet = {"LOG_LEVEL": "warn"}
    settings = {
        "off": {},
        "on": {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint},
        "absent": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
    }
    sidecars: dict[str, Sidecar] = {}
    try:
        for name, env in settings.items():
            (tmp / name).mkdir()
            sidecars[name] = make_sidecar(
                Backend(kind, tmp / name / "comfy"), tmp / name, **quiet, **env
            )
            sidecars[name].start()
        for sidecar in sidecars.values():
            sidecar.wait_ready()
        rss = {n: rss_mb(s.proc.pid) for n, s in sidecars.items() if s.proc is not None}
        names = list(sidecars)
        rows: list[dict[str, float]] = []
        with httpx.Client(timeout=60) as client:
            repetition(sidecars, client, 10, 0)  # warm every path
            spans_before = len(collector.received())
            jobs_on = 0
            for rep in range(args.reps):
                row = repetition(sidecars, client, args.jobs, rep)
                jobs_on += args.jobs
                rows.append(row)
                print(
                    f"rep {rep + 1}: "
                    + " | ".join(
                        f"{n} {row[n]:.3f} ms CPU/job (p50 {row[n + ' p50']:.1f} ms)" for n in names
                    )
                    + f" | on - off {row['on'] - row['off']:+.3f} ms",
                    flush=True,
                )
        spans = len(collector.received()) - spans_before
    finally:
        for sidecar in sidecars.values():
            sidecar.stop()
        collector.stop()
    med = statistics.median
    print(f"backend: {kind} ComfyUI; prompt EmptyImage 256x256 -> ImageInvert -> SaveImage")
    print(
        f"{args.reps} repetitions of {args.jobs} sequential /prompt jobs per sidecar, "
        "alternating job by job"
    )
    print(
        "sidecar CPU per job (/proc/<pid>/stat, every thread, over each repetition), "
        "medians over repetitions:"
    )
    for name in names:
        print(
            f"  {name:7s} {med(r[name] for r in rows):.3f} ms/job "
            f"(p50 {med(r[name + ' p50'] for r in rows):.1f} ms)  idle RSS {rss[name]:.1f} MB"
        )
    print(
        f"  on - off      {med(r['on'] - r['off'] for r in rows):+.3f} ms/job "
        "(goal <= 0.3 ms, sampling 100%)"
    )
    print(f"  absent - off  {med(r['absent'] - r['off'] for r in rows):+.3f} ms/job")
    print(f"spans received per traced job: {spans / max(1, jobs_on):.2f} (at least)")


if __name__ == "__main__":
    main()
