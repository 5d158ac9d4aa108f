"""Many replicas, one queue: three sidecars (each in front of its own ComfyUI double) on one
real redis-server, behind a real HAProxy that health-checks ``/ready`` (tests/haproxy.py).

Executions are counted on the doubles themselves, from each one's ``double-executions.jsonl``
journal (it outlives a stopped replica's ComfyUI). Each job saves under its own
``filename_prefix``, so a prefix executed twice is a job run twice.
"""

from __future__ import annotations

import signal
import threading
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Sidecar, basic_prompt
from tests.haproxy import HAProxy, haproxy
from tests.jobs.test_jobs_api import sse_events
from tests.jobs.test_redis_queue import job, journal, replicas, runs_on
from tests.redis_server import RedisServer, redis_server
from tests.waiting import wait_for

# Subprocess sidecars: replicas are SIGTERMed and restarted behind HAProxy.
pytestmark = pytest.mark.sidecar_process

__all__ = ["haproxy", "redis_server"]  # fixtures, used by name


def ticking_prompt(prefix: str, ticks: int = 2, interval_ms: int = 50) -> dict[str, Any]:
    """A tiny prompt that takes ``ticks x interval_ms`` ms in the double and saves one 8x8
    image under ``prefix`` (unique per job, so its executions can be counted)."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {
                "width": 8,
                "height": 8,
                "batch_size": 1,
                "color": zlib.crc32(prefix.encode()) & 0xFFFFFF,
            },
        },
        "2": {
            "class_type": "DoubleTicks",
            "inputs": {"image": ["1", 0], "steps": ticks, "interval_ms": interval_ms},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def behind(haproxy: Callable[[dict[str, int]], HAProxy], sidecars: list[Sidecar]) -> HAProxy:
    """A started HAProxy over ``sidecars`` (named r0, r1, ...), all of them in rotation."""
    proxy = haproxy({f"r{i}": sidecar.port for i, sidecar in enumerate(sidecars)})
    proxy.wait_up({f"r{i}" for i in range(len(sidecars))})
    return proxy


def prefix_counts(entries: list[dict[str, Any]]) -> Counter[str]:
    """How many times each job's prefix was executed (the sidecar puts ``<id>_`` in front)."""
    return Counter(p.rpartition("_")[2] for entry in entries for p in entry["prefixes"])


def submit_via(proxy: HAProxy, client: httpx.Client, prompt: dict[str, Any]) -> str:
    response = client.post(f"{proxy.url}/jobs", json={"prompt": prompt})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def test_three_replicas_share_60_jobs_submitted_through_haproxy(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    haproxy: Callable[[dict[str, int]], HAProxy],
    tmp_path: Path,
) -> None:
    sidecars = replicas(spawn, tmp_path, redis_server.url, count=3)
    proxy = behind(haproxy, sidecars)
    with httpx.Client(timeout=60) as client:
        ids = {submit_via(proxy, client, ticking_prompt(f"spread{i}")): i for i in range(60)}
    views = {job_id: job(sidecars[0], job_id, wait=60) for job_id in ids}
    assert {v["status"] for v in views.values()} == {"completed"}, views

    # Each job ran exactly once, counted by the doubles that ran them.
    executed = [entry for sidecar in sidecars for entry in journal(sidecar)]
    assert len(executed) == 60
    assert prefix_counts(executed) == Counter(f"spread{i}" for i in range(60))
    assert all(len(v["attempts"]) == 1 for v in views.values())
    ran = Counter(runs_on(sidecars, v).port for v in views.values())
    assert set(ran) == {s.port for s in sidecars}, f"every replica ran some: {ran}"

    # A replica that did not run a job answers for it: body and SSE (with resume).
    job_id, view = next(iter(views.items()))
    other = next(s for s in sidecars if s is not runs_on(sidecars, view))
    assert job(other, job_id) == view
    events = sse_events(other, job_id)
    assert events[0]["event"] == "status" and events[-1]["event"] == "done"
    assert events[-1]["data"]["status"] == "completed"
    assert any(e["event"] == "progress" for e in events)
    resumed = sse_events(other, job_id, last_event_id=events[-2]["id"])
    assert [e["id"] for e in resumed] == [events[-1]["id"]]


def test_a_sigtermed_replica_under_load_loses_and_repeats_no_job(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    haproxy: Callable[[dict[str, int]], HAProxy],
    tmp_path: Path,
) -> None:
    sidecars = replicas(spawn, tmp_path, redis_server.url, count=3)
    proxy = behind(haproxy, sidecars)
    with httpx.Client(timeout=60) as client:
        ids = [submit_via(proxy, client, ticking_prompt(f"term{i}", 4, 100)) for i in range(24)]
    victim = sidecars[1]
    wait_for(
        lambda: any(e["status"] == "running" for e in journal(victim)),
        timeout=30,
        interval=0.02,
        what="the replica to be running a job",
    )
    victim.stop()  # SIGTERM: finishes what it holds, claims nothing more
    assert victim.proc is not None and victim.proc.returncode == 0, victim.log()[-3000:]
    views = [job(sidecars[0], job_id, wait=60) for job_id in ids]
    assert [v["status"] for v in views] == ["completed"] * 24, views
    assert [len(v["attempts"]) for v in views] == [1] * 24
    assert any(runs_on(sidecars, v) is victim for v in views), "the victim held jobs"

    def ended() -> list[dict[str, Any]] | None:
        found = [e for sidecar in sidecars for e in journal(sidecar)]
        return found if all(e["status"] == "success" for e in found) else None

    executed = wait_for(
        ended,
        timeout=10,
        what="every execution to have ended",
    )
    assert prefix_counts(executed) == Counter(f"term{i}" for i in range(24))


def test_rolling_restart_behind_haproxy_fails_no_sync_prompt(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    haproxy: Callable[[dict[str, int]], HAProxy],
    tmp_path: Path,
) -> None:
    # DRAIN_DELAY_S: on SIGTERM /ready fails at once, requests are still served for 2 s, which
    # is ten of HAProxy's check intervals (tests/haproxy.py: one failed check takes it out).
    sidecars = replicas(spawn, tmp_path, redis_server.url, count=3, DRAIN_DELAY_S="2")
    proxy = behind(haproxy, sidecars)
    names = {f"r{i}" for i in range(3)}
    results: Counter[str] = Counter()
    failures: list[str] = []
    done = threading.Event()

    def client_loop(n: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not done.is_set():
                i += 1
                prompt = basic_prompt(batch=1, size=8, prefix=f"c{n}-{i}")
                try:
                    response = client.post(f"{proxy.url}/prompt", json={"prompt": prompt})
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code == 200:
                    results["ok"] += 1
                else:
                    failures.append(f"{response.status_code}: {response.text[:300]}")

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: results["ok"] >= 16, timeout=60, what="the clients to get going")
        for i, sidecar in enumerate(sidecars):
            before = results["ok"]
            assert sidecar.proc is not None
            sidecar.proc.send_signal(signal.SIGTERM)
            assert sidecar.wait_exit(60) == 0, sidecar.log()[-3000:]
            proxy.wait_up(names - {f"r{i}"})
            sidecar.client.close()
            sidecar.client = httpx.Client(timeout=120)
            sidecar.start()
            sidecar.wait_ready()
            proxy.wait_up(names)
            wait_for(
                lambda before=before: results["ok"] >= before + 8,
                timeout=60,
                what="requests to go on being served",
            )
    finally:
        done.set()
        for thread in threads:
            thread.join(120)
    assert failures == [], failures[:10]
    assert results["ok"] >= 40
