"""POST /prompt and /interrupt end to end, against the ComfyUI double and (with COMFY_HOME) a real
ComfyUI: the scenarios of tests/transcripts seen through the sidecar."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Sidecar,
    basic_prompt,
    decode_image,
    png_bytes,
    slow_prompt,
    upscale_prompt,
)
from tests.storage.slow_server import SlowServer
from tests.waiting import wait_for


def close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 2) -> bool:
    """Colours equal within ComfyUI's float round trip (it stores images as float32)."""
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def files_in(path: Any) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def test_success_two_outputs(shared_sidecar: Sidecar) -> None:
    response = shared_sidecar.post(
        "/prompt", json={"prompt": basic_prompt(batch=2, size=64), "id": "two-outputs"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "two-outputs"
    assert len(body["images"]) == 2
    assert body["filenames"] == ["two-outputs_rec_00001_.png", "two-outputs_rec_00002_.png"]
    for image_b64 in body["images"]:
        image = decode_image(image_b64)
        assert image.format == "PNG" and image.size == (64, 64)
        # EmptyImage color 10866024 = 0xA5CD68 = (165, 205, 104), inverted by ImageInvert.
        assert close(image.convert("RGB").getpixel((5, 5)), (255 - 165, 255 - 205, 255 - 104))
    assert body["prompt"]["3"]["inputs"]["filename_prefix"] == "two-outputs_rec"
    stats = body["stats"]
    for key in ("preprocess_time", "comfy_round_trip_time", "postprocess_time", "total_time"):
        assert isinstance(stats[key], int) and stats[key] >= 0
    execution = stats["comfy_execution"]
    assert execution["end"] >= execution["start"]
    assert set(execution["nodes"]) == {"1", "2", "3"}
    # Outputs are removed once delivered.
    assert files_in(shared_sidecar.backend.output_dir) == []


def test_upscale_model_prompt_returns_512(shared_sidecar: Sidecar) -> None:
    response = shared_sidecar.post("/prompt", json={"prompt": upscale_prompt(256)})
    assert response.status_code == 200, response.text
    image = decode_image(response.json()["images"][0])
    assert image.size == (512, 512)


def test_multi_output_types(shared_sidecar: Sidecar) -> None:
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 3, "color": 13248078},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "sub/multi"},
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "4": {
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
        "5": {
            "class_type": "SaveAnimatedPNG",
            "inputs": {
                "images": ["1", 0],
                "filename_prefix": "apng",
                "fps": 6.0,
                "compress_level": 4,
            },
        },
    }
    response = shared_sidecar.post("/prompt", json={"prompt": prompt, "id": "multi"})
    assert response.status_code == 200, response.text
    body = response.json()
    # node 2: three PNGs in a subfolder; node 3 (temp) left out; 4 and 5 one animated file each
    assert body["filenames"] == [
        "multi_multi_00001_.png",
        "multi_multi_00002_.png",
        "multi_multi_00003_.png",
        "multi_anim_00001_.webp",
        "multi_apng_00001_.png",
    ]
    webp = decode_image(body["images"][3])
    assert webp.format == "WEBP"
    assert body["prompt"]["2"]["inputs"]["filename_prefix"] == "sub/multi_multi"
    assert files_in(shared_sidecar.backend.output_dir) == []


