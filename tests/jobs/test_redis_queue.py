"""The shared job queue (JOB_QUEUE_URL) end to end: two sidecars, each in front of its own
ComfyUI double, on one real redis-server. Executions are counted on the doubles' /history."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Backend, Sidecar, basic_prompt, slow_prompt
from tests.jobs.test_jobs_api import (
    check_content_disposition,
    check_long_digit_strings,
    sse_events,
)
from tests.redis_server import RedisServer, redis_server
from tests.waiting import wait_for

__all__ = ["redis_server"]  # the fixture, used by name

LEASE_S = 2.0


def replicas(
    spawn: Callable[..., Sidecar], tmp_path: Path, url: str, count: int = 2, **env: str
) -> list[Sidecar]:
    """``count`` ready sidecars sharing the queue at ``url`` (``env``: more settings)."""
    started = [
        spawn(
            Backend("double", tmp_path / f"comfy{i}"),
            JOB_QUEUE_URL=url,
            JOB_LEASE_S=str(LEASE_S),
            SHUTDOWN_GRACE_S="5",
            **env,
        )
        for i in range(count)
    ]
    for sidecar in started:
        sidecar.wait_ready()
    return started


def submit(sidecar: Sidecar, prompt: dict[str, Any], **fields: Any) -> str:
    response = sidecar.post("/jobs", json={"prompt": prompt, **fields})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def job(sidecar: Sidecar, job_id: str, wait: float = 0) -> dict[str, Any]:
    response = sidecar.get(f"/jobs/{job_id}", params={"wait": wait}, timeout=wait + 10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def executions(sidecar: Sidecar) -> int:
    """Prompts the sidecar's ComfyUI double has run (its /history)."""
    return len(httpx.get(f"http://127.0.0.1:{sidecar.comfy_port}/history", timeout=5).json())


def journal(sidecar: Sidecar) -> list[dict[str, Any]]:
    """Every prompt ``sidecar``'s double executed, its last status each (from its journal)."""
    path = sidecar.backend.base / "double-executions.jsonl"
    last: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            last[entry["prompt_id"]] = entry
    return list(last.values())


def runs_on(sidecars: list[Sidecar], view: dict[str, Any]) -> Sidecar:
    """The sidecar whose replica name (``host-pid-…``) the job body names."""
    for sidecar in sidecars:
        assert sidecar.proc is not None
        if f"-{sidecar.proc.pid}-" in str(view.get("replica")):
            return sidecar
    raise AssertionError(f"no sidecar runs {view}")


def running_view(sidecar: Sidecar, job_id: str) -> dict[str, Any]:
    return wait_for(
        lambda: (v := job(sidecar, job_id))["status"] == "in_progress" and v.get("replica") and v,
        timeout=30,
        interval=0.05,
        what=f"job {job_id} to run",
    )


def kill_runner(pair: list[Sidecar], job_id: str) -> tuple[Sidecar, Sidecar]:
    """SIGKILL the sidecar running ``job_id`` (and its ComfyUI); returns (it, the other)."""
    victim = runs_on(pair, running_view(pair[0], job_id))
    survivor = pair[1] if victim is pair[0] else pair[0]
    comfy_pid = victim.child_pid()
    assert victim.proc is not None
    victim.proc.kill()
    os.kill(comfy_pid, signal.SIGKILL)
    return victim, survivor


