"""The ai-dock API wrapper adapter (``/generate``, ``/generate/sync``, ``/generate/stream``,
``/result/{id}``, ``/queue-info``) against the ComfyUI double (and a real ComfyUI when
COMFY_HOME is set), used the way its README's examples use it."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import Sidecar, basic_prompt, slow_prompt

RESULT_KEYS = {"id", "status", "message", "output"}


def stream_events(sidecar: Sidecar, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The README's "Streaming Request" client: each event's data as JSON, up to and including
    the one whose status is ``final_result``."""
    seen: list[dict[str, Any]] = []
    with httpx.stream(
        "POST", f"{sidecar.url}/generate/stream", json=payload, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                data = json.loads(line.removeprefix("data:").strip())
                seen.append(data)
                if data.get("status") == "final_result":
                    break
    return seen


def test_sync_request_answers_the_final_result(shared_sidecar: Sidecar) -> None:
    payload = {"input": {"workflow_json": basic_prompt(batch=2)}}
    response = httpx.post(
        f"{shared_sidecar.url}/generate/sync?timeout=300", json=payload, timeout=320
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) == RESULT_KEYS
    assert result["status"] == "completed" and result["message"]
    assert len(result["output"]) == 2
    for index, item in enumerate(result["output"]):
        assert (item["type"], item["node_id"], item["output_type"]) == ("output", "3", "images")
        assert item["url"] == f"/jobs/{result['id']}/outputs/{index}"
        fetched = shared_sidecar.get(item["url"])
        assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
    assert shared_sidecar.get(f"/result/{result['id']}").json() == result


def test_streaming_request_ends_with_final_result(shared_sidecar: Sidecar) -> None:
    request_id = str(uuid.uuid4())
    payload = {"input": {"request_id": request_id, "workflow_json": slow_prompt(2, 512)}}
    events = stream_events(shared_sidecar, payload)
    *progress, final = events
    assert final["status"] == "final_result" and final["request_id"] == request_id
    assert final["result"]["id"] == request_id and final["result"]["status"] == "completed"
    assert final["result"]["output"][0]["output_type"] == "images"
    assert progress, "no progress message before the final result"
    for data in progress:
        assert data["request_id"] == request_id
        assert data["status"] in ("queued", "generating", "completed")
        assert isinstance(data["message"], str) and data["elapsed_time"] >= 0
        assert set(data["queue_position"]) == {
            "current_queue",
            "position",
            "queue_size",
            "estimated_wait_time",
        }
        assert set(data["queue_info"]) == {
            "preprocess_queue_size",
            "generation_queue_size",
            "postprocess_queue_size",
        }
    elapsed = [d["elapsed_time"] for d in events]
    assert elapsed == sorted(elapsed)


def test_async_request_webhook_and_queue_info(shared_sidecar: Sidecar, receiver: Any) -> None:
    hook = receiver()
    payload = {
        "input": {
            "workflow_json": slow_prompt(2, 1024),
            "webhook": {"url": hook.url, "extra_params": {"custom_field": "value"}},
        }
    }
    accepted = shared_sidecar.post("/generate", json=payload)
    assert accepted.status_code == 202, accepted.text
    result = accepted.json()
    assert set(result) == RESULT_KEYS and result["status"] in ("queued", "generating")
    second = shared_sidecar.post("/generate", json={"input": {"workflow_json": basic_prompt(1)}})
    assert second.json()["status"] in ("queued", "generating")
    info = shared_sidecar.get("/queue-info").json()
    assert set(info) == {"preprocess_queue_size", "generation_queue_size", "postprocess_queue_size"}
    assert all(isinstance(size, int) and size >= 0 for size in info.values())
    [delivered] = hook.wait_for(1, timeout=300)
    body = delivered.json()
    assert (body["id"], body["status"], body["custom_field"]) == (
        result["id"],
        "completed",
        "value",
    )
    assert body["output"] and body["output"][0]["node_id"] == "4"
    deadline = time.monotonic() + 120
    while shared_sidecar.get(f"/result/{second.json()['id']}").json()["status"] != "completed":
        assert time.monotonic() < deadline, "the second job did not complete"
        time.sleep(0.05)
    assert shared_sidecar.get("/queue-info").json()["generation_queue_size"] == 0


def test_sync_timeout_answers_202_with_the_running_result(shared_sidecar: Sidecar) -> None:
    payload = {"input": {"workflow_json": slow_prompt(6)}}
    response = shared_sidecar.post("/generate/sync", params={"timeout": "0.2"}, json=payload)
    assert response.status_code == 202, response.text
    assert response.json()["status"] in ("queued", "generating")
    assert shared_sidecar.post(f"/jobs/{response.json()['id']}/cancel").status_code == 200


def test_same_request_id_is_the_same_job(shared_sidecar: Sidecar) -> None:
    payload = {"input": {"request_id": f"r-{uuid.uuid4().hex}", "workflow_json": basic_prompt(1)}}
    first = shared_sidecar.post("/generate", json=payload)
    again = shared_sidecar.post("/generate", json=payload)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = {"input": {**payload["input"], "workflow_json": basic_prompt(2)}}
    conflict = shared_sidecar.post("/generate", json=other)
    assert conflict.status_code == 409 and conflict.json()["location"] == "id"


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"input": {"modifier": "Image2Image", "modifications": {"a": 1}}}, "input.modifier"),
        ({"input": {}}, "input.workflow_json"),
        ({}, "input"),
        (
            {
                "input": {
                    "workflow_json": basic_prompt(1),
                    "s3": {"access_key_id": "k", "secret_access_key": "s", "bucket_name": "b"},
                }
            },
            "input.s3",
        ),
        (
            {"input": {"workflow_json": basic_prompt(1), "webhook": {"url": "nope"}}},
            "input.webhook.url",
        ),
        ({"input": {"workflow_json": {"1": {"inputs": {}}}}}, "input.workflow_json.1.class_type"),
        ({"input": {"workflow_json": basic_prompt(1), "request_id": "a b"}}, "input.request_id"),
    ],
)
@pytest.mark.parametrize("path", ["/generate", "/generate/sync", "/generate/stream"])
def test_bad_input_is_a_400_naming_the_field(
    shared_sidecar: Sidecar, path: str, body: dict[str, Any], location: str
) -> None:
    answer = shared_sidecar.post(path, json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["location"] == location


def test_unknown_result_is_404(shared_sidecar: Sidecar) -> None:
    answer = shared_sidecar.get("/result/nope")
    assert answer.status_code == 404 and answer.json()["location"] == "id"
