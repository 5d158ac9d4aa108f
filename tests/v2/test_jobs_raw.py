"""Every caller mistake on the Comfy API v2 job routes, sent raw with httpx: a 4xx in the v2
envelope ``{"error": {code, message, details}}`` with the code comfy-sdk maps, ``details``
naming the field, never a 5xx. Against the ComfyUI double."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from comfy_sdk import exceptions as sdk_errors

from tests.conftest import Backend, Sidecar, running_sidecar, slow_prompt
from tests.v2.support import envelope, quickstart, sdk, sse
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    with running_sidecar("double", tmp_path_factory.mktemp("v2raw")) as running:
        yield running


def post_job(sidecar: Sidecar, body: Any = None, **kw: Any) -> httpx.Response:
    if body is not None:
        kw["json"] = body
    return sidecar.post("/api/v2/jobs", **kw)


ui_graph = {"nodes": [{"id": 1, "type": "SaveImage"}], "links": [], "last_node_id": 1}
no_class = {"1": {"inputs": {}}}
no_output = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}
missing_file = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "no-such-file.png"}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
}
malformed_asset = {
    "1": {"class_type": "LoadImage", "inputs": {"image": {"__type": "core/ASSET", "info": {}}}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
}
unknown_asset = {
    "1": {
        "class_type": "LoadImage",
        "inputs": {"image": {"__type": "core/ASSET", "info": {"id": "00000000-0000"}}},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
}

SUBMISSIONS: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("no workflow", {}, "invalid_request", "workflow"),
    ("unknown field", {"workflow": quickstart(), "webhook_url": "x"}, "invalid_request", None),
    ("a list", {"workflow": []}, "invalid_workflow", "workflow"),
    ("empty", {"workflow": {}}, "invalid_workflow", "workflow"),
    ("ui format", {"workflow": ui_graph}, "workflow_format_ui", "workflow"),
    ("no class_type", {"workflow": no_class}, "invalid_workflow", "workflow.1.class_type"),
    ("no output node", {"workflow": no_output}, "invalid_workflow", "workflow"),
    ("missing file", {"workflow": missing_file}, "invalid_workflow", "workflow.1.inputs.image"),
    ("malformed asset", {"workflow": malformed_asset}, "missing_asset", "workflow.1.inputs.image"),
    ("unknown asset", {"workflow": unknown_asset}, "missing_asset", "workflow.1.inputs.image"),
    (
        "labels a list",
        {"workflow": quickstart(), "metadata": ["a"]},
        "metadata_invalid",
        "metadata",
    ),
    (
        "17 labels",
        {"workflow": quickstart(), "metadata": {str(i): "v" for i in range(17)}},
        "metadata_invalid",
        "metadata",
    ),
    (
        "label not text",
        {"workflow": quickstart(), "metadata": {"n": 1}},
        "metadata_invalid",
        "metadata.n",
    ),
    (
        "empty label key",
        {"workflow": quickstart(), "metadata": {"": "v"}},
        "metadata_invalid",
        "metadata.",
    ),
    (
        "long label",
        {"workflow": quickstart(), "metadata": {"k": "v" * 513}},
        "metadata_invalid",
        "metadata.k",
    ),
    (
        "extra_data key",
        {"workflow": quickstart(), "extra_data": {"other": "x"}},
        "invalid_request",
        "extra_data.other",
    ),
    (
        "empty partner key",
        {"workflow": quickstart(), "extra_data": {"api_key_comfy_org": ""}},
        "invalid_request",
        "extra_data.api_key_comfy_org",
    ),
]


@pytest.mark.parametrize(
    ("body", "code", "location"),
    [case[1:] for case in SUBMISSIONS],
    ids=[case[0] for case in SUBMISSIONS],
)
def test_a_bad_submission_is_a_4xx_envelope(
    sidecar: Sidecar, body: dict[str, Any], code: str, location: str | None
) -> None:
    before = sidecar.get("/api/v2/jobs", params={"limit": 100}).json()["jobs"]
    error = envelope(post_job(sidecar, body), 422, code)
    if location is not None:
        assert error["details"]["location"] == location, error
    after = sidecar.get("/api/v2/jobs", params={"limit": 100}).json()["jobs"]
    assert after == before, "a refused submission makes no job"


def test_a_body_that_is_not_json_is_a_4xx_envelope(sidecar: Sidecar) -> None:
    # 422 like every other caller's mistake under /api/v2 (comfy_v2/errors.py _http_error)
    response = post_job(sidecar, content=b"{not json", headers={"content-type": "application/json"})
    error = envelope(response, 422, "invalid_request")
    assert error["details"] == {"location": "body"}


def test_the_idempotency_key_header(sidecar: Sidecar) -> None:
    for bad in ("", "k" * 256):
        error = envelope(
            post_job(sidecar, {"workflow": quickstart()}, headers={"idempotency-key": bad}),
            422,
            "invalid_request",
        )
        assert error["details"]["location"] == "Idempotency-Key"
    key = str(uuid.uuid4())
    first = post_job(sidecar, {"workflow": quickstart()}, headers={"idempotency-key": key})
    assert first.status_code == 201, first.text
    error = envelope(
        post_job(sidecar, {"workflow": quickstart()}, headers={"idempotency-key": key}),
        422,
        "idempotency_key_reuse",
    )
    assert first.json()["id"] in error["message"]


LISTINGS: list[tuple[str, dict[str, Any], str, str]] = [
    ("limit 0", {"limit": "0"}, "invalid_request", "limit"),
    ("limit 101", {"limit": "101"}, "invalid_request", "limit"),
    ("limit text", {"limit": "many"}, "invalid_request", "limit"),
    ("cursor text", {"cursor": "abc"}, "invalid_cursor", "cursor"),
    ("cursor long", {"cursor": "9" * 19}, "invalid_cursor", "cursor"),
    ("bare metadata", {"metadata": "x"}, "invalid_metadata_filter", "metadata"),
    ("empty key", {"metadata[]": "x"}, "invalid_metadata_filter", "metadata[]"),
    (
        "17 filters",
        {f"metadata[{i}]": "v" for i in range(17)},
        "invalid_metadata_filter",
        "metadata",
    ),
]


@pytest.mark.parametrize(
    ("params", "code", "location"),
    [case[1:] for case in LISTINGS],
    ids=[case[0] for case in LISTINGS],
)
def test_a_bad_listing_is_a_4xx_envelope(
    sidecar: Sidecar, params: dict[str, Any], code: str, location: str
) -> None:
    error = envelope(sidecar.get("/api/v2/jobs", params=params), 422, code)
    assert error["details"]["location"] == location, error


def test_a_label_filtered_twice_is_refused(sidecar: Sidecar) -> None:
    response = sidecar.get("/api/v2/jobs?metadata[a]=1&metadata[a]=2")
    assert (
        envelope(response, 422, "invalid_metadata_filter")["details"]["location"] == "metadata[a]"
    )


@pytest.mark.parametrize("suffix", ["", "/workflow", "/events"])
def test_an_unknown_job_is_404(sidecar: Sidecar, suffix: str) -> None:
    envelope(sidecar.get(f"/api/v2/jobs/{uuid.uuid4()}{suffix}"), 404, "not_found")


def test_cancelling_an_unknown_job_is_404(sidecar: Sidecar) -> None:
    envelope(sidecar.post(f"/api/v2/jobs/{uuid.uuid4()}/cancel"), 404, "not_found")


def test_a_job_of_another_api_is_not_a_v2_job(sidecar: Sidecar) -> None:
    native = sidecar.post("/jobs", json={"prompt": quickstart(size=8)}).json()["id"]
    for suffix in ("", "/workflow", "/events"):
        envelope(sidecar.get(f"/api/v2/jobs/{native}{suffix}"), 404, "not_found")
    envelope(sidecar.post(f"/api/v2/jobs/{native}/cancel"), 404, "not_found")
    envelope(sidecar.get(f"/api/v2/assets/{native}.99/content"), 404, "not_found")


def test_a_last_event_id_too_long_is_refused(sidecar: Sidecar) -> None:
    job = post_job(sidecar, {"workflow": quickstart(size=8)}).json()["id"]
    response = sidecar.get(f"/api/v2/jobs/{job}/events", headers={"last-event-id": "9" * 19})
    envelope(response, 422, "invalid_request")


def test_a_wrong_method_is_405(sidecar: Sidecar) -> None:
    envelope(sidecar.client.delete(f"{sidecar.url}/api/v2/jobs"), 405, "method_not_allowed")


def test_a_forged_content_url_is_403(sidecar: Sidecar) -> None:
    job = post_job(sidecar, {"workflow": quickstart(size=8)}).json()["id"]
    wait_for(
        lambda: sidecar.get(f"/api/v2/jobs/{job}").json()["status"] == "succeeded",
        timeout=30,
        what="the job to succeed",
    )
    url = sidecar.get(f"/api/v2/jobs/{job}").json()["outputs"][0]["url"]
    assert httpx.get(url).status_code == 200
    envelope(httpx.get(url.replace("sig=", "sig=x")), 403, "forbidden")


def test_keys_apply_to_v2_jobs(spawn: Callable[..., Sidecar], tmp_path: Path) -> None:
    sidecar = spawn(Backend("double", tmp_path / "comfy"), API_KEYS="right-key")
    sidecar.wait_ready()
    envelope(post_job(sidecar, {"workflow": quickstart()}), 401, "unauthorized")
    wrong = {"authorization": "Bearer wrong"}
    envelope(sidecar.get("/api/v2/jobs", headers=wrong), 401, "unauthorized")
    assert sidecar.get("/api/v2/health").status_code == 200
    with sdk(sidecar, api_key="wrong") as client, pytest.raises(sdk_errors.Unauthorized):
        client.submit(client.workflows.from_json(quickstart()))
    with sdk(sidecar, api_key="right-key") as client:
        job = client.run(client.workflows.from_json(quickstart()), timeout=60)
        assert job.outputs[0].to_bytes()[:4] == b"\x89PNG"


def test_a_full_queue_is_429_with_retry_after(
    spawn: Callable[..., Sidecar], tmp_path: Path
) -> None:
    sidecar = spawn(Backend("double", tmp_path / "comfy"), MAX_QUEUE_DEPTH="1")
    sidecar.wait_ready()
    slow = post_job(sidecar, {"workflow": slow_prompt(blurs=4, size=2048)})
    assert slow.status_code == 201, slow.text
    wait_for(
        lambda: sidecar.get(f"/api/v2/jobs/{slow.json()['id']}").json()["status"] == "running",
        timeout=30,
        what="the slow job to run",
    )
    response = post_job(sidecar, {"workflow": quickstart()})
    envelope(response, 429, "queue_full")
    assert int(response.headers["retry-after"]) >= 1
    # client.submit would retry a 429 for 60 s: the SDK's own mapping of one answer instead.
    with (
        sdk(sidecar) as client,
        pytest.raises(sdk_errors.QueueFull) as full,
        sdk_errors.translating(),
    ):
        client._low.post_jobs(quickstart())
    assert full.value.retry_after >= 1
    sidecar.post(f"/api/v2/jobs/{slow.json()['id']}/cancel")


def test_the_docs_show_the_v2_job_routes_with_their_schemas(sidecar: Sidecar) -> None:
    document = sidecar.get("/openapi.json").json()
    paths = document["paths"]
    assert set(paths["/api/v2/jobs"]) == {"get", "post"}
    for path in ("/api/v2/jobs/{job_id}", "/api/v2/jobs/{job_id}/workflow"):
        assert "get" in paths[path]
    assert "post" in paths["/api/v2/jobs/{job_id}/cancel"]
    assert "get" in paths["/api/v2/jobs/{job_id}/events"]
    submit = paths["/api/v2/jobs"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.endswith("/JobRequest")
    assert submit["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Job"
    )
    schemas = document["components"]["schemas"]
    assert {"status", "progress", "outputs", "error", "urls", "expires_at"} <= set(
        schemas["Job"]["properties"]
    )
    assert set(schemas["ErrorEnvelope"]["properties"]) == {"error"}
    assert sidecar.get("/docs").status_code == 200


def test_previews_only_when_asked_and_throttled(sidecar: Sidecar) -> None:
    from tests.tiny_model import NAME as TINY_MODEL_NAME

    def upscales() -> dict[str, Any]:
        graph: dict[str, Any] = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 1},
            },
            "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": TINY_MODEL_NAME}},
        }
        source = "1"
        for node in ("3", "4", "5"):  # three previews, ~20 ms apart
            graph[node] = {
                "class_type": "ImageUpscaleWithModel",
                "inputs": {"upscale_model": ["2", 0], "image": [source, 0]},
            }
            source = node
        graph["6"] = {
            "class_type": "SaveImage",
            "inputs": {"images": [source, 0], "filename_prefix": "p"},
        }
        return graph

    seen: dict[bool, list[dict[str, Any]]] = {}
    for previews in (True, False):
        ahead = post_job(sidecar, {"workflow": slow_prompt(blurs=2, size=1024)}).json()["id"]
        job = post_job(sidecar, {"workflow": upscales()}).json()["id"]
        url = f"{sidecar.url}/api/v2/jobs/{job}/events"
        events = sse(sidecar.client, url, previews="true") if previews else sse(sidecar.client, url)
        assert sidecar.get(f"/api/v2/jobs/{ahead}").json()["status"] == "succeeded"
        assert events[-1]["data"]["status"] == "succeeded"
        seen[previews] = [e["data"] for e in events if e["event"] == "preview"]
    assert seen[False] == []
    assert 1 <= len(seen[True]) < 3, seen[True]  # three sent within 0.5 s: throttled
    preview = seen[True][0]
    assert preview["node_id"] in ("3", "4", "5") and preview["content_type"] == "image/png"
    assert base64.b64decode(preview["data_base64"]).startswith(b"\x89PNG")
