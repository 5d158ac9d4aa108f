"""Results delivered by the running sidecar: webhooks (v1, v2, failures, signatures), system
events, Salad deletion cost, convert_output, and the workflow endpoints."""

from __future__ import annotations

import base64
import io
import itertools
import json
import signal
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from tests.conftest import (
    BACKENDS,
    ROOT,
    Backend,
    Sidecar,
    basic_prompt,
    png_bytes,
    running_sidecar,
    upscale_prompt,
)
from tests.receiver import Receiver

SECRET = base64.b64encode(b"a test secret of 24 bytes").decode()


def verify(request: Any) -> dict[str, Any]:
    """Check a Standard Webhooks signature; returns the JSON body."""
    payload: dict[str, Any] = Webhook(SECRET).verify(request.body, request.headers)
    return payload


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One system-event receiver for the module's sidecars."""
    receiver = Receiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def sidecar(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, events: Receiver
) -> Iterator[Sidecar]:
    with running_sidecar(
        request.param,
        tmp_path_factory.mktemp(f"delivery-{request.param}"),
        WEBHOOK_SECRET=SECRET,
        WORKFLOW_DIR=str(ROOT / "workflows"),
        SYSTEM_WEBHOOK_URL=events.url + "/system",
        SYSTEM_WEBHOOK_EVENTS="all",
        SYSTEM_META_batch="b-42",
        PROMPT_WEBHOOK_RETRIES="2",
        CONVERT_MAX_PIXELS="1000000",
    ) as sc:
        yield sc


def test_webhook_v2_signed_with_base64_images(sidecar: Sidecar, receiver: Any) -> None:
    hook: Receiver = receiver()
    response = sidecar.post(
        "/prompt",
        json={
            "prompt": basic_prompt(batch=2, size=32),
            "id": "v2-ok",
            "webhook_v2": hook.url + "/hook",
        },
    )
    assert response.status_code == 202
    assert response.json()["status"] == "ok" and response.json()["id"] == "v2-ok"
    (request,) = hook.wait_for(1, timeout=60)
    body = verify(request)
    assert request.headers["webhook-id"] == "v2-ok"
    assert body["type"] == "prompt.complete" and body["id"] == "v2-ok"
    assert body["filenames"] == ["v2-ok_rec_00001_.png", "v2-ok_rec_00002_.png"]
    assert [decode(i).size for i in body["images"]] == [(32, 32), (32, 32)]
    assert "stats" in body and "timestamp" in body
    assert "credentials" not in body


def test_webhook_v2_failure_is_structured(sidecar: Sidecar, receiver: Any) -> None:
    hook: Receiver = receiver()
    (sidecar.backend.input_dir / "broken2.png").write_bytes(b"garbage")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "broken2.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b"}},
    }
    response = sidecar.post(
        "/prompt", json={"prompt": prompt, "id": "v2-fail", "webhook_v2": hook.url}
    )
    assert response.status_code == 202
    body = verify(hook.wait_for(1, timeout=60)[0])
    assert body["type"] == "prompt.failed" and body["id"] == "v2-fail"
    assert body["error"]["node_id"] == "1"
    assert body["error"]["node_type"] == "LoadImage"
    assert body["error"]["exception_type"] == "PIL.UnidentifiedImageError"


def test_failure_webhooks_name_no_server_path(sidecar: Sidecar, receiver: Any) -> None:
    """v1 and v2 failure webhooks of ComfyUI's execution error name the input relative to
    INPUT_DIR, never a server directory."""
    (sidecar.backend.input_dir / "garbage3.png").write_bytes(b"garbage")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "garbage3.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b"}},
    }
    for field in ("webhook_v2", "webhook"):
        hook: Receiver = receiver()
        answer = sidecar.post("/prompt", json={"prompt": prompt, field: hook.url})
        assert answer.status_code == 202, answer.text
        (request,) = hook.wait_for(1, timeout=60)
        body = verify(request)
        error = body["error"]
        message = error["exception_message"] if field == "webhook_v2" else error
        assert "cannot identify image file '<INPUT_DIR>/garbage3.png'" in message
        sidecar.assert_names_no_server_dir(request.body.decode())