@pytest.mark.parametrize(
    ("name", "prompt", "location", "fragment"),
    [
        (
            "bad_value",
            {
                **basic_prompt(),
                "1": {
                    "class_type": "EmptyImage",
                    "inputs": {"width": "wide", "height": 64, "batch_size": 1, "color": 1},
                },
            },
            "prompt.1.inputs.width",
            "Failed to convert an input value to a INT value",
        ),
        (
            "missing_link",
            {
                **basic_prompt(),
                "3": {
                    "class_type": "SaveImage",
                    "inputs": {"images": ["9", 0], "filename_prefix": "rec"},
                },
            },
            "prompt.3",
            "Prompt outputs failed validation",
        ),
    ],
)
def test_comfyui_validation_errors_are_400(
    shared_sidecar: Sidecar, name: str, prompt: dict[str, Any], location: str, fragment: str
) -> None:
    response = shared_sidecar.post("/prompt", json={"prompt": prompt})
    assert response.status_code == 400, response.text
    body = response.json()
    assert fragment in body["error"]
    assert body["location"] == location
    assert body["comfyui_error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]


def test_unknown_node_is_400(shared_sidecar: Sidecar) -> None:
    prompt = {
        "1": {"class_type": "NoSuchNode", "inputs": {}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    response = shared_sidecar.post("/prompt", json={"prompt": prompt})
    assert response.status_code == 400, response.text
    assert "NoSuchNode does not exist" in response.json()["error"]
    assert response.json()["comfyui_error"]["type"] == "invalid_prompt"


def test_no_output_node_is_400(shared_sidecar: Sidecar) -> None:
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        }
    }
    response = shared_sidecar.post("/prompt", json={"prompt": prompt})
    assert response.status_code == 400
    assert response.json()["location"] == "prompt"
    assert "output node" in response.json()["error"]


def test_execution_error_is_500_with_details(shared_sidecar: Sidecar) -> None:
    (shared_sidecar.backend.input_dir / "broken.png").write_bytes(b"not an image at all")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "broken.png"}},
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "broken"},
        },
    }
    response = shared_sidecar.post("/prompt", json={"prompt": prompt, "id": "exec-error"})
    assert response.status_code == 500, response.text
    body = response.json()
    assert body["id"] == "exec-error"
    assert body["node_id"] == "1"
    assert body["node_type"] == "LoadImage"
    assert body["exception_type"] == "PIL.UnidentifiedImageError"
    assert "cannot identify image file" in body["exception_message"]
    assert isinstance(body["comfyui_log_tail"], list) and body["comfyui_log_tail"]
    # The caller's plain file name was passed through untouched and is still there.
    assert (shared_sidecar.backend.input_dir / "broken.png").exists()


def test_execution_error_names_no_server_path(shared_sidecar: Sidecar) -> None:
    """ComfyUI's execution error for a garbage image names the input by its absolute path and
    its own files in the traceback and log: the 500 and the job's record name them relative to
    the setting (``<INPUT_DIR>/x.png``, ``<COMFY_HOME>/execution.py``); the log keeps them."""
    input_dir = shared_sidecar.backend.input_dir
    (input_dir / "garbage.png").write_bytes(b"\x89PNG garbage")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "garbage.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "g"}},
    }
    response = shared_sidecar.post("/prompt", json={"prompt": prompt, "id": "no-paths"})
    assert response.status_code == 500, response.text
    body = response.json()
    assert body["exception_message"] == "cannot identify image file '<INPUT_DIR>/garbage.png'"
    assert "'<INPUT_DIR>/garbage.png'" in body["error"]
    assert any(f.startswith('  File "<COMFY_HOME>/execution.py"') for f in body["traceback"])
    shared_sidecar.assert_names_no_server_dir(response.text)
    record = shared_sidecar.get("/jobs/no-paths")
    assert record.json()["error"]["exception_message"] == body["exception_message"]
    shared_sidecar.assert_names_no_server_dir(record.text)
    assert f"cannot identify image file '{input_dir.absolute() / 'garbage.png'}'" in (
        shared_sidecar.log()
    )


def _invert_prompt(image_value: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_value}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
    }


