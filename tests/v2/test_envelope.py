"""The Comfy API v2 error envelope: each domain error answers ``{"error": {code, message,
details}}`` with the status and code the official comfy-sdk reads into its own exception class
(``comfy_low.errors.error_from_envelope`` then ``comfy_sdk.exceptions.to_sdk_error``, the SDK's
own two steps), and ``details`` keeps what our other APIs tell a caller (``location``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from comfy_low.errors import error_from_envelope
from comfy_sdk import exceptions as sdk
from comfy_sdk import router_exceptions
from litestar import Router, get, post
from litestar.testing import TestClient

from comfy_sidecar.config import load_settings
from comfy_sidecar.errors import (
    BlobNotFound,
    HashMismatch,
    IdempotencyKeyReuse,
    InputError,
    MissingAsset,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ValidationFailed,
)
from comfy_sidecar.http.adapters.comfy_v2.errors import exception_handlers
from comfy_sidecar.http.app import create_app
from comfy_sidecar.runtime.container import build

CASES: list[tuple[Exception, int, str, type[Exception]]] = [
    (
        ValidationFailed(
            "Prompt outputs failed validation",
            "prompt.3.inputs.image",
            node_errors={"3": {"errors": []}},
        ),
        422,
        "invalid_workflow",
        sdk.InvalidWorkflow,
    ),
    (
        InputError("expected a string", "workflow.3.inputs.seed"),
        422,
        "invalid_workflow",
        sdk.InvalidWorkflow,
    ),
    (
        MissingAsset("no asset with this id", "workflow.1.inputs.image", missing=[]),
        422,
        "missing_asset",
        sdk.MissingAsset,
    ),
    (
        HashMismatch("the bytes hash otherwise", expected_hash="blake3:aa", hash="blake3:bb"),
        409,
        "hash_mismatch",
        sdk.HashMismatch,
    ),
    (BlobNotFound("no bytes with this hash"), 404, "blob_not_found", sdk.BlobNotFound),
    (
        IdempotencyKeyReuse("this key was used", "Idempotency-Key"),
        422,
        "idempotency_key_reuse",
        sdk.IdempotencyKeyReuse,
    ),
    (PayloadTooLarge("too large", limit_bytes=1), 413, "payload_too_large", sdk.ComfyError),
    (NotFound("no job with id 'x'", location="id"), 404, "not_found", sdk.NotFound),
    (Overloaded("the queue is full"), 429, "queue_full", sdk.QueueFull),
    (  # an API key past its quota: the hook the v2 envelope maps to rate_limited
        RateLimited(
            "API key 'team-a' has 2 job(s) in flight (max_concurrent_jobs: 2); try again later",
            key="team-a",
            reason="max_concurrent_jobs",
            limit=2,
            retry_after_s=7,
        ),
        429,
        "rate_limited",
        router_exceptions.RateLimited,
    ),
]


class Counted(msgspec.Struct):
    """A body the test route decodes."""

    count: int


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient[Any]]:
    settings = msgspec.structs.replace(load_settings({}), markdown_schema_descriptions=False)
    app = create_app(build(settings))

    @get("/raise/{case:int}", sync_to_thread=False)
    def raiser(case: int) -> None:
        raise CASES[case][0]

    @post("/decode", sync_to_thread=False)
    def decoder(data: Counted) -> None:
        return None

    app.register(
        Router(
            "/api/v2/_test",
            route_handlers=[raiser, decoder],
            exception_handlers=exception_handlers(),
        )
    )
    with TestClient(app) as test_client:
        yield test_client


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[2] for c in CASES])
def test_a_domain_error_is_the_envelope_the_sdk_reads(client: TestClient[Any], case: int) -> None:
    exc, status, code, sdk_class = CASES[case]
    response = client.get(f"/api/v2/_test/raise/{case}")
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert body["error"]["message"]
    location = getattr(exc, "location", None)
    if location is not None:
        assert body["error"]["details"]["location"] == location
    retry = response.headers.get("retry-after")
    raised = sdk.to_sdk_error(
        error_from_envelope(status, body, retry_after=int(retry) if retry else None)
    )
    assert isinstance(raised, sdk_class), raised
    if isinstance(exc, RateLimited):  # the reason in the details, Retry-After its own
        assert body["error"]["details"]["reason"] == "max_concurrent_jobs"
        assert raised.retry_after == 7


def test_a_body_that_does_not_decode_is_422_naming_the_field(client: TestClient[Any]) -> None:
    response = client.post("/api/v2/_test/decode", json={"count": "many"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["details"]["location"] == "count"


def test_a_body_that_is_not_json_is_422_at_body(client: TestClient[Any]) -> None:
    """Malformed JSON (Litestar's own 400) is a caller's mistake like any other under /api/v2:
    422 invalid_request at ``body``, the status the OpenAPI document declares for it."""
    response = client.post(
        "/api/v2/_test/decode", content=b"\x00", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["details"]["location"] == "body"


def test_health_answers_in_v2_shape_without_a_key(client: TestClient[Any]) -> None:
    response = client.get("/api/v2/health")
    assert response.status_code == 200
    assert response.json()["status"] == "unhealthy"  # no ComfyUI ever started here
    assert response.json()["phase"] == "starting"


def test_an_unknown_v2_path_is_a_404_envelope(client: TestClient[Any]) -> None:
    response = client.get("/api/v2/_test/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
