"""The native job API end to end: a sidecar in front of the ComfyUI double (and a real ComfyUI
when COMFY_HOME is set)."""

from __future__ import annotations

import os
import re
import signal
import threading
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    TINY_MODEL_NAME,
    Backend,
    Sidecar,
    basic_prompt,
    running_sidecar,
    slow_prompt,
    upscale_prompt,
)
from tests.storage.slow_server import SlowServer
from tests.waiting import wait_for


def sse_events(
    sidecar: Sidecar,
    job_id: str,
    last_event_id: str | None = None,
    timeout: float = 120,
    query: str = "",
) -> list[dict[str, Any]]:
    """Every SSE event of ``GET /jobs/{id}/events<query>`` until the stream ends: ``{"event",
    "id", "data"}`` (comments dropped; ``id`` absent when the event had none)."""
    import msgspec

    headers = {"last-event-id": last_event_id} if last_event_id else {}
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with httpx.stream(
        "GET", f"{sidecar.url}/jobs/{job_id}/events{query}", headers=headers, timeout=timeout
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    current["data"] = msgspec.json.decode(current["data"])
                    events.append(current)
                current = {}
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(":")
                current[field] = value.removeprefix(" ")
    return events


def submit(sidecar: Sidecar, prompt: dict[str, Any], **fields: Any) -> dict[str, Any]:
    response = sidecar.post("/jobs", json={"prompt": prompt, **fields})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_job(sidecar: Sidecar, job_id: str, timeout: float = 60) -> dict[str, Any]:
    response = sidecar.get(
        f"/jobs/{job_id}", params={"wait": min(timeout, 60)}, timeout=timeout + 5
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_submit_wait_and_fetch_outputs_with_range(shared_sidecar: Sidecar) -> None:
    accepted = submit(shared_sidecar, basic_prompt(batch=2))
    assert accepted["status"] in ("pending", "in_progress")
    assert accepted["urls"] == {
        "self": f"/jobs/{accepted['id']}",
        "events": f"/jobs/{accepted['id']}/events",
        "cancel": f"/jobs/{accepted['id']}/cancel",
    }
    job = wait_job(shared_sidecar, accepted["id"])
    assert job["status"] == "completed", job
    assert job["progress"] == 100 and job["nodes_done"] == job["nodes_total"] == 3
    assert job["created_at"] <= job["started_at"] <= job["completed_at"]
    assert job["stats"]["comfy_execution"]["duration"] >= 0
    assert [o["url"] for o in job["outputs"]] == [
        f"/jobs/{accepted['id']}/outputs/0",
        f"/jobs/{accepted['id']}/outputs/1",
    ]
    first = job["outputs"][0]
    assert (first["media_type"], first["mime_type"], first["node_id"]) == (
        "image",
        "image/png",
        "3",
    )
    whole = shared_sidecar.get(first["url"])
    assert whole.status_code == 200
    assert whole.headers["content-type"] == "image/png"
    assert int(whole.headers["content-length"]) == first["size_bytes"] == len(whole.content)
    assert whole.content.startswith(b"\x89PNG")
    part = shared_sidecar.get(first["url"], headers={"range": "bytes=1-8"})
    assert part.status_code == 206
    assert part.content == whole.content[1:9]
    assert part.headers["content-range"] == f"bytes 1-8/{len(whole.content)}"
    past = shared_sidecar.get(first["url"], headers={"range": f"bytes={len(whole.content)}-"})
    assert past.status_code == 416 and past.json()["location"] == "range"
    with_data = shared_sidecar.get(f"/jobs/{accepted['id']}", params={"include": "data"}).json()
    assert all(o["data"] for o in with_data["outputs"])
    assert shared_sidecar.get(f"/jobs/{accepted['id']}/outputs/2").status_code == 404


def check_content_disposition(header: str, filename: str) -> None:
    """``header`` is RFC 6266's form for ``filename``: ``inline``, a quoted ASCII fallback
    (printable, no ``"``, ``\\`` or ``%``) and ``filename*=UTF-8''`` naming it exactly."""
    match = re.fullmatch(r"inline; filename=\"([ !#$&-\[\]-~]*)\"; filename\*=UTF-8''(\S+)", header)
    assert match is not None, header
    assert len(match.group(1)) == len(filename)
    assert urllib.parse.unquote(match.group(2), errors="strict") == filename


def test_an_output_named_with_quotes_and_non_ascii_is_served(shared_sidecar: Sidecar) -> None:
    """A `"` made the Content-Disposition invalid and non-ASCII went out as raw Latin-1:
    RFC 6266's quoted ASCII fallback plus `filename*` instead."""
    job = wait_job(shared_sidecar, submit(shared_sidecar, basic_prompt(1, prefix='a"b é%'))["id"])
    assert job["status"] == "completed", job
    [output] = job["outputs"]
    assert 'a"b é%' in output["filename"]
    answer = shared_sidecar.get(output["url"])
    assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")
    check_content_disposition(answer.headers["content-disposition"], output["filename"])


@pytest.mark.parametrize("which", ["upscale", "multi-node"])
def test_progress_never_decreases_and_ends_at_100(shared_sidecar: Sidecar, which: str) -> None:
    prompt = upscale_prompt(256) if which == "upscale" else slow_prompt(blurs=3, size=512)
    job_id = submit(shared_sidecar, prompt)["id"]
    events = sse_events(shared_sidecar, job_id)
    assert events[-1]["event"] == "done"
    done = events[-1]["data"]
    assert done["status"] == "completed" and done["progress"] == 100
    values = [e["data"]["progress"] for e in events if e["event"] == "progress"]
    assert values, "no progress event"
    assert values == sorted(values)
    assert max(values) < 100  # 100 comes only with completion
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    kinds = {e["event"] for e in events}
    assert {"status", "progress", "output", "done"} <= kinds
    if which == "upscale":
        assert any(e["data"]["progress_max"] > 0 for e in events if e["event"] == "progress")


def test_events_resume_after_last_event_id_with_no_gap(shared_sidecar: Sidecar) -> None:
    job_id = submit(shared_sidecar, basic_prompt(batch=1))["id"]
    everything = sse_events(shared_sidecar, job_id)  # a job that ended replays and ends
    assert everything[-1]["event"] == "done"
    cut = everything[len(everything) // 2]["id"]
    resumed = sse_events(shared_sidecar, job_id, last_event_id=cut)
    assert [e["id"] for e in resumed] == [e["id"] for e in everything if int(e["id"]) > int(cut)]


def test_same_id_same_body_is_the_same_job_and_another_body_is_409(
    shared_sidecar: Sidecar,
) -> None:
    job_id = f"idem-{uuid.uuid4().hex[:8]}"
    body = {"prompt": basic_prompt(batch=1), "id": job_id}
    first = shared_sidecar.post("/jobs", json=body)
    again = shared_sidecar.post("/jobs", json=body)
    assert first.status_code == again.status_code == 202
    assert again.json()["created_at"] == first.json()["created_at"]
    other = shared_sidecar.post("/jobs", json={"prompt": basic_prompt(batch=2), "id": job_id})
    assert other.status_code == 409 and other.json()["location"] == "id"
    assert wait_job(shared_sidecar, job_id)["status"] == "completed"


def test_cancel_a_pending_and_a_running_job(shared_sidecar: Sidecar) -> None:
    running = submit(shared_sidecar, slow_prompt(blurs=8))["id"]
    pending = submit(shared_sidecar, slow_prompt(blurs=8))["id"]
    wait_for(
        lambda: shared_sidecar.get(f"/jobs/{running}").json()["status"] == "in_progress",
        timeout=60,
        what="the first job to run",
    )
    assert shared_sidecar.get(f"/jobs/{pending}").json()["queue_position"] is not None or (
        shared_sidecar.get(f"/jobs/{pending}").json()["status"] == "pending"
    )
    answer = shared_sidecar.post(f"/jobs/{pending}/cancel")
    assert answer.status_code == 200 and answer.json()["cancelled"] is True
    deleted = httpx.delete(f"{shared_sidecar.url}/jobs/{running}", timeout=30)
    assert deleted.status_code == 200 and deleted.json()["cancelled"] is True
    for job_id in (pending, running):
        assert wait_job(shared_sidecar, job_id)["status"] == "cancelled"
    again = shared_sidecar.post(f"/jobs/{running}/cancel").json()
    assert again == {"id": running, "cancelled": False, "status": "cancelled"}


def test_cancel_a_job_downloading_its_inputs(shared_sidecar: Sidecar) -> None:
    # POST /jobs preprocesses before it answers, so it is still open while a LoadImage URL
    # downloads. A cancel then stops the download (POST /jobs answers 499) and the job ends
    # cancelled, at once: the cancel waited 10 s for a record that was dropped, answered
    # `status: pending`, and the job was gone (404).
    server = SlowServer()
    try:
        job_id = f"dl-cancel-{uuid.uuid4().hex[:8]}"
        prompt = basic_prompt(1)
        prompt["9"] = {"class_type": "LoadImage", "inputs": {"image": server.url("/trickle")}}
        answers: list[httpx.Response] = []
        submitting = threading.Thread(
            target=lambda: answers.append(
                shared_sidecar.post("/jobs", json={"prompt": prompt, "id": job_id})
            )
        )
        submitting.start()
        wait_for(lambda: server.sent > 0, what="the input's body to flow")
        assert shared_sidecar.get(f"/jobs/{job_id}").json()["status"] == "pending"
        answer = shared_sidecar.post(f"/jobs/{job_id}/cancel")
        assert answer.json() == {"id": job_id, "cancelled": True, "status": "cancelled"}
        submitting.join(timeout=30)
        assert answers[0].status_code == 499, answers[0].text
        job = shared_sidecar.get(f"/jobs/{job_id}").json()
        assert (job["status"], job["endpoint"]) == ("cancelled", "jobs")
        assert "interrupted" in job["error"]["error"]
        wait_for(lambda: server.gone == 1, timeout=5, what="the download to be cut")
    finally:
        server.stop()


def test_listing_filters_and_pages(shared_sidecar: Sidecar) -> None:
    ids = [submit(shared_sidecar, basic_prompt(batch=1))["id"] for _ in range(3)]
    for job_id in ids:
        wait_job(shared_sidecar, job_id)
    page = shared_sidecar.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    assert "outputs" not in page["jobs"][0]
    rest = shared_sidecar.get("/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert rest["jobs"][0]["id"] == ids[0]
    done = shared_sidecar.get("/jobs", params={"status": "completed", "limit": 1000}).json()
    assert set(ids) <= {j["id"] for j in done["jobs"]}
    assert all(j["status"] == "completed" for j in done["jobs"])
    for params, location in (
        ({"status": "finished"}, "status"),
        ({"cursor": "abc"}, "cursor"),
        ({"limit": "0"}, "limit"),
    ):
        bad = shared_sidecar.get("/jobs", params=params)
        assert bad.status_code == 400, params
        assert bad.json()["location"] == location


def check_long_digit_strings(sidecar: Sidecar, job: dict[str, Any]) -> None:
    """A `cursor` or `Last-Event-ID` of 5,000 digits (Python converts at most 4,300) is a 400
    naming it, and so is anything over 18 digits; a `Range` position that long is past the end
    of ``job``'s first output (416 for a start, the whole file for an end)."""
    digits = "9" * 5000
    for cursor in (digits, "9" * 19):
        answer = sidecar.get("/jobs", params={"cursor": cursor})
        assert answer.status_code == 400, answer.text
        assert answer.json()["location"] == "cursor"
    assert sidecar.get("/jobs", params={"cursor": "9" * 18}).status_code == 200
    for last_event_id in (digits, "9" * 19):
        answer = sidecar.get(f"/jobs/{job['id']}/events", headers={"last-event-id": last_event_id})
        assert answer.status_code == 400, answer.text
        assert answer.json()["location"] == "last-event-id"
    url, size = job["outputs"][0]["url"], job["outputs"][0]["size_bytes"]
    past = sidecar.get(url, headers={"range": f"bytes={digits}-"})
    assert past.status_code == 416 and past.json()["location"] == "range"
    assert past.headers["content-range"] == f"bytes */{size}"
    whole = sidecar.get(url, headers={"range": f"bytes=0-{digits}"})
    assert whole.status_code == 206 and len(whole.content) == size


def test_long_digit_strings_are_400s_naming_the_parameter(shared_sidecar: Sidecar) -> None:
    job = wait_job(shared_sidecar, submit(shared_sidecar, basic_prompt(batch=1))["id"])
    assert job["status"] == "completed", job
    check_long_digit_strings(shared_sidecar, job)


def test_unknown_job_is_404_and_prompt_jobs_are_listed(shared_sidecar: Sidecar) -> None:
    missing = shared_sidecar.get("/jobs/no-such-job")
    assert missing.status_code == 404 and missing.json()["location"] == "id"
    job_id = f"sync-{uuid.uuid4().hex[:8]}"
    assert shared_sidecar.post("/prompt", json={"prompt": basic_prompt(1), "id": job_id}).is_success
    job = shared_sidecar.get(f"/jobs/{job_id}").json()
    assert (job["endpoint"], job["status"]) == ("prompt", "completed")
    assert job["outputs"][0]["url"] is None  # answered inline, not kept


def test_a_bad_request_leaves_no_job(shared_sidecar: Sidecar) -> None:
    job_id = f"bad-{uuid.uuid4().hex[:8]}"
    prompt = basic_prompt(1)
    prompt["9"] = {"class_type": "LoadImage", "inputs": {"image": "not base64!"}}
    answer = shared_sidecar.post("/jobs", json={"prompt": prompt, "id": job_id})
    assert answer.status_code == 400 and answer.json()["location"] == "prompt.9.inputs.image"
    assert shared_sidecar.get(f"/jobs/{job_id}").status_code == 404


def test_ended_jobs_expire_with_their_files(spawn: Any, tmp_path: Path) -> None:
    jobs_dir = tmp_path / "jobs"
    sidecar = spawn(
        Backend("double", tmp_path / "comfy"), JOB_RETENTION_S="1", JOBS_DIR=str(jobs_dir)
    )
    sidecar.wait_ready()
    job_id = submit(sidecar, basic_prompt(batch=1))["id"]
    assert wait_job(sidecar, job_id)["status"] == "completed"
    assert any((jobs_dir / job_id).iterdir())
    wait_for(lambda: sidecar.get(f"/jobs/{job_id}").status_code == 404, timeout=30, what="expiry")
    wait_for(lambda: not (jobs_dir / job_id).exists(), timeout=30, what="files removed")


def test_comfyui_killed_mid_job_fails_the_job_with_its_log_tail(spawn: Any, tmp_path: Path) -> None:
    sidecar = spawn(Backend("double", tmp_path / "comfy"), ALWAYS_RESTART_COMFYUI="true")
    sidecar.wait_ready()
    job_id = submit(sidecar, slow_prompt(blurs=10))["id"]
    wait_for(
        lambda: sidecar.get(f"/jobs/{job_id}").json()["status"] == "in_progress",
        timeout=60,
        what="the job to run",
    )
    os.killpg(sidecar.child_pid(), signal.SIGKILL)
    job = wait_job(sidecar, job_id)
    assert job["status"] == "failed"
    assert "went away" in job["error"]["error"]
    assert isinstance(job["error"]["comfyui_log_tail"], list)


def test_previews_are_sent_only_when_asked(tmp_path: Path) -> None:
    """The double sends a preview frame (type 4, with prompt_id and node id, as ComfyUI does
    for a client that announced ``supports_preview_metadata``) while the upscale node runs. A
    real ComfyUI sends previews only from samplers, which the model-free test prompts lack."""
    import base64

    prompt = slow_prompt(blurs=3, size=1024)  # seconds of blurs first: the stream is open
    last = str(len(prompt) - 1)  # the last blur; the upscale model takes its image
    prompt[str(len(prompt))]["inputs"]["images"] = ["u2", 0]
    prompt["u1"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": TINY_MODEL_NAME}}
    prompt["u2"] = {
        "class_type": "ImageUpscaleWithModel",
        "inputs": {"upscale_model": ["u1", 0], "image": [last, 0]},
    }
    with running_sidecar("double", tmp_path) as sidecar:
        job_id = submit(sidecar, prompt)["id"]
        live = sse_events(sidecar, job_id, query="?previews=true")
        replay = sse_events(sidecar, job_id, query="?previews=true")
    previews = [e for e in live if e["event"] == "preview"]
    assert previews, [e["event"] for e in live]
    first = previews[0]
    assert "id" not in first  # previews are live only: not part of the resumable log
    assert (first["data"]["node_id"], first["data"]["mime_type"]) == ("u2", "image/png")
    assert base64.b64decode(first["data"]["data"]).startswith(b"\x89PNG")
    assert all(e["event"] != "preview" for e in replay)  # an ended job replays its log only