@pytest.mark.parametrize("form", ["base64", "data_url", "plain_file"])
def test_media_inputs(shared_sidecar: Sidecar, form: str) -> None:
    raw = png_bytes((16, 12), (200, 30, 10))
    encoded = base64.b64encode(raw).decode()
    input_dir = shared_sidecar.backend.input_dir
    if form == "base64":
        value = encoded
    elif form == "data_url":
        value = "data:image/png;base64," + encoded
    else:
        (input_dir / "caller-file.png").write_bytes(raw)
        value = "caller-file.png"
    before = set(files_in(input_dir))
    response = shared_sidecar.post("/prompt", json={"prompt": _invert_prompt(value)})
    assert response.status_code == 200, response.text
    image = decode_image(response.json()["images"][0])
    assert image.size == (16, 12)
    assert close(image.convert("RGB").getpixel((3, 3)), (55, 225, 245))
    # Decoded per-job inputs are gone; the caller's own file stays.
    assert set(files_in(input_dir)) == before


@pytest.mark.parametrize(
    "value", ["nope.png", "!!!not base64!!!", "aGVsbG8gd29ybGQh", "data:image/png;base64,@@@"]
)
def test_bad_media_value_is_400_with_location(shared_sidecar: Sidecar, value: str) -> None:
    response = shared_sidecar.post("/prompt", json={"prompt": _invert_prompt(value)})
    assert response.status_code == 400, response.text
    assert response.json()["location"] == "prompt.1.inputs.image"


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({}, "prompt"),
        ({"prompt": {"1": {"class_type": 3, "inputs": {}}}}, "prompt.1.class_type"),
        ({"prompt": basic_prompt(), "id": "../../etc"}, "id"),
        ({"prompt": basic_prompt(), "bogus": 1}, "bogus"),
        ({"prompt": basic_prompt(), "convert_output": {"format": "gif"}}, "convert_output.format"),
    ],
)
def test_bad_body_is_400_naming_the_field(
    shared_sidecar: Sidecar, body: dict[str, Any], location: str
) -> None:
    response = shared_sidecar.post("/prompt", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["location"] == location
    assert response.json()["error"]


def test_body_not_json_is_400(shared_sidecar: Sidecar) -> None:
    response = shared_sidecar.post(
        "/prompt", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["location"] == "body"


def test_interrupt_unknown_id_is_404(shared_sidecar: Sidecar) -> None:
    response = shared_sidecar.post("/interrupt", json={"id": "never-was"})
    assert response.status_code == 404
    assert response.json() == {"id": "never-was", "interrupted": "failed"}


def _post_in_thread(
    sidecar: Sidecar, body: dict[str, Any], out: dict[str, Any]
) -> threading.Thread:
    def run() -> None:
        out["response"] = sidecar.post("/prompt", json=body)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_interrupt_running_and_pending(shared_sidecar: Sidecar) -> None:
    running: dict[str, Any] = {}
    pending: dict[str, Any] = {}
    t1 = _post_in_thread(shared_sidecar, {"prompt": slow_prompt(8), "id": "slow-running"}, running)
    shared_sidecar.wait_comfy_running()
    t2 = _post_in_thread(
        shared_sidecar, {"prompt": basic_prompt(size=48), "id": "pending-one"}, pending
    )
    wait_for(
        lambda: shared_sidecar.comfy_queue()["queue_pending"],
        interval=0.05,
        what="the second prompt to wait in ComfyUI's queue",
    )
    assert shared_sidecar.post("/interrupt", json={"id": "pending-one"}).json() == {
        "id": "pending-one",
        "interrupted": "success",
    }
    t2.join(timeout=30)
    assert pending["response"].status_code == 499, pending["response"].text
    assert shared_sidecar.post("/interrupt", json={"id": "slow-running"}).status_code == 200
    t1.join(timeout=60)
    assert running["response"].status_code == 499, running["response"].text
    body = running["response"].json()
    assert body["id"] == "slow-running" and "interrupted" in body["error"]
    # Interrupt takes effect at the next node boundary, long before the 8 blur nodes are done.
    assert body["node_type"] == "ImageBlur" and int(body["node_id"]) < 9
    # The sidecar still works afterwards.
    after = shared_sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)})
    assert after.status_code == 200


@pytest.fixture(scope="module")
def slow_server() -> Iterator[SlowServer]:
    server = SlowServer()
    yield server
    server.stop()


