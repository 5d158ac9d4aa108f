"""Shared job queue figures (issue 15): queue-mode overhead per job, throughput of 3 replicas vs
1, and the time to reclaim a killed replica's job. Every sidecar runs in front of its own
ComfyUI double (tests/comfy_double.py); Redis is a real ``redis-server`` (tests/redis_server.py).

    python bench/queue_bench.py [--jobs 200] [--block 30] [--blocks 2] [--kills 3]
                                [--parts abc] [--baseline GIT_REF]

(a) **Overhead per job.** Two sidecars side by side, one in-process (no JOB_QUEUE_URL), one on
Redis. A tiny prompt (EmptyImage 8² with a random colour -> SaveImage) is run ``--jobs`` times
on each, one after another, the sidecars alternating job by job so both see the same load.
One job = ``POST /jobs``, then its ``GET /jobs/{id}/events`` stream read until ``done``
(the way a client waits without polling). Overhead = p50(Redis) - p50(in-process). Goal:
p50 <= 5 ms. The same is printed for ``GET /jobs/{id}?wait=60`` as the wait. With
``--baseline REF`` (e.g. ``main``), a third sidecar on Redis (its own db) runs the code of that
git ref (``git archive``) in the same rotation, so a change is measured against it side by side.
Also printed: Redis requests and commands per job for each Redis sidecar (20 jobs alone,
watched with MONITOR; see :func:`redis_per_job`).

(b) **Throughput, 3 replicas vs 1.** The prompt takes 200 ms in the double (EmptyImage 8² ->
DoubleTicks 4 x 50 ms -> SaveImage). A block submits ``--block`` jobs at once through one
replica and waits for all; throughput = jobs / (last ``completed_at`` - first submit). One
replica on Redis db 1, three on db 2 of the same redis-server; blocks alternate 1, 3, 1, 3.
Goal: ratio >= 2.7x.

Redis keeps an append-only file with ``--appendfsync`` (default ``everysec``, as in docker/ and
docker/k8s/; ``always`` fsyncs every write, as the tests do).

(c) **Reclaim after SIGKILL.** Two replicas with JOB_LEASE_S=3; a 5 s job starts on one, which
is SIGKILLed with its ComfyUI. Printed: seconds from the kill until the other replica starts
the job again (its second attempt), and until it completes. The lease bounds the first.

Printed, never asserted; ``/proc/loadavg`` is printed with each figure.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Backend, Sidecar, make_sidecar  # noqa: E402
from tests.redis_server import REDIS_SERVER, RedisServer  # noqa: E402
from tests.waiting import wait_for  # noqa: E402

LEASE_S = 3.0


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def epoch_s(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def start(tmp: Path, python: str | None = None, **env: str) -> Sidecar:
    tmp.mkdir(parents=True)
    sidecar = make_sidecar(Backend("double", tmp / "comfy"), tmp, LOG_LEVEL="warn", **env)
    sidecar.start(python=python)
    return sidecar


def checkout(ref: str, into: Path, python: str = sys.executable) -> str:
    """The tree of git ref ``ref`` under ``into``; returns an interpreter wrapper that runs
    ``python -m comfy_sidecar`` from there (its code, not this tree's)."""
    tree = into / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    wrapper = into / "python"
    wrapper.write_text(f'#!/bin/sh\ncd "{tree}" && exec "{python}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def tiny_prompt() -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {
                "width": 8,
                "height": 8,
                "batch_size": 1,
                "color": random.randrange(1 << 24),
            },
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "q"}},
    }


def ticking_prompt(steps: int, interval_ms: int) -> dict[str, Any]:
    prompt = tiny_prompt()
    prompt["3"] = prompt.pop("2")
    prompt["2"] = {
        "class_type": "DoubleTicks",
        "inputs": {"image": ["1", 0], "steps": steps, "interval_ms": interval_ms},
    }
    prompt["3"]["inputs"]["images"] = ["2", 0]
    return prompt


def submit(http: httpx.Client, sidecar: Sidecar, prompt: dict[str, Any]) -> str:
    response = http.post(f"{sidecar.url}/jobs", json={"prompt": prompt})
    response.raise_for_status()
    job_id: str = response.json()["id"]
    return job_id


def until_done_sse(http: httpx.Client, sidecar: Sidecar, job_id: str) -> None:
    with http.stream("GET", f"{sidecar.url}/jobs/{job_id}/events") as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line == "event: done":
                return
    raise AssertionError(f"job {job_id}: the stream ended without done")


def until_done_wait(http: httpx.Client, sidecar: Sidecar, job_id: str) -> None:
    while True:
        body = http.get(f"{sidecar.url}/jobs/{job_id}", params={"wait": 60}).json()
        if body["completed_at"]:
            assert body["status"] == "completed", body
            return


