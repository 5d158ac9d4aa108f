"""Error classes to HTTP answers: every domain error (comfy_sidecar.errors) and storage error
class gets the status of app.STATUS, its body and headers, through the app's own exception
handlers; then the domain errors the pipeline raises, seen through a sidecar in front of the
ComfyUI double."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import get
from litestar.testing import TestClient

from comfy_sidecar.config import load_settings
from comfy_sidecar.errors import (
    AssetNotFound,
    AssetUrlRefused,
    BlobNotFound,
    Conflict,
    ExecutionFailed,
    HashMismatch,
    IdempotencyKeyReuse,
    InputError,
    Interrupted,
    MissingAsset,
    NotFound,
    OutputsTooLarge,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    SidecarError,
    TimedOut,
    Unavailable,
    UpstreamFailed,
    ValidationFailed,
)
from comfy_sidecar.http.app import create_app
from comfy_sidecar.runtime.container import build
from comfy_sidecar.storage.errors import (
    AuthError,
    BackendError,
    BadRequestError,
    CacheConflictError,
    DiskFullError,
    NotFoundError,
    OutputMissingError,
    StorageError,
    SupersededError,
)
from tests.conftest import Sidecar, basic_prompt, running_sidecar, slow_prompt

# (the error raised by a handler, the status, the body) -- bodies in their key order.
CASES: list[tuple[Exception, int, dict[str, Any]]] = [
    (
        InputError("expected a string", "prompt.1.inputs.image", id="j"),
        400,
        {"error": "expected a string", "location": "prompt.1.inputs.image", "id": "j"},
    ),
    (
        ValidationFailed(
            "Prompt outputs failed validation",
            "prompt.2",
            id="j",
            comfyui_error={"type": "prompt_outputs_failed_validation"},
            node_errors={"2": {"errors": []}},
        ),
        400,
        {
            "error": "Prompt outputs failed validation",
            "location": "prompt.2",
            "id": "j",
            "comfyui_error": {"type": "prompt_outputs_failed_validation"},
            "node_errors": {"2": {"errors": []}},
        },
    ),
    (
        NotFound("no download with key 'k'", location="key"),
        404,
        {"error": "no download with key 'k'", "location": "key"},
    ),
    (
        Conflict("a job with id 'j' is already running", location="id", id="j"),
        409,
        {"error": "a job with id 'j' is already running", "location": "id", "id": "j"},
    ),
    (
        Interrupted("the job was interrupted", id="j", node_id="3", node_type="ImageBlur"),
        499,
        {"error": "the job was interrupted", "id": "j", "node_id": "3", "node_type": "ImageBlur"},
    ),
    (
        ExecutionFailed("Prompt execution failed", id="j", node_id="1", traceback=["x"]),
        500,
        {"error": "Prompt execution failed", "id": "j", "node_id": "1", "traceback": ["x"]},
    ),
    (
        UpstreamFailed("upload of a.png failed: 500", location="s3", id="j"),
        502,
        {"error": "upload of a.png failed: 500", "location": "s3", "id": "j"},
    ),
    (
        UpstreamFailed("upload failed: refused", cause=AuthError("refused"), location="s3"),
        400,
        {"error": "upload failed: refused", "location": "s3"},
    ),
    (
        UpstreamFailed("upload failed: later", cause=SupersededError("later"), location="s3"),
        409,
        {"error": "upload failed: later", "location": "s3"},
    ),
    (
        UpstreamFailed("upload failed: cut", cause=BackendError("cut"), location="s3"),
        502,
        {"error": "upload failed: cut", "location": "s3"},
    ),
    (
        Unavailable("ComfyUI is not ready (starting)"),
        503,
        {"error": "ComfyUI is not ready (starting)"},
    ),
    (TimedOut("ran too long", id="j"), 504, {"error": "ran too long", "id": "j"}),
    (
        OutputsTooLarge("outputs too large", id="j", size_bytes=9),
        507,
        {"error": "outputs too large", "id": "j", "size_bytes": 9},
    ),
    (Overloaded("the queue is full"), 429, {"error": "the queue is full"}),
    (
        RateLimited(
            "key k is past its quota", key="k", reason="max_queue", limit=3, retry_after_s=1
        ),
        429,
        {
            "error": "key k is past its quota",
            "key": "k",
            "reason": "max_queue",
            "limit": 3,
            "retry_after_s": 1,
        },
    ),
    (SidecarError("unclassified"), 500, {"error": "unclassified"}),
    (
        AssetNotFound("no asset with id 'a'", location="id"),
        404,
        {"error": "no asset with id 'a'", "location": "id"},
    ),
    (
        BlobNotFound("no bytes with hash blake3:00", location="hash"),
        404,
        {"error": "no bytes with hash blake3:00", "location": "hash"},
    ),
    (
        HashMismatch(
            "mismatch", location="expected_hash", expected_hash="blake3:0", hash="blake3:1"
        ),
        409,
        {
            "error": "mismatch",
            "location": "expected_hash",
            "expected_hash": "blake3:0",
            "hash": "blake3:1",
        },
    ),
    (
        MissingAsset(
            "no asset with id 'a'", "workflow.3.inputs.image", missing=["workflow.3.inputs.image"]
        ),
        422,
        {
            "error": "no asset with id 'a'",
            "location": "workflow.3.inputs.image",
            "missing": ["workflow.3.inputs.image"],
        },
    ),
    (
        AssetUrlRefused("the content URL has expired", reason="expired"),
        403,
        {"error": "the content URL has expired", "reason": "expired"},
    ),
    (
        PayloadTooLarge("the upload is larger than 10 bytes", limit_bytes=10),
        413,
        {"error": "the upload is larger than 10 bytes", "limit_bytes": 10},
    ),
    (
        IdempotencyKeyReuse("this Idempotency-Key was already used", "Idempotency-Key"),
        422,
        {"error": "this Idempotency-Key was already used", "location": "Idempotency-Key"},
    ),
    (BadRequestError("bad URL"), 400, {"error": "bad URL"}),
    (AuthError("refused"), 400, {"error": "refused"}),
    (NotFoundError("no such object"), 400, {"error": "no such object"}),
    (SupersededError("superseded"), 409, {"error": "superseded"}),
    (BackendError("backend failed"), 502, {"error": "backend failed"}),
    (StorageError("cannot link"), 502, {"error": "cannot link"}),
    (
        CacheConflictError("x: exists and is not a cache link"),
        409,
        {"error": "x: exists and is not a cache link"},
    ),
    (
        OutputMissingError("a.png: output file missing"),
        500,
        {"error": "a.png: output file missing"},
    ),
    (DiskFullError("no space left"), 507, {"error": "no space left"}),
    (  # a download into a full disk: the sidecar's fault, the field still named
        UpstreamFailed(
            "could not download u: no space left",
            cause=DiskFullError("no space left"),
            location="prompt.1.inputs.image",
            id="j",
        ),
        507,
        {
            "error": "could not download u: no space left",
            "location": "prompt.1.inputs.image",
            "id": "j",
        },
    ),
    (  # an unexpected error: its class and reason, never the path str() would show
        FileNotFoundError(2, "No such file or directory", "/srv/secret/x.png"),
        500,
        {
            "error": "internal error: FileNotFoundError: No such file or directory "
            "(see the sidecar's log)"
        },
    ),
]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient[Any]]:
    settings = msgspec.structs.replace(
        load_settings({}), markdown_schema_descriptions=False, max_body_size_mb=1
    )
    app = create_app(build(settings))

    @get("/raise/{case:int}", sync_to_thread=False)
    def raiser(case: int) -> None:
        raise CASES[case][0]

    app.register(raiser)
    with TestClient(app) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "case", range(len(CASES)), ids=[f"{type(e).__name__}-{s}" for e, s, _ in CASES]
)
def test_error_class_maps_to_status_and_body(client: TestClient[Any], case: int) -> None:
    _, status, body = CASES[case]
    response = client.get(f"/raise/{case}")
    assert response.status_code == status, response.text
    assert list(response.json().items()) == list(body.items())
    assert response.headers.get("content-type") == "application/json"
    assert response.headers.get("retry-after") == ("1" if status in (429, 503) else None)


def test_retry_after_is_the_errors_own(client: TestClient[Any]) -> None:
    """A key's jobs_per_minute refusal says when its window frees a place (not the constant
    1 s of a full queue), in the header and the body."""
    case = len(CASES)
    CASES.append(
        (
            RateLimited("wait", key="k", reason="jobs_per_minute", limit=2, retry_after_s=37),
            429,
            {},
        )
    )
    try:
        response = client.get(f"/raise/{case}")
    finally:
        CASES.pop()
    assert response.status_code == 429
    assert response.headers["retry-after"] == "37"
    assert response.json()["retry_after_s"] == 37


def test_every_domain_class_has_a_case() -> None:
    import comfy_sidecar.errors as errors

    classes = {
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, SidecarError)
    }
    assert classes == {type(error) for error, _, _ in CASES if isinstance(error, SidecarError)}


# --- through a sidecar in front of the ComfyUI double --------------------------------------


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    with running_sidecar("double", tmp_path_factory.mktemp("errors")) as started:
        yield started


def test_timeout_is_504_and_the_id(tmp_path: Path) -> None:
    with running_sidecar("double", tmp_path, PROMPT_TIMEOUT_S="1") as sidecar:
        response = sidecar.post("/prompt", json={"prompt": slow_prompt(blurs=8), "id": "too-slow"})
    assert response.status_code == 504, response.text
    assert response.json() == {
        "error": "the job ran longer than PROMPT_TIMEOUT_S (1 s) and was interrupted",
        "id": "too-slow",
    }


def test_comfyui_validation_is_400_with_its_errors(sidecar: Sidecar) -> None:
    prompt = basic_prompt()
    prompt["1"]["inputs"]["width"] = "wide"
    response = sidecar.post("/prompt", json={"prompt": prompt, "id": "invalid"})
    assert response.status_code == 400, response.text
    body = response.json()
    assert list(body) == ["error", "location", "id", "comfyui_error", "node_errors"]
    assert (body["location"], body["id"]) == ("prompt.1.inputs.width", "invalid")
    assert set(body["node_errors"]) == {"1"}


def test_unknown_download_key_is_404(sidecar: Sidecar) -> None:
    response = sidecar.get("/download/nosuchkey")
    assert response.status_code == 404
    assert response.json() == {"error": "no download with key 'nosuchkey'", "location": "key"}


def test_duplicate_id_is_409_and_interrupt_499(sidecar: Sidecar) -> None:
    first: dict[str, Any] = {}

    def run() -> None:
        first["response"] = sidecar.post(
            "/prompt", json={"prompt": slow_prompt(blurs=8), "id": "twice"}
        )

    thread = threading.Thread(target=run)
    thread.start()
    # Once ComfyUI (the double) runs it (prefix rewritten to twice_slow), the id is held: a
    # second "twice" is refused before its prompt is even looked at (it has no output node).
    deadline = time.monotonic() + 30
    comfy_queue = f"http://127.0.0.1:{sidecar.comfy_port}/queue"
    while "twice_slow" not in str(sidecar.client.get(comfy_queue).json()["queue_running"]):
        assert time.monotonic() < deadline and thread.is_alive(), first
    second = sidecar.post("/prompt", json={"prompt": {"1": basic_prompt()["1"]}, "id": "twice"})
    try:
        assert second.status_code == 409, second.text
        assert second.json() == {
            "error": "a job with id 'twice' is already running",
            "location": "id",
            "id": "twice",
        }
        assert sidecar.post("/interrupt", json={"id": "twice"}).status_code == 200
    finally:
        thread.join(60)
    response = first["response"]
    assert response.status_code == 499, response.text
    assert list(response.json()) == ["error", "id", "node_id", "node_type"]
    assert response.json()["error"] == "the job was interrupted"
