"""The Modal jobs API adapter (``/v1/jobs``) against the ComfyUI double (and a real ComfyUI when
COMFY_HOME is set), used the way its operator guide's example clients use it."""

from __future__ import annotations

import base64
import io
import json
import pathlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Sidecar, basic_prompt, png_bytes, slow_prompt
from tests.waiting import wait_for


def image_workflow(image: str = "input.png") -> dict[str, Any]:
    """The guide's shape: a LoadImage naming a media file, a node to override, a SaveImage."""
    return {
        "107": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["107", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }


def poll(sidecar: Sidecar, job_id: str, timeout: float = 120) -> tuple[dict[str, Any], list[Any]]:
    """The guide's "Minimal Python helper" loop, with httpx and a deadline: GET the job until
    it is completed or failed; returns (final status, every progress value seen)."""
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{sidecar.url}/v1/jobs/{job_id}", timeout=10).json()
        seen.append(status["progress"])
        if status["status"] in {"completed", "failed"}:
            return status, seen
        time.sleep(0.05)  # the guide polls every 3 s; a deadline bounds the loop
    raise AssertionError(f"job {job_id} did not end within {timeout} s")


def no_media_folders(sidecar: Sidecar) -> bool:
    return not any(p.name.endswith("-media") for p in sidecar.backend.input_dir.rglob("*"))


def test_the_guides_example_flow(shared_sidecar: Sidecar, tmp_path: Path) -> None:
    image = png_bytes((24, 16), (10, 200, 30))
    payload = {
        "workflow": image_workflow("input.png"),
        "inputs": [{"node": 3, "field": "filename_prefix", "value": "modal", "type": "raw"}],
        "media": [{"name": "input.png", "data": base64.b64encode(image).decode()}],
    }
    (tmp_path / "payload.json").write_text(json.dumps(payload))
    # cURL submission: curl -X POST -H "Content-Type: application/json" -d @payload.json
    response = httpx.post(
        f"{shared_sidecar.url}/v1/jobs",
        headers={"Content-Type": "application/json"},
        content=(tmp_path / "payload.json").read_bytes(),
        timeout=30,
    )
    assert response.status_code == 200, response.text  # the harness treats anything else as error
    job = response.json()
    assert set(job) == {"job_id", "status", "created_at", "estimated_time"}
    assert job["status"] == "queued"
    status, progress = poll(shared_sidecar, job["job_id"])
    assert status["status"] == "completed", status
    assert progress == sorted(progress) and status["progress"] == 100
    assert status["nodes_done"] == status["nodes_total"] == 3
    assert status["prompt_id"] and status["last_event_time"]
    [output] = status["outputs"]
    assert (output["type"], output["node_id"]) == ("image", "3")
    assert "modal" in output["filename"]
    # the guide's save_output()
    payload_bytes = base64.b64decode(output["data"])
    out_path = pathlib.Path(tmp_path / "outputs") / f"{job['job_id']}_{output['filename']}"
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_bytes(payload_bytes)
    assert out_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert output["size_bytes"] == len(payload_bytes)
    from PIL import Image

    assert Image.open(out_path).size == (24, 16)
    wait_for(lambda: no_media_folders(shared_sidecar), timeout=10, what="media folder removed")


def test_image_base64_override_and_listing(shared_sidecar: Sidecar) -> None:
    encoded = base64.b64encode(png_bytes((8, 8))).decode()
    ids = []
    for _ in range(2):
        body = {
            "workflow": image_workflow("placeholder.png"),
            "inputs": [{"node": "107", "field": "image", "value": encoded, "type": "image_base64"}],
        }
        answer = shared_sidecar.post("/v1/jobs", json=body)
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["job_id"])
    for job_id in ids:
        assert poll(shared_sidecar, job_id)[0]["status"] == "completed"
    listed = shared_sidecar.get("/v1/jobs", params={"status": "completed", "limit": 2}).json()
    assert [j["job_id"] for j in listed["jobs"]] == ids[::-1]
    assert all(
        j["status"] == "completed" and j["progress"] == 100 and j["created_at"]
        for j in listed["jobs"]
    )
    bad = shared_sidecar.get("/v1/jobs", params={"status": "pending"})
    assert bad.status_code == 400 and bad.json()["location"] == "status"