def test_webhook_v1_one_post_per_output(sidecar: Sidecar, receiver: Any) -> None:
    hook: Receiver = receiver()
    response = sidecar.post(
        "/prompt", json={"prompt": basic_prompt(batch=3, size=16), "id": "v1", "webhook": hook.url}
    )
    assert response.status_code == 202
    requests = hook.wait_for(3, timeout=60)
    bodies = [verify(r) for r in requests]
    assert [b["event"] for b in bodies] == ["output.complete"] * 3
    assert sorted(b["filename"] for b in bodies) == [f"v1_rec_0000{i}_.png" for i in (1, 2, 3)]
    assert all(decode(b["image"]).size == (16, 16) for b in bodies)


def test_webhook_v1_of_a_non_ascii_output_name(sidecar: Sidecar, receiver: Any) -> None:
    """A v1 webhook's `webhook-id` names its output file: percent-encoded, so a name beyond
    ASCII still fits in the header (it was never sent)."""
    hook: Receiver = receiver()
    answer = sidecar.post(
        "/prompt",
        json={
            "prompt": basic_prompt(batch=1, size=8, prefix="ü✓ x"),
            "id": "v1-utf8",
            "webhook": hook.url,
        },
    )
    assert answer.status_code == 202, answer.text
    (request,) = hook.wait_for(1, timeout=30)
    body = verify(request)
    assert body["filename"] == "v1-utf8_ü✓ x_00001_.png"
    assert request.headers["webhook-id"] == "v1-utf8:" + urllib.parse.quote(body["filename"])


def test_bad_input_with_webhook_is_still_400(sidecar: Sidecar, receiver: Any) -> None:
    hook: Receiver = receiver()
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "no-such-file.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b"}},
    }
    response = sidecar.post("/prompt", json={"prompt": prompt, "webhook_v2": hook.url})
    assert response.status_code == 400
    assert response.json()["location"] == "prompt.1.inputs.image"


def test_system_events_carry_the_api_id(sidecar: Sidecar, events: Receiver) -> None:
    response = sidecar.post("/prompt", json={"prompt": upscale_prompt(64), "id": "sys-ev"})
    assert response.status_code == 200

    def mine(kind: str, requests: list[Any] | None = None) -> list[dict[str, Any]]:
        out = []
        for request in events.snapshot() if requests is None else requests:
            body = verify(request)
            data = body["data"].get("data") or {}
            if body["event"] == kind and data.get("prompt_id") == "sys-ev":
                out.append(body)
        return out

    events.wait_until(lambda seen: bool(mine("comfy.execution_success", seen)), timeout=30)
    assert len(mine("comfy.executed")) == 1
    assert len(mine("comfy.execution_success")) == 1
    assert mine("comfy.progress"), "the upscale node reports progress"
    states = mine("comfy.progress_state")
    assert states and all(
        n["prompt_id"] == "sys-ev" for s in states for n in s["data"]["data"]["nodes"].values()
    )
    assert mine("comfy.executed")[0]["metadata"] == {"batch": "b-42"}


