"""The simple Modal API adapter (``/submit_workflow``, ``/status``) against the ComfyUI double
(and a real ComfyUI when COMFY_HOME is set), used the way its README's examples use it."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.conftest import Sidecar, basic_prompt, decode_image, slow_prompt


def poll_status(sidecar: Sidecar, call_id: str, timeout: float = 120) -> httpx.Response:
    """``curl -X GET "https://your-modal-app-url/status?call_id=..."`` until it is not 202."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = httpx.get(f"{sidecar.url}/status", params={"call_id": call_id}, timeout=10)
        if answer.status_code != 202:
            return answer
        assert answer.json() == {"id": call_id, "call_id": call_id, "status": "RUNNING"}
        time.sleep(0.05)
    raise AssertionError(f"{call_id} still RUNNING after {timeout} s")


def test_submit_then_poll_until_completed(shared_sidecar: Sidecar) -> None:
    # curl -X POST ".../submit_workflow" -H "Content-Type: application/json" -d '{"workflow": …}'
    submitted = httpx.post(
        f"{shared_sidecar.url}/submit_workflow",
        headers={"Content-Type": "application/json"},
        json={"workflow": basic_prompt(batch=2, size=32)},
        timeout=30,
    )
    assert submitted.status_code == 202, submitted.text
    body = submitted.json()
    assert body["status"] == "RUNNING" and body["id"] == body["call_id"]
    done = poll_status(shared_sidecar, body["id"])
    assert done.status_code == 200
    result = done.json()
    assert (result["id"], result["status"]) == (body["id"], "COMPLETED")
    images = result["output"]["images"]
    assert len(images) == 2
    for image in images:
        assert image["type"] == "base64" and image["filename"].endswith(".png")
        assert decode_image(image["data"]).size == (32, 32)


def test_a_running_job_is_202_and_a_failed_one_200_failed(shared_sidecar: Sidecar) -> None:
    call_id = shared_sidecar.post("/submit_workflow", json={"workflow": slow_prompt(8)}).json()[
        "id"
    ]
    running = shared_sidecar.get("/status", params={"call_id": call_id})
    assert running.status_code == 202 and running.json()["status"] == "RUNNING"
    assert shared_sidecar.post(f"/jobs/{call_id}/cancel").json()["cancelled"] is True
    failed = poll_status(shared_sidecar, call_id)
    assert failed.status_code == 200
    assert failed.json() == {"id": call_id, "status": "FAILED", "error": "Cancelled by user"}


def test_bad_input_answers_the_readmes_statuses(shared_sidecar: Sidecar) -> None:
    cases: list[tuple[httpx.Response, int, str]] = [
        (shared_sidecar.get("/status", params={"call_id": "bad id!"}), 400, "call_id"),
        (shared_sidecar.get("/status"), 400, "call_id"),
        (shared_sidecar.get("/status", params={"call_id": "unknown"}), 404, "call_id"),
        (shared_sidecar.post("/submit_workflow", json={"workflow": {}}), 400, "workflow"),
        (shared_sidecar.post("/submit_workflow", json={"workflow": []}), 400, "workflow"),
        (shared_sidecar.post("/submit_workflow", json={}), 400, "workflow"),
    ]
    for answer, status, location in cases:
        assert answer.status_code == status, answer.text
        assert answer.json()["location"] == location
    bad_format = cases[0][0].json()
    assert bad_format["error"] == bad_format["detail"] == "Invalid call_id format"
    assert cases[2][0].json()["detail"].startswith("Call ID not found or invalid")
    assert cases[3][0].json()["detail"] == (
        "Invalid workflow format: must be a non-empty JSON object"
    )


def test_a_workflow_comfyui_refuses_is_a_400_and_leaves_no_job(shared_sidecar: Sidecar) -> None:
    workflow: dict[str, Any] = basic_prompt(1)
    workflow["9"] = {"class_type": "LoadImage", "inputs": {"image": "not base64!"}}
    before = len(shared_sidecar.get("/jobs", params={"limit": 1000}).json()["jobs"])
    answer = shared_sidecar.post("/submit_workflow", json={"workflow": workflow})
    assert answer.status_code == 400 and answer.json()["location"] == "workflow.9.inputs.image"
    assert len(shared_sidecar.get("/jobs", params={"limit": 1000}).json()["jobs"]) == before