def test_interrupt_stops_a_job_downloading_its_inputs(
    shared_sidecar: Sidecar, slow_server: SlowServer
) -> None:
    # A LoadImage URL whose body trickles (1 byte every 0.2 s of 1 MB): /interrupt must find
    # the job, its /prompt answer 499, and the download itself stop -- the connection closed,
    # nothing of it left in CACHE_DIR (it went on until DOWNLOAD_IDLE_TIMEOUT_S).
    job_id = f"downloading-{shared_sidecar.backend.kind}"
    url = slow_server.url(f"/trickle?job={job_id}")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": url}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "d"}},
    }
    answer: dict[str, Any] = {}
    sent, gone = slow_server.sent, slow_server.gone
    caller = _post_in_thread(shared_sidecar, {"prompt": prompt, "id": job_id}, answer)
    wait_for(lambda: slow_server.sent > sent, what="the server to send the input's body")
    response = shared_sidecar.post("/interrupt", json={"id": job_id})
    assert (response.status_code, response.json()) == (
        200,
        {"id": job_id, "interrupted": "success"},
    )
    caller.join(timeout=30)
    assert answer["response"].status_code == 499, answer["response"].text
    cache = Path(shared_sidecar.env["CACHE_DIR"])
    assert [p.name for p in cache.iterdir() if p.name.startswith(".partial-")] == []
    wait_for(lambda: slow_server.gone > gone, timeout=5, what="the server to see the cut")
    assert not any(p.name.startswith(job_id) for p in shared_sidecar.backend.input_dir.rglob("*"))


def test_concurrent_prompts_all_succeed(shared_sidecar: Sidecar) -> None:
    results: list[dict[str, Any]] = [{} for _ in range(4)]
    threads = [
        _post_in_thread(
            shared_sidecar,
            {"prompt": basic_prompt(batch=1, size=32 + i), "id": f"conc-{i}"},
            results[i],
        )
        for i in range(4)
    ]
    for thread in threads:
        thread.join(timeout=60)
    for i, result in enumerate(results):
        assert result["response"].status_code == 200
        assert decode_image(result["response"].json()["images"][0]).size == (32 + i, 32 + i)


def test_duplicate_running_id_is_409(shared_sidecar: Sidecar) -> None:
    first: dict[str, Any] = {}
    thread = _post_in_thread(shared_sidecar, {"prompt": slow_prompt(2), "id": "dup"}, first)
    shared_sidecar.wait_comfy_running()
    second = shared_sidecar.post("/prompt", json={"prompt": basic_prompt(), "id": "dup"})
    assert second.status_code == 409
    assert second.json()["location"] == "id"
    thread.join(timeout=60)
    assert first["response"].status_code == 200


def test_probe_bodies(shared_sidecar: Sidecar) -> None:
    health = shared_sidecar.get("/health").json()
    ready = shared_sidecar.get("/ready").json()
    assert health["status"] == "healthy" and health["phase"] == "ready"
    assert ready["status"] == "ready"
    assert set(health) == {"version", "status", "phase", "detail", "queue", "instances"}
    (instance,) = health["instances"]  # one ComfyUI by default
    assert (instance["name"], instance["phase"], instance["connected"]) == ("0", "ready", True)
    assert health["queue"] == {"waiting": 0, "running": 0}


def test_same_id_and_prompt_twice(shared_sidecar: Sidecar) -> None:
    """ComfyUI would serve the SaveImage node from its cache, pointing at files already
    removed; the sidecar keeps saving nodes out of the cache."""
    body = {"prompt": basic_prompt(batch=1, size=20), "id": "again"}
    first = shared_sidecar.post("/prompt", json=body)
    second = shared_sidecar.post("/prompt", json=body)
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    assert decode_image(second.json()["images"][0]).size == (20, 20)
    assert "comfy_sidecar_job" not in second.json()["prompt"]["3"]["inputs"]