@pytest.mark.sidecar_process
def test_two_replicas_share_jobs_and_answer_for_each_other(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a, b = replicas(spawn, tmp_path, redis_server.url)
    ids = [submit((a, b)[i % 2], slow_prompt(blurs=1, size=1024)) for i in range(8)]
    views = [job(a, job_id, wait=60) for job_id in ids]
    assert [v["status"] for v in views] == ["completed"] * 8, views
    ran = {runs_on([a, b], v).port for v in views}
    assert ran == {a.port, b.port}, "both replicas took jobs"
    assert executions(a) + executions(b) == 8, "each job ran exactly once"

    # Read a job from the replica that did not run it: body, SSE (with resume), output bytes.
    view = views[0]
    other = b if runs_on([a, b], view) is a else a
    assert job(other, view["id"]) == view
    events = sse_events(other, view["id"])
    assert events[0]["event"] == "status" and events[-1]["event"] == "done"
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert any(e["event"] == "progress" for e in events)
    assert events[-1]["data"]["status"] == "completed"
    resumed = sse_events(other, view["id"], last_event_id=events[-2]["id"])
    assert [e["id"] for e in resumed] == [events[-1]["id"]]
    output = other.get(view["outputs"][0]["url"])
    assert output.status_code == 200 and output.content.startswith(b"\x89PNG")
    assert len(output.content) == view["outputs"][0]["size_bytes"]
    head = other.get(view["outputs"][0]["url"], headers={"range": "bytes=0-3"})
    assert head.status_code == 206 and head.content == b"\x89PNG"
    assert head.headers["content-range"] == f"bytes 0-3/{len(output.content)}"
    listed = a.get("/jobs", params={"limit": 100}).json()["jobs"]
    assert {entry["id"] for entry in listed} >= set(ids)


@pytest.mark.sidecar_process
def test_a_killed_replicas_job_is_taken_over_within_the_lease(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a, b = replicas(spawn, tmp_path, redis_server.url)
    job_id = submit(a, slow_prompt(blurs=3, size=2048))
    victim, survivor = kill_runner([a, b], job_id)
    killed = time.monotonic()
    wait_for(
        lambda: len(job(survivor, job_id).get("attempts") or []) == 2,
        timeout=LEASE_S + 5,
        interval=0.05,
        what="the survivor to take the job over",
    )
    assert time.monotonic() - killed <= LEASE_S + 5
    view = job(survivor, job_id, wait=60)
    assert view["status"] == "completed", view
    assert runs_on([survivor], view) is survivor
    first, second = (attempt["replica"] for attempt in view["attempts"])
    assert victim.proc is not None and f"-{victim.proc.pid}-" in first
    assert second == view["replica"]
    assert executions(survivor) == 1
    # The victim's double had started the job and never ended it (it died mid-job).
    assert [e["status"] for e in journal(victim)] == ["running"]
    wait_for(
        lambda: [e["status"] for e in journal(survivor)] == ["success"],
        timeout=10,
        what="the survivor's double to have run the job once",
    )


def test_a_job_longer_than_the_lease_is_not_taken_over_while_heartbeating(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a, b = replicas(spawn, tmp_path, redis_server.url)
    job_id = submit(a, slow_prompt(blurs=3, size=2048))  # ~4.5 s, over twice the lease
    view = job(b, job_id, wait=60)
    assert view["status"] == "completed", view
    assert len(view["attempts"]) == 1, view["attempts"]
    assert executions(a) + executions(b) == 1


@pytest.mark.sidecar_process
def test_a_job_fails_listing_its_attempts_after_job_max_attempts(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a, b = replicas(spawn, tmp_path, redis_server.url, JOB_MAX_ATTEMPTS="1")
    job_id = submit(a, slow_prompt(blurs=3, size=2048))
    victim, survivor = kill_runner([a, b], job_id)
    view = job(survivor, job_id, wait=LEASE_S + 10)
    assert view["status"] == "failed", view
    assert "JOB_MAX_ATTEMPTS=1" in view["error"]["error"]
    assert view["error"]["attempts"] == view["attempts"] and len(view["attempts"]) == 1
    assert f"-{victim.proc.pid}-" in view["attempts"][0]["replica"]
    assert executions(survivor) == 0


def test_every_accepted_job_completes_across_a_redis_restart(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a, b = replicas(spawn, tmp_path, redis_server.url)
    ids = [submit((a, b)[i % 2], slow_prompt(blurs=1, size=2048)) for i in range(6)]
    running_view(a, ids[0])
    redis_server.kill()
    refused = a.post("/jobs", json={"prompt": basic_prompt()})
    assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
    status = a.get(f"/jobs/{ids[0]}")  # reads too: 503, never a 404 or a stale body
    assert status.status_code == 503 and status.headers["retry-after"], status.text
    sync = a.post("/prompt", json={"prompt": basic_prompt()})  # sync /prompt stays local
    assert sync.status_code == 200, sync.text
    ready = wait_for(
        lambda: "Redis" in (r := a.get("/ready")).text and r,
        timeout=10,
        what="/ready to name the job queue",
    )
    assert ready.status_code == 200
    redis_server.start()
    views = [job(a, job_id, wait=60) for job_id in ids]
    assert [v["status"] for v in views] == ["completed"] * 6, views


@pytest.mark.sidecar_process
def test_a_sigtermed_replica_loses_and_repeats_no_job(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a, b = replicas(spawn, tmp_path, redis_server.url)
    ids = [submit((a, b)[i % 2], slow_prompt(blurs=1, size=2048)) for i in range(8)]
    running_view(a, ids[0])
    b.stop()  # SIGTERM: b finishes what it holds, claims nothing more
    assert b.proc is not None and b.proc.returncode == 0
    views = [job(a, job_id, wait=60) for job_id in ids]
    assert [v["status"] for v in views] == ["completed"] * 8, views
    assert [len(v["attempts"]) for v in views] == [1] * 8
    assert any(runs_on([a, b], v) is b for v in views), "b held jobs when it was stopped"
    # b's double is gone with b: a ran exactly the jobs that name it, none of b's again.
    assert executions(a) == sum(1 for v in views if runs_on([a, b], v) is a)


@pytest.mark.sidecar_process
def test_cancel_from_another_replica(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a, b = replicas(spawn, tmp_path, redis_server.url)
    job_id = submit(a, slow_prompt(blurs=6, size=2048))
    runner = runs_on([a, b], running_view(a, job_id))
    other = b if runner is a else a
    answer = other.post(f"/jobs/{job_id}/cancel")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"id": job_id, "cancelled": True, "status": "cancelled"}
    assert job(runner, job_id)["status"] == "cancelled"
    again = other.post(f"/jobs/{job_id}/cancel").json()
    assert again == {"id": job_id, "cancelled": False, "status": "cancelled"}
    assert other.get("/jobs/no-such-job").status_code == 404


@pytest.mark.parametrize("path", ["/jobs/x", "/jobs"])
def test_unknown_and_listing_without_jobs(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path, path: str
) -> None:
    (a,) = replicas(spawn, tmp_path, redis_server.url, count=1)
    response = a.get(path)
    assert response.status_code == (404 if path == "/jobs/x" else 200), response.text


def test_a_long_poll_returns_at_its_deadline_or_at_the_end(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """``GET /jobs/{id}?wait=S`` in queue mode waits on the job's event stream: while the job
    runs (sending progress events) it answers the current body once S seconds have passed,
    the final body as soon as the job ends, and 404 at once for an unknown job."""
    from tests.jobs.test_replicas import ticking_prompt

    (a,) = replicas(spawn, tmp_path, redis_server.url, count=1)
    job_id = submit(a, ticking_prompt("long-poll", ticks=60, interval_ms=100))  # ~6 s
    running_view(a, job_id)
    began = time.monotonic()
    view = job(a, job_id, wait=1.5)
    assert time.monotonic() - began >= 1.4, "answered before its deadline"
    assert view["status"] == "in_progress", view
    assert 0 < view["progress_value"] < 60, view  # the mirrored progress events arrived
    final = job(a, job_id, wait=60)
    assert final["status"] == "completed", final
    assert len(final["outputs"]) == 1, final
    assert job(a, job_id, wait=30) == final  # ended: answered at once, the same body
    unknown = a.get("/jobs/no-such-job", params={"wait": 30}, timeout=60)
    assert unknown.status_code == 404, unknown.text


def test_an_output_named_with_quotes_and_non_ascii_is_served_in_queue_mode(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """Outputs kept in Redis get RFC 6266's Content-Disposition too (tests.jobs.test_jobs_api's
    in-process twin)."""
    (a,) = replicas(spawn, tmp_path, redis_server.url, count=1)
    view = job(a, submit(a, basic_prompt(1, prefix='a"b é%')), wait=60)
    assert view["status"] == "completed", view
    [output] = view["outputs"]
    answer = a.get(output["url"])
    assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")
    check_content_disposition(answer.headers["content-disposition"], output["filename"])


def test_long_digit_strings_are_400s_naming_the_parameter_in_queue_mode(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """`cursor`, `Last-Event-ID` and `Range` of jobs kept in Redis (tests.jobs.test_jobs_api's
    in-process twin)."""
    (a,) = replicas(spawn, tmp_path, redis_server.url, count=1)
    view = job(a, submit(a, basic_prompt(1)), wait=60)
    assert view["status"] == "completed", view
    check_long_digit_strings(a, view)