def test_an_override_may_name_a_media_item(shared_sidecar: Sidecar) -> None:
    # The guide: a media item's `name` "becomes the filename seen by LoadImage nodes", so an
    # `inputs` override naming it loads that item, as the workflow's own values do (it was
    # applied after the media were renamed, and ComfyUI was asked for "in.png": a 400).
    image = png_bytes((20, 12), (200, 40, 90))
    body = {
        "workflow": image_workflow("placeholder.png"),
        "media": [{"name": "in.png", "data": base64.b64encode(image).decode()}],
        "inputs": [{"node": "107", "field": "image", "value": "in.png"}],
    }
    answer = shared_sidecar.post("/v1/jobs", json=body)
    assert answer.status_code == 200, answer.text
    status, _ = poll(shared_sidecar, answer.json()["job_id"])
    assert status["status"] == "completed", status
    [output] = status["outputs"]
    from PIL import Image

    loaded = Image.open(io.BytesIO(base64.b64decode(output["data"]))).convert("RGB")
    assert loaded.size == (20, 12)
    inverted = (255 - 200, 255 - 40, 255 - 90)
    assert all(abs(a - b) <= 2 for a, b in zip(loaded.getpixel((3, 3)), inverted, strict=True))
    wait_for(lambda: no_media_folders(shared_sidecar), timeout=10, what="media folder removed")


def test_cancel_ends_failed_and_sends_the_webhooks(shared_sidecar: Sidecar, receiver: Any) -> None:
    hook = receiver()
    done = shared_sidecar.post(
        "/v1/jobs", json={"workflow": basic_prompt(1), "webhook_url": hook.url}
    ).json()["job_id"]
    running = shared_sidecar.post(
        "/v1/jobs", json={"workflow": slow_prompt(blurs=8), "webhook_url": hook.url}
    ).json()["job_id"]
    wait_for(
        lambda: shared_sidecar.get(f"/v1/jobs/{running}").json()["status"] == "running",
        timeout=60,
        what="the slow job to run",
    )
    cancelled = httpx.delete(f"{shared_sidecar.url}/v1/jobs/{running}", timeout=30)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["message"] == "Cancelled by user"
    status, _ = poll(shared_sidecar, running)
    assert (status["status"], status["error"]) == ("failed", "Cancelled by user")
    again = httpx.delete(f"{shared_sidecar.url}/v1/jobs/{running}", timeout=30)
    assert again.status_code == 200 and "already finalised" in again.json()["message"]
    events = {
        r.json()["job_id"]: r.json() for r in hook.wait_until(lambda rs: len(rs) >= 2, timeout=60)
    }
    assert events[done]["event"] == "job.completed" and events[done]["timestamp"]
    assert events[running]["event"] == "job.failed"
    assert events[running]["error"] == "Cancelled by user"
    assert "outputs" not in events[done]


def test_a_failed_job_names_no_server_path(shared_sidecar: Sidecar, receiver: Any) -> None:
    """ComfyUI's execution error for a garbage media item reaches GET /v1/jobs/{id} (`error`,
    `error_log_tail`) and the `job.failed` webhook with its server paths scrubbed."""
    hook = receiver()
    body = {
        "workflow": image_workflow("garbage.png"),
        "media": [{"name": "garbage.png", "data": base64.b64encode(b"garbage").decode()}],
        "webhook_url": hook.url,
    }
    answer = shared_sidecar.post("/v1/jobs", json=body)
    assert answer.status_code == 200, answer.text
    status, _ = poll(shared_sidecar, answer.json()["job_id"])
    assert status["status"] == "failed"
    assert "cannot identify image file '<INPUT_DIR>/.comfy-sidecar/" in status["error"]
    assert status["error_log_tail"]
    shared_sidecar.assert_names_no_server_dir(json.dumps(status))
    (event,) = hook.wait_for(1, timeout=60)
    assert event.json()["event"] == "job.failed"
    assert "'<INPUT_DIR>/.comfy-sidecar/" in event.json()["error"]
    shared_sidecar.assert_names_no_server_dir(event.body.decode())


