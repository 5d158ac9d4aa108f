"""The job adapters in queue mode (JOB_QUEUE_URL): ai-dock's ``/generate`` and the Modal jobs
API (``/v1/jobs``) submit to the shared stream, any replica answers for their jobs, and each
adapter's webhook arrives once, in its own format, from whichever replica ended the job. Two
sidecars, each in front of its own ComfyUI double, on one real redis-server."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Sidecar, basic_prompt, png_bytes, slow_prompt
from tests.core.test_netguard_proxy import REFUSED_HOOKS, aidock_job, modal_job
from tests.forward_proxy import ForwardProxy, forward_proxy
from tests.jobs.test_modal_jobs import image_workflow
from tests.jobs.test_redis_queue import executions, job, replicas, runs_on
from tests.receiver import Receiver
from tests.redis_server import RedisServer, redis_server
from tests.storage.slow_server import SlowServer
from tests.waiting import wait_for

__all__ = ["forward_proxy", "redis_server"]  # the fixtures, used by name


def delete(sidecar: Sidecar, path: str) -> httpx.Response:
    return sidecar.client.delete(sidecar.url + path, timeout=30)


def stream_events(
    sidecar: Sidecar, payload: dict[str, Any], seen: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``/generate/stream``'s messages, each appended to ``seen`` as it arrives, up to and
    including ``final_result``."""
    with sidecar.client.stream(
        "POST", f"{sidecar.url}/generate/stream", json=payload, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen.append(json.loads(line.removeprefix("data:").strip()))
                if seen[-1].get("status") == "final_result":
                    break
    return seen


def hooks_by_id(hook: Receiver) -> dict[str, int]:
    """How many webhooks arrived per ``webhook-id`` (the job id)."""
    counts: dict[str, int] = {}
    for request in hook.snapshot():
        key = request.headers.get("webhook-id", "")
        counts[key] = counts.get(key, 0) + 1
    return counts


def generate(sidecar: Sidecar, hook: Receiver, request_id: str) -> dict[str, Any]:
    payload = {
        "input": {
            "request_id": request_id,
            "workflow_json": basic_prompt(1),
            "webhook": {"url": hook.url + "/aidock", "extra_params": {"custom_field": "value"}},
        }
    }
    accepted = sidecar.post("/generate", json=payload)
    assert accepted.status_code == 202, accepted.text
    body: dict[str, Any] = accepted.json()
    return body


def test_aidock_generate_is_answered_by_any_replica_and_webhooked_once(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver()
    a, b = replicas(spawn, tmp_path, redis_server.url)
    ids = [f"gen-{i}-{uuid.uuid4().hex[:8]}" for i in range(4)]
    for index, request_id in enumerate(ids):
        accepted = generate((a, b)[index % 2], hook, request_id)
        assert accepted["id"] == request_id
        assert accepted["status"] in ("queued", "generating") and accepted["output"] == []

    for index, request_id in enumerate(ids):  # read each from the replica it was not sent to
        other = (b, a)[index % 2]
        result = wait_for(
            lambda o=other, r=request_id: (
                (v := o.get(f"/result/{r}").json())["status"] == "completed" and v
            ),
            timeout=120,
            interval=0.1,
            what=f"{request_id} to complete",
        )
        assert result["message"] == "Generation complete"
        [output] = result["output"]
        assert (output["type"], output["output_type"]) == ("output", "images")
        assert output["url"] == f"/jobs/{request_id}/outputs/0"
        assert other.get(output["url"]).content.startswith(b"\x89PNG")
    assert executions(a) + executions(b) == 4, "each job ran once"
    assert job(a, ids[0])["endpoint"] == "aidock"

    delivered = hook.wait_for(4, timeout=60)
    # A barrier: a later job's webhook has arrived, so a duplicate of the first four would have.
    barrier = f"gen-barrier-{uuid.uuid4().hex[:8]}"
    generate(b, hook, barrier)
    hook.wait_until(lambda rs: any(r.headers.get("webhook-id") == barrier for r in rs), 120)
    assert hooks_by_id(hook) == {**dict.fromkeys(ids, 1), barrier: 1}
    for request in delivered:
        body = request.json()
        assert request.path == "/aidock"
        assert body["id"] in ids
        assert (body["status"], body["custom_field"]) == ("completed", "value")
        assert body["message"] == "Generation complete"
        assert body["output"][0]["url"] == f"/jobs/{body['id']}/outputs/0"

    # The same request_id and body is the same job, from either replica.
    again = generate(b, hook, ids[0])
    assert (again["id"], again["status"]) == (ids[0], "completed")

    # /generate/sync waits for a job that either replica may run.
    synced = a.post("/generate/sync", json={"input": {"workflow_json": basic_prompt(1)}})
    assert synced.status_code == 200, synced.text
    assert synced.json()["status"] == "completed" and synced.json()["output"]
    assert b.get("/result/no-such-request").status_code == 404


def test_aidock_stream_and_queue_info_cover_every_replica(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    # One job per replica at a time: two slow jobs run, the streamed one waits in the stream.
    a, b = replicas(spawn, tmp_path, redis_server.url, MAX_JOBS_PER_INSTANCE="1")
    slow = {"input": {"workflow_json": slow_prompt(blurs=40, size=2048)}}
    busy = [a.post("/generate", json=slow).json()["id"] for _ in range(2)]
    for job_id in busy:
        wait_for(
            lambda j=job_id: b.get(f"/result/{j}").json()["status"] == "generating",
            timeout=60,
            what=f"{job_id} to run",
        )
    assert b.get("/queue-info").json()["generation_queue_size"] == 0
    request_id = f"stream-{uuid.uuid4().hex[:8]}"
    payload = {"input": {"request_id": request_id, "workflow_json": basic_prompt(1)}}
    seen: list[dict[str, Any]] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(stream_events, b, payload, seen)
        wait_for(lambda: seen, timeout=30, what="the stream's first message")
        assert a.get("/queue-info").json()["generation_queue_size"] == 1
        for job_id in busy:
            assert a.post(f"/jobs/{job_id}/cancel").status_code == 200
        events = streamed.result(timeout=120)
    *progress, final = events
    assert (final["status"], final["request_id"]) == ("final_result", request_id)
    assert final["result"]["status"] == "completed" and final["result"]["output"]
    queued = progress[0]
    assert (
        queued["status"] == "queued" and queued["message"] == "Queued for generation (position 1)"
    )
    assert queued["queue_position"] == {
        "current_queue": "generation",
        "position": 1,
        "queue_size": 1,
        "estimated_wait_time": None,
    }
    assert queued["queue_info"]["generation_queue_size"] == 1
    assert "generating" in [data["status"] for data in progress]
    assert a.get(f"/result/{request_id}").json() == final["result"]
    assert b.get("/queue-info").json()["generation_queue_size"] == 0


def test_modal_jobs_with_media_run_anywhere_and_webhook_once(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver()
    a, b = replicas(spawn, tmp_path, redis_server.url)
    image = png_bytes((24, 16), (10, 200, 30))
    encoded = base64.b64encode(image).decode()
    bodies = [
        {  # a media item the LoadImage names
            "workflow": image_workflow("input.png"),
            "inputs": [{"node": 3, "field": "filename_prefix", "value": "modal", "type": "raw"}],
            "media": [{"name": "input.png", "data": encoded}],
            "webhook_url": hook.url + "/modal",
        },
        {  # an image_base64 override
            "workflow": image_workflow("absent.png"),
            "inputs": [{"node": "107", "field": "image", "value": encoded, "type": "image_base64"}],
            "webhook_url": hook.url + "/modal",
        },
    ]
    ids = []
    for body in bodies:
        accepted = a.post("/v1/jobs", json=body)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["status"] == "queued" and accepted.json()["created_at"]
        ids.append(accepted.json()["job_id"])
    assert not list(a.backend.input_dir.rglob("*-media")), "no media folder in queue mode"

    for job_id in ids:
        status = wait_for(
            lambda j=job_id: (
                (v := b.get(f"/v1/jobs/{j}").json())["status"] in ("completed", "failed") and v
            ),
            timeout=120,
            interval=0.1,
            what=f"{job_id} to end",
        )
        assert status["status"] == "completed", status
        assert status["nodes_done"] == status["nodes_total"] == 3
        [output] = status["outputs"]
        assert (output["type"], output["node_id"]) == ("image", "3")
        assert base64.b64decode(output["data"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert output["size_bytes"] == len(base64.b64decode(output["data"]))

    assert job(a, ids[0])["endpoint"] == "modal_jobs"
    listed = {entry["job_id"]: entry for entry in b.get("/v1/jobs").json()["jobs"]}
    assert all(listed[job_id]["status"] == "completed" for job_id in ids)
    assert all(listed[job_id]["progress"] == 100 for job_id in ids)
    assert b.get("/v1/jobs", params={"status": "running"}).json()["jobs"] == []

    delivered = hook.wait_for(2, timeout=60)
    barrier = a.post(
        "/v1/jobs", json={"workflow": basic_prompt(1), "webhook_url": hook.url + "/modal"}
    ).json()["job_id"]
    hook.wait_until(lambda rs: any(r.headers.get("webhook-id") == barrier for r in rs), 120)
    assert hooks_by_id(hook) == {ids[0]: 1, ids[1]: 1, barrier: 1}
    for request in delivered:
        body = request.json()
        assert request.path == "/modal"
        assert set(body) == {"event", "job_id", "timestamp"}
        assert body["event"] == "job.completed" and body["timestamp"]


def test_modal_jobs_override_naming_a_media_item_in_queue_mode(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    # An `inputs` override whose value names a media item feeds that item, as in-process
    # (the override was applied after the media were inlined: ComfyUI got "in.png", a 400).
    server = SlowServer()
    server.files["far.png"] = png_bytes((10, 14), (0, 0, 255))
    try:
        a, b = replicas(spawn, tmp_path, redis_server.url)
        near = base64.b64encode(png_bytes((20, 12), (200, 40, 90))).decode()
        items = [
            ({"name": "in.png", "data": near}, (20, 12)),
            ({"name": "in.png", "url": server.url("/files/far.png")}, (10, 14)),
        ]
        ids = []
        for item, _ in items:
            body = {
                "workflow": image_workflow("placeholder.png"),
                "media": [item],
                "inputs": [{"node": "107", "field": "image", "value": "in.png"}],
            }
            accepted = a.post("/v1/jobs", json=body)
            assert accepted.status_code == 200, accepted.text
            ids.append(accepted.json()["job_id"])
        for job_id, (_, size) in zip(ids, items, strict=True):
            status = wait_for(
                lambda j=job_id: (
                    (v := b.get(f"/v1/jobs/{j}").json())["status"] in ("completed", "failed") and v
                ),
                timeout=120,
                interval=0.1,
                what=f"{job_id} to end",
            )
            assert status["status"] == "completed", status
            [output] = status["outputs"]
            assert Image.open(io.BytesIO(base64.b64decode(output["data"]))).size == size
    finally:
        server.stop()


@pytest.mark.sidecar_process
def test_modal_jobs_cancel_from_another_replica(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver()
    # One job per replica at a time: two slow jobs run, a third waits in the stream.
    a, b = replicas(spawn, tmp_path, redis_server.url, MAX_JOBS_PER_INSTANCE="1")
    slow = {"workflow": slow_prompt(blurs=40, size=2048), "webhook_url": hook.url}
    running = [a.post("/v1/jobs", json=slow).json()["job_id"] for _ in range(2)]
    for job_id in running:
        wait_for(
            lambda j=job_id: b.get(f"/v1/jobs/{j}").json()["status"] == "running",
            timeout=60,
            what=f"{job_id} to run",
        )
    waiting = a.post("/v1/jobs", json=slow).json()["job_id"]
    assert b.get(f"/v1/jobs/{waiting}").json()["status"] == "queued"

    # The queued job is ended at once by b (which sends its webhook), ...
    cancelled = delete(b, f"/v1/jobs/{waiting}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {
        "job_id": waiting,
        "status": "failed",
        "message": "Cancelled by user",
    }
    # ... a running one by the replica running it, whichever that is.
    victim = running[0]
    runner = runs_on([a, b], job(a, victim))
    other = b if runner is a else a
    stopped = delete(other, f"/v1/jobs/{victim}")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["message"] == "Cancelled by user"
    for job_id in (waiting, victim):
        status = runner.get(f"/v1/jobs/{job_id}").json()
        assert (status["status"], status["error"]) == ("failed", "Cancelled by user")
    again = delete(a, f"/v1/jobs/{waiting}")
    assert again.status_code == 200 and "already finalised" in again.json()["message"]
    assert delete(b, "/v1/jobs/no-such-job").status_code == 404

    delete(other, f"/v1/jobs/{running[1]}")
    hook.wait_until(lambda rs: {r.json()["job_id"] for r in rs} >= {waiting, *running}, 120)
    # A barrier job's webhook, then count: one each.
    barrier = a.post(
        "/v1/jobs", json={"workflow": basic_prompt(1), "webhook_url": hook.url}
    ).json()["job_id"]
    hook.wait_until(lambda rs: any(r.headers.get("webhook-id") == barrier for r in rs), 120)
    assert hooks_by_id(hook) == {waiting: 1, **dict.fromkeys(running, 1), barrier: 1}
    for request in hook.snapshot():
        body = request.json()
        if body["job_id"] != barrier:
            assert (body["event"], body["error"]) == ("job.failed", "Cancelled by user")


def test_modal_jobs_media_must_feed_a_media_input_in_queue_mode(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    [a] = replicas(spawn, tmp_path, redis_server.url, count=1)
    encoded = base64.b64encode(png_bytes()).decode()
    workflow = image_workflow("input.png")
    workflow["3"]["inputs"]["filename_prefix"] = "input.png"  # not a media input
    cases = [
        ({"workflow": workflow, "media": [{"name": "input.png", "data": encoded}]}, "media.0.name"),
        (
            {"workflow": image_workflow(), "media": [{"name": "input.png", "data": "not b64!"}]},
            "media.0.data",
        ),
        (
            {
                "workflow": image_workflow("a.png"),
                "inputs": [
                    {
                        "node": "3",
                        "field": "filename_prefix",
                        "value": encoded,
                        "type": "image_base64",
                    }
                ],
            },
            "inputs.0.field",
        ),
        (  # an override naming a media item feeds it: only a media input may take it
            {
                "workflow": image_workflow("input.png"),
                "media": [{"name": "input.png", "data": encoded}],
                "inputs": [{"node": "3", "field": "filename_prefix", "value": "input.png"}],
            },
            "inputs.0.value",
        ),
        (  # the submission's check (the SSRF guard, nothing fetched) names the media item
            {
                "workflow": image_workflow("input.png"),
                "media": [{"name": "input.png", "url": "http://169.254.169.254/missing.png"}],
            },
            "media.0",
        ),
    ]
    for body, location in cases:
        answer = a.post("/v1/jobs", json=body)
        assert answer.status_code in (400, 502), answer.text
        assert answer.json()["location"] == location, answer.json()
    assert a.get("/v1/jobs").json()["jobs"] == [], "nothing was queued"


@pytest.mark.sidecar_process
def test_adapter_webhooks_to_refused_urls_are_a_400_at_the_field_in_queue_mode(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    forward_proxy: ForwardProxy,
    receiver: Callable[..., Receiver],
) -> None:
    """The same check as in-process (tests/core/test_netguard_proxy.py), behind a real proxy:
    nothing is appended to the queue, nothing reaches the proxy."""
    metadata = receiver()  # 127.0.0.1: stands in for the metadata service
    [a] = replicas(
        spawn,
        tmp_path,
        redis_server.url,
        count=1,
        ALLOWED_URL_HOSTS="127.0.0.2/32",
        **forward_proxy.env(),
    )
    port = metadata.server.server_address[1]
    for hook_url in REFUSED_HOOKS:
        for adapter in (modal_job, aidock_job):
            path, body, location = adapter(hook_url.format(port=port))
            answer = a.post(path, json=body)
            assert answer.status_code == 400, (hook_url, answer.text)
            assert answer.json()["location"] == location
            assert "refused" in answer.json()["error"]
    assert a.get("/jobs", params={"limit": 1000}).json()["jobs"] == []
    assert metadata.snapshot() == []
    assert [r for r in forward_proxy.requests() if r[0] == "POST"] == []


def test_a_failed_modal_job_names_no_server_path_in_queue_mode(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    receiver: Callable[..., Receiver],
) -> None:
    """ComfyUI's execution error for a garbage media item, kept in Redis, reaches
    GET /v1/jobs/{id}, GET /jobs/{id} and the `job.failed` webhook with its server paths
    scrubbed."""
    hook = receiver()
    [a] = replicas(spawn, tmp_path, redis_server.url, count=1)
    body = {
        "workflow": image_workflow("garbage.png"),
        "media": [{"name": "garbage.png", "data": base64.b64encode(b"garbage").decode()}],
        "webhook_url": hook.url,
    }
    accepted = a.post("/v1/jobs", json=body)
    assert accepted.status_code == 200, accepted.text
    job_id = accepted.json()["job_id"]
    status = wait_for(
        lambda: (v := a.get(f"/v1/jobs/{job_id}").json())["status"] == "failed" and v,
        timeout=120,
        interval=0.1,
        what="the job to fail",
    )
    assert "cannot identify image file '<INPUT_DIR>/.comfy-sidecar/" in status["error"]
    assert status["error_log_tail"]
    a.assert_names_no_server_dir(json.dumps(status))
    a.assert_names_no_server_dir(a.get(f"/jobs/{job_id}").text)
    (event,) = hook.wait_for(1, timeout=60)
    assert event.json()["event"] == "job.failed"
    a.assert_names_no_server_dir(event.body.decode())


def test_a_media_name_too_long_to_write_is_a_400_in_queue_mode(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """Queue mode inlines media as data: URLs, yet bounds names as in-process mode does: one
    the atomic writer's `.part` would push past NAME_MAX is refused at the field."""
    [a] = replicas(spawn, tmp_path, redis_server.url, count=1)
    encoded = base64.b64encode(png_bytes()).decode()
    for name, status in (
        ("a" * 247 + ".png", 400),
        ("é" * 124 + ".png", 400),
        ("é" * 123 + ".png", 200),
    ):
        body = {"workflow": image_workflow(name), "media": [{"name": name, "data": encoded}]}
        answer = a.post("/v1/jobs", json=body)
        assert answer.status_code == status, answer.text
        if status == 400:
            assert answer.json()["location"] == "media.0.name"
    assert len(a.get("/v1/jobs").json()["jobs"]) == 1, "only the 250-byte name was queued"