def per_job_ms(
    http: httpx.Client,
    sidecars: dict[str, Sidecar],
    jobs: int,
    wait: Callable[[httpx.Client, Sidecar, str], None],
) -> dict[str, list[float]]:
    """Milliseconds per sequential job (submit + wait), sidecars alternating job by job."""
    times: dict[str, list[float]] = {name: [] for name in sidecars}
    for _ in range(jobs):
        for name, sidecar in sidecars.items():
            began = time.perf_counter()
            wait(http, sidecar, submit(http, sidecar, tiny_prompt()))
            times[name].append((time.perf_counter() - began) * 1000)
    return times


def block_rate(http: httpx.Client, entry: Sidecar, jobs: int) -> float:
    """Jobs/s for ``jobs`` 200 ms jobs submitted at once through ``entry``."""
    started = time.time()
    ids = [submit(http, entry, ticking_prompt(4, 50)) for _ in range(jobs)]
    ends = []
    for job_id in ids:
        while True:
            body = http.get(f"{entry.url}/jobs/{job_id}", params={"wait": 60}).json()
            if body["completed_at"]:
                assert body["status"] == "completed", body
                ends.append(epoch_s(body["completed_at"]))
                break
    return jobs / (max(ends) - started)


def reclaim(http: httpx.Client, pair: list[Sidecar]) -> tuple[float, float]:
    """(s from SIGKILL to the second attempt, s to completion) for one 5 s job."""
    job_id = submit(http, pair[0], ticking_prompt(50, 100))
    view = wait_for(
        lambda: (
            (v := http.get(f"{pair[0].url}/jobs/{job_id}").json())["status"] == "in_progress"
            and v.get("replica")
            and v
        ),
        timeout=30,
        interval=0.02,
        what="the job to run",
    )
    victim = next(s for s in pair if s.proc and f"-{s.proc.pid}-" in view["replica"])
    survivor = pair[1] if victim is pair[0] else pair[0]
    comfy = victim.child_pid()
    assert victim.proc is not None
    victim.proc.kill()
    os.kill(comfy, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(
        lambda: len(http.get(f"{survivor.url}/jobs/{job_id}").json()["attempts"]) == 2,
        timeout=LEASE_S + 30,
        interval=0.01,
        what="the second attempt",
    )
    taken = time.monotonic() - killed
    until_done_sse(http, survivor, job_id)
    done = time.monotonic() - killed
    victim.proc.wait()
    return taken, done


def redis_per_job(
    http: httpx.Client, redis_url: str, sidecar: Sidecar, jobs: int
) -> tuple[float, float]:
    """(requests, commands) Redis serves per tiny job through ``sidecar``, watched with
    MONITOR over ``jobs`` sequential jobs (SSE wait). Requests: what clients send (a MULTI ..
    EXEC counts once, a script once; commands of a non-transactional pipeline each count);
    commands: every command run, those inside scripts and transactions too. Includes the
    idle claim loops of every sidecar meanwhile (about 2 a second each)."""
    import threading

    import redis as redis_client

    client = redis_client.Redis.from_url(redis_url)
    counts = {"requests": 0, "commands": 0}
    marker = f"bench-end-{random.randrange(1 << 30)}"
    watching = threading.Event()

    def watch() -> None:
        in_multi: set[str] = set()
        with client.monitor() as monitor:
            watching.set()
            while True:
                seen = monitor.next_command()
                if marker in seen["command"]:
                    return
                name = seen["command"].split(" ", 1)[0].upper()
                who = f"{seen['client_address']}:{seen['client_port']}"
                counts["commands"] += name not in ("MULTI", "EXEC")
                if seen["client_type"] == "lua" or (who in in_multi and name != "EXEC"):
                    continue
                if name == "MULTI":
                    in_multi.add(who)
                elif name == "EXEC":
                    in_multi.discard(who)
                    continue
                counts["requests"] += 1

    watcher = threading.Thread(target=watch)
    watcher.start()
    watching.wait(10)
    try:
        for _ in range(jobs):
            until_done_sse(http, sidecar, submit(http, sidecar, tiny_prompt()))
    finally:
        client.echo(marker)
        watcher.join(30)
        client.close()
    return counts["requests"] / jobs, counts["commands"] / jobs


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="sequential jobs per sidecar (a)")
    parser.add_argument("--block", type=int, default=30, help="jobs per throughput block (b)")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per setup (b)")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs (c)")
    parser.add_argument(
        "--appendfsync",
        default="everysec",
        choices=["always", "everysec"],
        help="Redis AOF fsync policy (everysec: Redis's default, docker/ and docker/k8s/)",
    )
    parser.add_argument("--parts", default="abc", help="which figures to measure (a, b, c)")
    parser.add_argument(
        "--baseline", metavar="GIT_REF", help="also run (a) on Redis with that ref's code"
    )
    args = parser.parse_args()
    if REDIS_SERVER is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    root = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    redis = RedisServer(root / "redis", args.appendfsync)
    redis.start()
    started: list[Sidecar] = []

    def up(name: str, python: str | None = None, **env: str) -> Sidecar:
        sidecar = start(root / name, python, **env)
        started.append(sidecar)
        return sidecar

    def url(db: int) -> str:
        return redis.url.rsplit("/", 1)[0] + f"/{db}"

    http = httpx.Client(timeout=120)
    try:
        # (a)
        sse: dict[str, list[float]] = {}
        commands: dict[str, tuple[float, float]] = {}
        polled: dict[str, list[float]] = {}
        load_a = load_a2 = ""
        if "a" in args.parts:
            pair = {
                "in-process": up("inproc"),
                "Redis (this tree)": up("queued", JOB_QUEUE_URL=url(0)),
            }
            if args.baseline:
                python = checkout(args.baseline, root / "baseline")
                pair[args.baseline] = up("base", python, JOB_QUEUE_URL=url(4))
            for sidecar in pair.values():
                sidecar.wait_ready()
            per_job_ms(http, pair, 20, until_done_sse)  # warm both
            commands = {
                name: redis_per_job(http, redis.url, sidecar, 20)
                for name, sidecar in pair.items()
                if name != "in-process"
            }
            sse = per_job_ms(http, pair, args.jobs, until_done_sse)
            load_a = loadavg()
            polled = per_job_ms(http, pair, max(20, args.jobs // 4), until_done_wait)
            load_a2 = loadavg()
            for sidecar in pair.values():
                sidecar.stop()

        # (b)
        rates: dict[int, list[tuple[float, str]]] = {1: [], 3: []}
        if "b" in args.parts:
            one = [up("one", JOB_QUEUE_URL=url(1))]
            three = [up(f"three{i}", JOB_QUEUE_URL=url(2)) for i in range(3)]
            for sidecar in one + three:
                sidecar.wait_ready()
            block_rate(http, one[0], 6)
            block_rate(http, three[0], 6)
            for _ in range(args.blocks):
                for n, group in ((1, one), (3, three)):
                    rates[n].append((block_rate(http, group[0], args.block), loadavg()))
            for sidecar in one + three:
                sidecar.stop()

        # (c)
        kills: list[tuple[float, float, str]] = []
        if "c" in args.parts:
            for k in range(args.kills):
                pair2 = [
                    up(f"kill{k}-{i}", JOB_QUEUE_URL=url(3), JOB_LEASE_S=str(LEASE_S))
                    for i in range(2)
                ]
                for sidecar in pair2:
                    sidecar.wait_ready()
                taken, done = reclaim(http, pair2)
                kills.append((taken, done, loadavg()))
                for sidecar in pair2:
                    sidecar.stop()
    finally:
        http.close()
        for sidecar in started:
            sidecar.stop()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"backend: the ComfyUI double; redis-server, AOF with appendfsync {args.appendfsync}")
    if sse:
        print(
            f"(a) {args.jobs} sequential jobs each, EmptyImage 8² -> SaveImage, POST /jobs + wait:"
        )
    for label, times, load in (("SSE until done", sse, load_a), ("?wait=60", polled, load_a2)):
        if not times:
            continue
        base = statistics.median(times["in-process"])
        print(
            f"    {label}: in-process p50 {base:.1f} ms (p90 {pct(times['in-process'], 0.9):.1f})"
            f"   load {load}"
        )
        for name, t in times.items():
            if name != "in-process":
                p50 = statistics.median(t)
                print(
                    f"        {name}: p50 {p50:.1f} ms (p90 {pct(t, 0.9):.1f})"
                    f" -> overhead p50 {p50 - base:+.1f} ms"
                )
    for name, (requests, count) in commands.items():
        print(
            f"    {name}: {requests:.0f} Redis requests ({count:.0f} commands run) per job"
            " (SSE wait; 20 jobs under MONITOR)"
        )
    if sse:
        print("    (goal: overhead p50 <= 5 ms)")
    if rates[1] and rates[3]:
        print(
            f"(b) {args.block} jobs of 200 ms per block (DoubleTicks 4 x 50 ms), blocks 1, 3, 1, 3:"
        )
        for n in (1, 3):
            print(
                f"    {n} replica(s): "
                + ", ".join(f"{r:.2f} jobs/s (load {load})" for r, load in rates[n])
            )
        r1 = statistics.mean(r for r, _ in rates[1])
        r3 = statistics.mean(r for r, _ in rates[3])
        print(f"    ratio 3 vs 1: {r3 / r1:.2f}x   (goal >= 2.7x)")
    if kills:
        print(f"(c) SIGKILL of the replica running a 5 s job, JOB_LEASE_S={LEASE_S:g}:")
    for taken, done, load in kills:
        print(f"    taken over after {taken:.2f} s, completed after {done:.2f} s   load {load}")


if __name__ == "__main__":
    main()
