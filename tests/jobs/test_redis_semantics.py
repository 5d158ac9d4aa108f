"""The shared job queue's guarantees at its edges (JOB_QUEUE_URL), on a real redis-server and
the ComfyUI double: a job ends and fires its webhook once across a lost lease; SIGTERM gives
unstarted jobs back at once; a bad prompt is refused at POST time and never queued; a queued
job shows its place in the queue from any replica; outputs over JOB_INLINE_OUTPUT_MB go to
JOB_OUTPUT_URL (moto's S3) or fail naming both settings."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import TINY_MODEL_NAME, Backend, Sidecar, basic_prompt, slow_prompt
from tests.jobs.test_jobs_api import sse_events
from tests.jobs.test_redis_queue import (
    executions,
    job,
    kill_runner,
    running_view,
    runs_on,
    submit,
)
from tests.receiver import Receiver
from tests.redis_server import RedisServer, redis_server
from tests.storage.conftest import moto_server
from tests.waiting import wait_for

__all__ = ["moto_server", "redis_server"]  # the fixtures, used by name

WORK = "comfy-sidecar:jobs"


def replica(
    spawn: Callable[..., Sidecar], tmp_path: Path, url: str, name: str, **env: str
) -> Sidecar:
    """One ready sidecar on the queue at ``url`` (lease 2 s and grace 5 s unless ``env`` says
    otherwise)."""
    settings = {"JOB_QUEUE_URL": url, "JOB_LEASE_S": "2", "SHUTDOWN_GRACE_S": "5", **env}
    sidecar = spawn(Backend("double", tmp_path / f"comfy-{name}"), **settings)
    sidecar.wait_ready()
    return sidecar


def attempts_of(sidecar: Sidecar, job_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = job(sidecar, job_id).get("attempts") or []
    return found


@pytest.mark.sidecar_process
def test_a_job_ends_and_fires_its_webhook_once_across_a_lost_lease(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver()
    a = replica(spawn, tmp_path, redis_server.url, "a")
    b = replica(spawn, tmp_path, redis_server.url, "b")
    job_id = submit(a, slow_prompt(blurs=3, size=2048), webhook_v2=hook.url + "/hook")
    first = runs_on([a, b], running_view(a, job_id))
    second = b if first is a else a
    assert first.proc is not None
    os.kill(first.proc.pid, signal.SIGSTOP)  # presumed dead: no heartbeat past the lease
    try:
        wait_for(
            lambda: len(attempts_of(second, job_id)) == 2,
            timeout=30,
            interval=0.1,
            what="the other replica to take the job over",
        )
        view = job(second, job_id, wait=60)
        assert view["status"] == "completed", view
        assert runs_on([second], view) is second
        hook.wait_for(1, timeout=30)
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    # The resumed replica finishes its own run (its ComfyUI ran the job meanwhile) and,
    # finding the job ended, discards its result: no second webhook, no second end.
    wait_for(
        lambda: "this run is discarded" in first.log() or "result here is discarded" in first.log(),
        timeout=60,
        what="the resumed replica to discard its result",
    )
    assert executions(first) == 1 and executions(second) == 1, "the job ran on both"
    assert job(first, job_id) == view, "the first end stands"
    assert [r.headers.get("webhook-id") for r in hook.snapshot()] == [job_id]


@pytest.mark.sidecar_process
def test_sigterm_gives_back_a_claimed_unstarted_job_at_once(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    # MAX_JOBS_PER_INSTANCE=2 (the default): a replica holds two claims per instance, one
    # executing and one waiting in ComfyUI's queue. The waiting one must not wait for the
    # executing one to drain, nor for the 30 s lease.
    lease = {"JOB_LEASE_S": "30", "SHUTDOWN_GRACE_S": "60", "MAX_JOBS_PER_INSTANCE": "2"}
    a = replica(spawn, tmp_path, redis_server.url, "a", **lease)
    long_id = submit(a, slow_prompt(blurs=40, size=2048))  # a minute: outlives b's start-up
    running_view(a, long_id)  # executing first: the next one waits behind it in ComfyUI
    short_id = submit(a, slow_prompt(blurs=1, size=512))
    wait_for(
        lambda: len(attempts_of(a, short_id)) == 1,
        timeout=30,
        what="a to claim the second job too",
    )
    b = replica(spawn, tmp_path, redis_server.url, "b", **lease)
    assert job(a, long_id)["status"] == "in_progress", "the long job outlived b's start-up"
    assert job(a, short_id)["status"] == "pending", "a held the second job unstarted"
    assert a.proc is not None
    a.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    wait_for(
        lambda: b.proc is not None and f"-{b.proc.pid}-" in str(job(b, short_id).get("replica")),
        timeout=30,
        interval=0.1,
        what="b to take the given-back job",
    )
    assert time.monotonic() - stopped < 10, "taken over long before the 30 s lease"
    short = job(b, short_id, wait=60)
    assert short["status"] == "completed", short
    (taken,) = short["attempts"]  # a's claim ran nothing: struck, not counted
    assert taken["replica"] == short["replica"] and runs_on([b], short) is b
    assert f"job {short_id}: given back to the queue unstarted" in a.log()
    statuses = [e["data"]["status"] for e in sse_events(b, short_id) if e["event"] == "status"]
    assert "cancelled" not in statuses, "giving it back logged no end"
    # The executing job stayed on a (draining it within the grace is test_redis_queue's);
    # cancelled here from b so the test need not wait for it.
    assert job(b, long_id)["status"] == "in_progress"
    cancel = b.post(f"/jobs/{long_id}/cancel", timeout=30).json()
    assert cancel == {"id": long_id, "cancelled": True, "status": "cancelled"}, cancel
    assert len(job(b, long_id)["attempts"]) == 1, "never given back"
    assert a.proc.wait(60) == 0, "a exited once its executing job ended"
    assert executions(b) == 1, "b ran only the given-back job"


def test_a_bad_prompt_is_refused_at_post_and_never_queued(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a = replica(spawn, tmp_path, redis_server.url, "a")
    no_output = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}
    bad_input = basic_prompt()
    bad_input["4"] = {"class_type": "LoadImage", "inputs": {"image": "ftp://example.com/x.png"}}
    for prompt, where in ((no_output, "prompt"), (bad_input, "prompt.4.inputs.image")):
        answer = a.post("/jobs", json={"prompt": prompt, "id": f"bad-{len(where)}"})
        assert answer.status_code == 400, answer.text
        assert answer.json()["location"] == where, answer.json()
        assert a.get(f"/jobs/bad-{len(where)}").status_code == 404
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.xlen(WORK) == 0, "nothing was queued"
        assert client.keys("comfy-sidecar:job:*") == []
    finally:
        client.close()


@pytest.mark.parametrize("where", ["submitter", "other"])
def test_a_queued_job_shows_its_position_from_any_replica(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path, where: str
) -> None:
    a = replica(spawn, tmp_path, redis_server.url, "a", MAX_JOBS_PER_INSTANCE="1")
    b = replica(spawn, tmp_path, redis_server.url, "b", MAX_JOBS_PER_INSTANCE="1")
    ids = [submit(a, slow_prompt(blurs=3, size=2048)) for _ in range(5)]
    reader = a if where == "submitter" else b
    # Two run (one per replica); the other three wait in the stream, in submission order. The
    # positions are read once both replicas hold their job: a claim between two of the reads
    # would shift the jobs after it (each read is exact, the five are not one snapshot).
    wait_for(
        lambda: sum(job(reader, i)["status"] == "in_progress" for i in ids) == 2,
        timeout=30,
        interval=0.05,
        what="both replicas to run a job",
    )
    positions = wait_for(
        lambda: (p := [job(reader, i).get("queue_position") for i in ids])[2:] == [0, 1, 2] and p,
        timeout=30,
        interval=0.05,
        what="the three waiting jobs to show positions 0, 1, 2",
    )
    assert positions[:2] == [None, None], positions
    views = [job(reader, i, wait=60) for i in ids]
    assert all(v["status"] == "completed" and v.get("queue_position") is None for v in views)


BUCKET = "queue-outputs"
#: 0.0001 MB (104 bytes): every PNG the double writes is over it.
TINY_INLINE_MB = "0.0001"


@pytest.fixture
def s3_env(moto_server: str) -> dict[str, str]:
    """Settings that point the sidecar's S3 backend at moto, with the bucket made."""
    import boto3

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_server,
    }
    client = boto3.client(
        "s3",
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    return env


def s3_object(env: dict[str, str], url: str) -> bytes:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    assert url.startswith(f"s3://{BUCKET}/"), url
    body: bytes = client.get_object(Bucket=BUCKET, Key=url[len(f"s3://{BUCKET}/") :])["Body"].read()
    return body


def test_outputs_over_the_inline_limit_go_to_job_output_url(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    s3_env: dict[str, str],
) -> None:
    a = replica(
        spawn,
        tmp_path,
        redis_server.url,
        "a",
        JOB_INLINE_OUTPUT_MB=TINY_INLINE_MB,
        JOB_OUTPUT_URL=f"s3://{BUCKET}/spill/",
        **s3_env,
    )
    spilled = submit(a, basic_prompt(batch=2, size=64))
    own = submit(a, basic_prompt(batch=1, size=64), s3={"bucket": BUCKET, "prefix": "own"})
    view = job(a, spilled, wait=60)
    assert view["status"] == "completed", view
    assert len(view["outputs"]) == 2
    for output in view["outputs"]:
        assert output["url"].startswith(f"s3://{BUCKET}/spill/{spilled}/"), output
        data = s3_object(s3_env, output["url"])
        assert data.startswith(b"\x89PNG") and len(data) == output["size_bytes"]
    assert a.get(f"/jobs/{spilled}/outputs/0").status_code == 404, "not kept in Redis"
    # The job's own upload target wins over JOB_OUTPUT_URL.
    (output,) = job(a, own, wait=60)["outputs"]
    assert output["url"].startswith(f"s3://{BUCKET}/own/"), output
    assert len(s3_object(s3_env, output["url"])) == output["size_bytes"]


def test_outputs_over_the_inline_limit_with_nowhere_to_go_fail_naming_both_settings(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a = replica(spawn, tmp_path, redis_server.url, "a", JOB_INLINE_OUTPUT_MB=TINY_INLINE_MB)
    view = job(a, submit(a, basic_prompt(batch=1, size=64)), wait=60)
    assert view["status"] == "failed", view
    error = view["error"]
    assert error["size_bytes"] > 104
    message = error["error"]
    assert f"({error['size_bytes']} bytes)" in message
    assert "JOB_INLINE_OUTPUT_MB (0.0001 MB)" in message and "JOB_OUTPUT_URL" in message


def test_the_simple_modal_api_goes_through_the_shared_queue(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a = replica(spawn, tmp_path, redis_server.url, "a")
    b = replica(spawn, tmp_path, redis_server.url, "b")
    bad = a.post("/submit_workflow", json={"workflow": {"1": {"class_type": "EmptyImage"}}})
    assert bad.status_code == 400 and bad.json()["location"].startswith("workflow"), bad.text
    answer = a.post("/submit_workflow", json={"workflow": basic_prompt(batch=2, size=32)})
    assert answer.status_code == 202, answer.text
    call_id = answer.json()["call_id"]
    view = job(b, call_id, wait=60)  # a job of the shared queue: any replica knows it
    assert view["status"] == "completed", view
    status = b.get("/status", params={"call_id": call_id})
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["status"] == "COMPLETED"
    images = body["output"]["images"]
    assert [i["filename"] for i in images] == [o["filename"] for o in view["outputs"]]
    assert all(base64.b64decode(i["data"]).startswith(b"\x89PNG") for i in images)
    assert executions(a) + executions(b) == 1
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.exists(f"comfy-sidecar:job:{call_id}") == 1
        assert client.zcard("comfy-sidecar:index") == 1, "the bad workflow was never queued"
    finally:
        client.close()


@pytest.mark.sidecar_process
def test_previews_reach_a_follower_on_another_replica(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """The double sends preview frames while the upscale node runs (see test_jobs_api)."""
    a = replica(spawn, tmp_path, redis_server.url, "a")
    b = replica(spawn, tmp_path, redis_server.url, "b")
    prompt = slow_prompt(blurs=3, size=1024)  # seconds of blurs first: the stream is open
    last = str(len(prompt) - 1)
    prompt[str(len(prompt))]["inputs"]["images"] = ["u2", 0]
    prompt["u1"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": TINY_MODEL_NAME}}
    prompt["u2"] = {
        "class_type": "ImageUpscaleWithModel",
        "inputs": {"upscale_model": ["u1", 0], "image": [last, 0]},
    }
    job_id = submit(a, prompt)
    runner = runs_on([a, b], running_view(a, job_id))
    other = b if runner is a else a
    live = sse_events(other, job_id, query="?previews=true")
    previews = [e for e in live if e["event"] == "preview"]
    assert previews, [e["event"] for e in live]
    assert "id" not in previews[0]  # live only: not part of the resumable log
    assert (previews[0]["data"]["node_id"], previews[0]["data"]["mime_type"]) == ("u2", "image/png")
    assert base64.b64decode(previews[0]["data"]["data"]).startswith(b"\x89PNG")
    assert live[-1]["event"] == "done" and live[-1]["data"]["status"] == "completed"
    logged = [e for e in live if e["event"] != "preview"]
    assert [int(e["id"]) for e in logged] == list(range(1, len(logged) + 1))
    plain = sse_events(other, job_id)
    assert all(e["event"] != "preview" for e in plain), "only when asked"


@pytest.mark.sidecar_process
def test_a_job_out_of_attempts_fires_its_failure_webhook_once(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver()
    a = replica(spawn, tmp_path, redis_server.url, "a", JOB_MAX_ATTEMPTS="1")
    b = replica(spawn, tmp_path, redis_server.url, "b", JOB_MAX_ATTEMPTS="1")
    job_id = submit(a, slow_prompt(blurs=3, size=2048), webhook_v2=hook.url + "/hook")
    _, survivor = kill_runner([a, b], job_id)
    view = job(survivor, job_id, wait=30)
    assert view["status"] == "failed" and "JOB_MAX_ATTEMPTS=1" in view["error"]["error"], view
    (delivery,) = hook.wait_for(1, timeout=30)
    assert delivery.headers.get("webhook-id") == job_id
    body = delivery.json()
    assert body["type"] == "prompt.failed" and body["id"] == job_id, body
    assert "JOB_MAX_ATTEMPTS=1" in body["error"]["error"]


def test_cancelling_a_queued_job_fires_its_failure_webhook_once(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver()
    a = replica(spawn, tmp_path, redis_server.url, "a", MAX_JOBS_PER_INSTANCE="1")
    b = replica(spawn, tmp_path, redis_server.url, "b", MAX_JOBS_PER_INSTANCE="1")
    busy = [submit(a, slow_prompt(blurs=4, size=2048)) for _ in range(2)]
    queued = submit(a, basic_prompt(), webhook_v2=hook.url + "/hook")
    wait_for(
        lambda: job(b, queued)["queue_position"] == 0,
        timeout=30,
        what="both replicas to be busy and the job to wait next in line",
    )
    answer = b.post(f"/jobs/{queued}/cancel")
    assert answer.json() == {"id": queued, "cancelled": True, "status": "cancelled"}
    (delivery,) = hook.wait_for(1, timeout=30)
    body = delivery.json()
    assert body["type"] == "prompt.failed" and body["id"] == queued, body
    view = job(a, queued)
    assert view["status"] == "cancelled" and view["queue_position"] is None, view
    assert view["error"]["error"] == body["error"]["error"]
    for job_id in busy:
        assert job(a, job_id, wait=60)["status"] == "completed"
    assert executions(a) + executions(b) == 2, "the cancelled job never ran"
    assert len(hook.snapshot()) == 1


def test_a_job_keeps_its_submission_time_when_a_replica_takes_it(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    a = replica(spawn, tmp_path, redis_server.url, "a", MAX_JOBS_PER_INSTANCE="1")
    first = submit(a, slow_prompt(blurs=2, size=2048))
    running_view(a, first)
    answer = a.post("/jobs", json={"prompt": basic_prompt()})  # waits behind the first
    assert answer.status_code == 202, answer.text
    view = job(a, answer.json()["id"], wait=60)
    assert view["status"] == "completed", view
    assert view["created_at"] == answer.json()["created_at"]
    assert view["started_at"] > view["created_at"]


def test_a_submission_downloads_nothing_on_the_replica_that_takes_it(
    redis_server: RedisServer, spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """POST /jobs with a model URL is checked without side effects (issue 21): the submitting
    replica, its only slot busy so it cannot claim the job yet, answers 202 having made no GET
    of the model; the job downloads it once it is claimed, and completes."""
    from tests.storage.servers import FileServer
    from tests.tiny_model import tiny_upscale_model_bytes

    files = FileServer()
    try:
        files.files["tiny-upscale.safetensors"] = tiny_upscale_model_bytes()
        a = replica(spawn, tmp_path, redis_server.url, "a", MAX_JOBS_PER_INSTANCE="1")
        busy = submit(a, slow_prompt(blurs=3, size=2048))
        wait_for(
            lambda: job(a, busy)["status"] == "in_progress",
            timeout=30,
            interval=0.05,
            what="the slot to be taken",
        )
        url = files.url("/files/tiny-upscale.safetensors")
        prompt = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0},
            },
            "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": url}},
            "3": {
                "class_type": "ImageUpscaleWithModel",
                "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]},
            },
            "4": {
                "class_type": "SaveImage",
                "inputs": {"images": ["3", 0], "filename_prefix": "u"},
            },
        }
        job_id = submit(a, prompt)
        gets = [r for r in files.requests if r[0] == "GET"]
        assert gets == [], "the submission downloaded the model"
        assert job(a, job_id)["status"] == "pending"
        view = job(a, job_id, wait=60)
        assert view["status"] == "completed", view
        downloads = [r[1] for r in files.requests if r[0] == "GET"]
        assert downloads == ["/files/tiny-upscale.safetensors"], downloads
    finally:
        files.stop()