@pytest.mark.parametrize(
    ("convert", "fmt", "ext"),
    [
        ({"format": "jpeg", "options": {"quality": 90, "progressive": True}}, "JPEG", "jpeg"),
        ({"format": "jpg"}, "JPEG", "jpg"),
        ({"format": "webp", "options": {"lossless": True}}, "WEBP", "webp"),
    ],
)
def test_convert_output(sidecar: Sidecar, convert: dict[str, Any], fmt: str, ext: str) -> None:
    response = sidecar.post(
        "/prompt",
        json={
            "prompt": basic_prompt(batch=1, size=40),
            "id": f"conv-{ext}",
            "convert_output": convert,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filenames"] == [f"conv-{ext}_rec_00001_.{ext}"]
    image = decode(body["images"][0])
    assert image.format == fmt and image.size == (40, 40)
    if convert.get("options", {}).get("progressive"):
        assert image.info.get("progressive") or image.info.get("progression")
    assert body["convert_output"]["format"] == convert["format"]


def test_convert_output_leaves_animations_alone(sidecar: Sidecar) -> None:
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 24, "height": 24, "batch_size": 2, "color": 255},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "still"},
        },
        "3": {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {
                "images": ["1", 0],
                "filename_prefix": "anim",
                "fps": 6.0,
                "lossless": False,
                "quality": 80,
                "method": "default",
            },
        },
    }
    response = sidecar.post(
        "/prompt", json={"prompt": prompt, "id": "mixed", "convert_output": {"format": "jpeg"}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["filenames"] == [
        "mixed_still_00001_.jpeg",
        "mixed_still_00002_.jpeg",
        "mixed_anim_00001_.webp",
    ]


def test_convert_output_over_the_pixel_cap_is_400(sidecar: Sidecar, receiver: Any) -> None:
    """An output with more pixels than CONVERT_MAX_PIXELS (1,000,000 here) is not decoded: the
    job fails 400 naming ``convert_output`` (the same request would fail again), its outputs
    are removed (the one converted before it too), and an asynchronous job's webhook carries
    the same error."""
    prompt = {
        **{k: v for k, v in basic_prompt(batch=1, size=32, prefix="small").items() if k != "2"},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "s"}},
        "4": {
            "class_type": "EmptyImage",
            "inputs": {"width": 1024, "height": 1024, "batch_size": 1, "color": 7},
        },
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "huge"}},
    }
    body = {"prompt": prompt, "id": "too-big", "convert_output": {"format": "webp"}}
    response = sidecar.post("/prompt", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["location"] == "convert_output" and error["id"] == "too-big"
    assert "too-big_huge_00001_.png is 1024x1024 = 1048576 pixels" in error["error"]
    assert "CONVERT_MAX_PIXELS (1000000)" in error["error"]
    assert not list(sidecar.backend.output_dir.glob("too-big_*"))
    assert sidecar.get("/jobs/too-big").json()["status"] == "failed"

    hook: Receiver = receiver()
    accepted = sidecar.post("/prompt", json={**body, "id": "too-big-async", "webhook_v2": hook.url})
    assert accepted.status_code == 202, accepted.text
    (request,) = hook.wait_for(1, timeout=60)
    failed = verify(request)
    assert failed["type"] == "prompt.failed"
    assert failed["error"]["location"] == "convert_output"
    assert "1024x1024" in failed["error"]["error"]


def test_invalid_convert_options_are_400(sidecar: Sidecar) -> None:
    response = sidecar.post(
        "/prompt",
        json={
            "prompt": basic_prompt(),
            "convert_output": {"format": "webp", "options": {"effort": 9}},
        },
    )
    assert response.status_code == 400
    assert response.json()["location"] == "convert_output.options.effort"


def test_workflow_endpoint_runs_in_process(sidecar: Sidecar) -> None:
    image = base64.b64encode(png_bytes((20, 10))).decode()
    response = sidecar.post(
        "/workflow/upscale",
        json={"input": {"image": image, "model": "tiny-compact-x2.safetensors"}, "id": "wf-up"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert decode(body["images"][0]).size == (40, 20)
    assert body["input"]["model"] == "tiny-compact-x2.safetensors"
    assert body["id"] == "wf-up"


def test_workflow_bad_input_names_the_field(sidecar: Sidecar) -> None:
    response = sidecar.post("/workflow/upscale", json={"input": {"image": ""}})
    assert response.status_code == 400
    assert response.json()["location"] == "input.image"


def test_workflow_routes_are_mounted(sidecar: Sidecar) -> None:
    for route in ("/workflow/sd1.5/txt2img", "/workflow/sdxl/img2img", "/workflow/flux/txt2img"):
        response = sidecar.post(route, json={"input": {}})
        assert response.status_code == 400, (route, response.text)


@pytest.mark.sidecar_process
def test_salad_deletion_cost(spawn: Any, tmp_path: Path, receiver: Any) -> None:
    imds: Receiver = receiver()
    sidecar: Sidecar = spawn(
        Backend("double", tmp_path / "comfy"), SALAD_MACHINE_ID="m-1", SALAD_IMDS_URL=imds.url
    )
    sidecar.wait_ready()
    from tests.conftest import slow_prompt

    assert sidecar.post("/prompt", json={"prompt": slow_prompt(1)}).status_code == 200
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.wait_exit(30) == 0
    puts = [r for r in imds.snapshot() if r.path == "/v1/deletion-cost"]
    costs = [json.loads(r.body)["deletion_cost"] for r in puts]
    assert all(r.method == "PUT" and r.headers["metadata"] == "true" for r in puts)
    assert 1 in costs and costs[-1] == 0
    assert all(a != b for a, b in itertools.pairwise(costs)), costs


def decode(b64: str) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_events_metadata_timing(sidecar: Sidecar) -> None:
    """The probes stay answerable while webhooks are being delivered."""
    started = time.monotonic()
    assert sidecar.get("/health").status_code == 200
    assert time.monotonic() - started < 5