@pytest.mark.parametrize(
    ("change", "location"),
    [
        ({"inputs": [{"node": "99", "field": "x", "value": 1}]}, "inputs.0.node"),
        ({"inputs": [{"node": "3", "field": "x", "value": 1, "type": "bad"}]}, "inputs[0].type"),
        ({"media": [{"name": "a.png", "data": "not base64!"}]}, "media.0.data"),
        ({"media": [{"name": "../a.png", "data": "AAAA"}]}, "media.0.name"),
        ({"media": [{"name": "a.png"}]}, "media.0"),
        (
            {"media": [{"name": "ok.png", "data": base64.b64encode(png_bytes()).decode()}] * 2},
            "media.1.name",
        ),
        ({"media": [{"name": f"{i}.png", "data": "AAAA"} for i in range(11)]}, "media"),
        ({"workflow": {}}, "workflow"),
        ({"workflow": {"1": {"inputs": {}}}}, "workflow.1.class_type"),
        ({"webhook_url": "ftp://x"}, "webhook_url"),
        ({"workflow": image_workflow("not base64!")}, "workflow.107.inputs.image"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_leaves_nothing(
    shared_sidecar: Sidecar, change: dict[str, Any], location: str
) -> None:
    body: dict[str, Any] = {
        "workflow": image_workflow("ok.png"),
        "media": [{"name": "ok.png", "data": base64.b64encode(png_bytes()).decode()}],
        **change,
    }
    before = len(shared_sidecar.get("/jobs", params={"limit": 1000}).json()["jobs"])
    answer = shared_sidecar.post("/v1/jobs", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["location"] == location
    assert no_media_folders(shared_sidecar)
    assert len(shared_sidecar.get("/jobs", params={"limit": 1000}).json()["jobs"]) == before


@pytest.mark.parametrize(
    "name",
    ["a" * 247 + ".png", "é" * 124 + ".png"],  # 251 and 252 bytes of UTF-8
)
def test_a_media_name_too_long_to_write_is_a_400(shared_sidecar: Sidecar, name: str) -> None:
    """A name the atomic writer's `.part` would push past NAME_MAX (255) is refused at the
    field (it was a 500, `File name too long`)."""
    body = {
        "workflow": image_workflow(name),
        "media": [{"name": name, "data": base64.b64encode(png_bytes()).decode()}],
    }
    answer = shared_sidecar.post("/v1/jobs", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["location"] == "media.0.name"
    assert no_media_folders(shared_sidecar)


def test_a_media_name_of_250_bytes_runs(shared_sidecar: Sidecar) -> None:
    name = "é" * 123 + ".png"  # 250 bytes: with `.part`, NAME_MAX
    body = {
        "workflow": image_workflow(name),
        "media": [{"name": name, "data": base64.b64encode(png_bytes()).decode()}],
    }
    answer = shared_sidecar.post("/v1/jobs", json=body)
    assert answer.status_code == 200, answer.text
    assert poll(shared_sidecar, answer.json()["job_id"])[0]["status"] == "completed"


def test_a_media_item_over_50_mb_is_refused(shared_sidecar: Sidecar) -> None:
    too_big = "A" * ((50 * 1024 * 1024 // 3 + 2) * 4)
    body = {"workflow": image_workflow("a.png"), "media": [{"name": "a.png", "data": too_big}]}
    answer = shared_sidecar.post("/v1/jobs", json=body, timeout=60)
    assert answer.status_code == 400 and answer.json()["location"] == "media.0.data"
    assert no_media_folders(shared_sidecar)


def test_unknown_job_is_404(shared_sidecar: Sidecar) -> None:
    for answer in (
        shared_sidecar.get("/v1/jobs/nope"),
        httpx.delete(f"{shared_sidecar.url}/v1/jobs/nope", timeout=10),
    ):
        assert answer.status_code == 404 and answer.json()["location"] == "id"
