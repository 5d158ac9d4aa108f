"""The Comfy API v2 jobs across two replicas sharing a real redis-server (JOB_QUEUE_URL): submit
on A, then follow events, fetch outputs (with a Range), list, cancel and reuse an
Idempotency-Key on B, with the official comfy-sdk; the partner key reaches the ComfyUI that
runs the job and is gone from Redis once the job ended."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from comfy_sdk import exceptions as sdk_errors
from comfy_sdk.events import OutputReady, Progress, StatusChange

from tests.conftest import BACKENDS, Backend, Sidecar, slow_prompt
from tests.jobs.test_redis_queue import LEASE_S, runs_on
from tests.redis_server import RedisServer, redis_server
from tests.v2.support import quickstart, sdk, sse, two_outputs
from tests.waiting import wait_for

__all__ = ["redis_server"]  # the fixture, used by name


def redis_texts(url: str) -> str:
    """Every key and value Redis holds (strings, hashes, streams, sets), as one text."""
    client = redis.Redis.from_url(url)
    parts: list[str] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        parts.append(key.decode(errors="replace"))
        value: Any
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "stream":
            value = client.xrange(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1)
        else:
            value = kind
        parts.append(repr(value))
    client.close()
    return "\n".join(parts)


def replicas(
    spawn: Callable[..., Sidecar], tmp_path: Path, url: str, kind: str
) -> tuple[Sidecar, Sidecar]:
    """Two ready sidecars sharing the queue at ``url``, each before its own ComfyUI
    (``kind``: the double, or a real one)."""
    a, b = (
        spawn(
            Backend(kind, tmp_path / f"comfy{i}"),
            JOB_QUEUE_URL=url,
            JOB_LEASE_S=str(LEASE_S if kind == "double" else 10),
            SHUTDOWN_GRACE_S="5",
        )
        for i in range(2)
    )
    for sidecar in (a, b):
        sidecar.wait_ready()
    return a, b


@pytest.mark.sidecar_process  # runs_on tells the replicas apart by their process id
@pytest.mark.parametrize("kind", BACKENDS)
def test_every_v2_route_answers_from_any_replica(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path, kind: str
) -> None:
    a, b = replicas(spawn, tmp_path, redis_server.url, kind)
    batch = uuid.uuid4().hex
    key = f"key-{uuid.uuid4()}"
    secret = f"partner-{uuid.uuid4()}"
    with sdk(a) as on_a, sdk(b) as on_b:
        workflow = two_outputs()
        job = on_a.submit(
            on_a.workflows.from_json(workflow),
            idempotency_key=key,
            metadata={"batch": batch},
            api_key=secret,
        )
        with pytest.raises(sdk_errors.IdempotencyKeyReuse):
            on_b.submit(on_b.workflows.from_json(quickstart()), idempotency_key=key)
        seen: list[str] = []
        followed = on_b.jobs.get(job.id)
        for event in followed.events():
            match event:
                case OutputReady(output=output) if "output 2" not in seen:
                    now = on_b.jobs.get(job.id)
                    assert now.status == "running" and output.node_id == "2"
                    # The early output's bytes are in Redis: both replicas serve them.
                    for other in (a, b):
                        got = httpx.get(f"{other.url}/api/v2/assets/{output.id}/content")
                        assert (
                            got.content[:4] == b"\x89PNG" and len(got.content) == output.size_bytes
                        )
                    seen.append("output 2")
                case OutputReady(output=output):
                    seen.append(f"output {output.node_id}")
                case Progress():
                    seen.append("progress")
                case StatusChange(status=status):
                    seen.append(status)
        assert seen[-1] == "succeeded" and "output 9" in seen, seen
        followed.refresh()
        assert [o.node_id for o in followed.outputs] == ["2", "9"]
        late = followed.get_outputs("9")[0]
        data = late.to_file(tmp_path / "late.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) == late.size_bytes
        assert late.to_bytes(range=(0, 3)) == b"\x89PNG"
        assert on_b.jobs.get(job.id).get_workflow().graph == workflow
        assert [s.id for s in on_b.list_jobs(metadata={"batch": batch})] == [job.id]

        # The partner key went to the ComfyUI that ran the job, and nowhere else.
        if kind == "double":
            view = a.get(f"/jobs/{job.id}").json()
            runner = runs_on([a, b], view)
            comfy = f"http://127.0.0.1:{runner.comfy_port}"
            keys = httpx.get(f"{comfy}/__double__/partner_keys").json()
            assert hashlib.sha256(secret.encode()).hexdigest() in keys.values()
        assert secret not in redis_texts(redis_server.url)
        # The outputs kept while it ran expire with the job (JOB_RETENTION_S), as the rest.
        store = redis.Redis.from_url(redis_server.url)
        ttls = [store.ttl(f"comfy-sidecar:out:{job.id}:{n}") for n in range(2)]
        store.close()
        assert all(0 < ttl <= 3600 for ttl in ttls), ttls
        assert secret not in a.log() + b.log()

        # Cancel on B a job submitted on A, once it runs (wherever it runs).
        slow = on_a.submit(on_a.workflows.from_json(slow_prompt(blurs=8, size=2048)))
        wait_for(
            lambda: on_b.jobs.get(slow.id).status == "running",
            timeout=60,
            interval=0.05,
            what="the slow job to run",
        )
        cancelled = on_b.jobs.get(slow.id).cancel()
        assert cancelled.status in ("canceling", "canceled")
        cancelled.wait(timeout=60)
        assert cancelled.status == "canceled" and cancelled.error.code == "canceled"
        assert on_a.jobs.get(slow.id).cancel().status == "canceled"
        events = sse(a.client, f"{a.url}/api/v2/jobs/{slow.id}/events", {"last-event-id": "0"})
        statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
        assert statuses == ["queued", "running", "canceling", "canceled"], events


def test_one_idempotency_key_makes_one_job_across_replicas(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a, b = replicas(spawn, tmp_path, redis_server.url, "double")
    for attempt in range(5):
        key = f"race-{attempt}-{uuid.uuid4()}"
        results: list[int] = []

        def send(sidecar: Sidecar, key: str = key, results: list[int] = results) -> None:
            response = httpx.post(
                f"{sidecar.url}/api/v2/jobs",
                json={"workflow": quickstart(size=8), "metadata": {"race": key}},
                headers={"idempotency-key": key},
                timeout=30,
            )
            results.append(response.status_code)

        threads = [threading.Thread(target=send, args=(s,)) for s in (a, b, a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == [201, 422, 422, 422], results
        listed = a.get("/api/v2/jobs", params={"metadata[race]": key}).json()["jobs"]
        assert len(listed) == 1
