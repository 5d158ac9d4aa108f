"""``/api/v2/assets`` driven by the official comfy-sdk against a running sidecar (ComfyUI
double, in-process job backend, API keys on): streamed uploads deduplicated by blake3 (the
second ``assets.from_file`` of the same bytes sends no body: counted by a relay in front of the
sidecar), content with ``Range``, signed URLs; and every caller's mistake sent raw with httpx,
its envelope, status and code checked, and read back by the SDK into its own class."""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from blake3 import blake3
from comfy_low.errors import error_from_envelope
from comfy_low.models import Output as LowOutput
from comfy_sdk import Comfy, Output
from comfy_sdk import exceptions as sdk

from comfy_sidecar.assets import UrlSigner
from comfy_sidecar.http.adapters.comfy_v2.assets import output_asset_id
from tests.byte_relay import ByteRelay, byte_relay
from tests.conftest import Backend, Sidecar, basic_prompt, make_sidecar
from tests.waiting import wait_for

KEY = "test-key-0123456789"
SECRET = "asset-url-secret-0123456789"
MAX_UPLOAD_MB = 4
AUTH = {"authorization": f"Bearer {KEY}"}


def b3(data: bytes) -> str:
    return "blake3:" + blake3(data).hexdigest()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    tmp = tmp_path_factory.mktemp("v2-assets")
    sidecar = make_sidecar(
        Backend("double", tmp / "comfy"),
        tmp,
        API_KEYS=KEY,
        ASSET_URL_SECRET=SECRET,
        ASSET_MAX_UPLOAD_MB=str(MAX_UPLOAD_MB),
    )
    sidecar.start()
    try:
        sidecar.wait_ready()
        yield sidecar
    finally:
        sidecar.stop()


@pytest.fixture(scope="module")
def relay(sidecar: Sidecar) -> Iterator[ByteRelay]:
    with byte_relay(sidecar.port) as relay:
        yield relay


@pytest.fixture
def comfy(relay: ByteRelay, monkeypatch: pytest.MonkeyPatch) -> Iterator[Comfy]:
    """The SDK's client, through the byte-counting relay."""
    monkeypatch.setenv("COMFY_BASE_URL", relay.url)
    with Comfy(api_key=KEY) as client:
        yield client


def envelope_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The v2 error body of ``response``, checked: ``status``, only ``error``, its ``code``
    and a message; returns ``error``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


def sdk_error(response: httpx.Response) -> Exception:
    """What comfy-sdk raises for ``response`` (its own two steps)."""
    retry = response.headers.get("retry-after")
    return sdk.to_sdk_error(
        error_from_envelope(
            response.status_code, response.json(), retry_after=int(retry) if retry else None
        )
    )


def upload(
    sidecar: Sidecar,
    data: bytes,
    *,
    fields: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    name: str = "photo.png",
) -> httpx.Response:
    return sidecar.post(
        "/api/v2/assets",
        files={"file": (name, data, "image/png")},
        data=fields or {},
        headers={**AUTH, **(headers or {})},
    )


# --- the SDK -----------------------------------------------------------------------------


def test_from_file_uploads_new_bytes_then_a_second_from_file_sends_no_body(
    comfy: Comfy, relay: ByteRelay, tmp_path: Path
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "photo.png"
    path.write_bytes(data)

    relay.reset()
    first = comfy.assets.from_file(path)
    first_id = first.commit()
    assert first.created_new is True
    assert first.hash == b3(data)  # the server's own blake3, read back
    assert relay.sent > len(data)  # the whole body went up once

    relay.reset()
    again = comfy.assets.from_file(path)  # a new handle: hashes locally, probes, mints
    again_id = again.commit()
    assert again.created_new is False
    assert again_id != first_id  # every mint is its own asset over the kept bytes
    assert relay.sent < 4096, relay.sent  # HEAD by-hash and a small JSON mint, no body

    kept = comfy.assets.get(again_id)
    assert kept.hash == b3(data) and kept.file_path == "photo.png"


def test_content_is_streamed_whole_or_by_range_through_the_sdk(
    comfy: Comfy, tmp_path: Path
) -> None:
    data = os.urandom(700_000)
    asset = comfy.assets.from_bytes(data, filename="clip.bin")
    asset_id = asset.commit()
    model = LowOutput.model_validate(
        {
            "node_id": "upload",
            "name": "clip.bin",
            "type": "file",
            "content_type": "application/octet-stream",
            "size_bytes": len(data),
            "id": asset_id,
            "hash": b3(data),
            "url": f"http://127.0.0.1/api/v2/assets/{asset_id}/content",
            "url_expires_at": "2030-01-01T00:00:00Z",
        }
    )
    output = Output(model, comfy._low)
    whole = output.to_file(tmp_path / "whole.bin")
    assert whole.read_bytes() == data
    part = output.to_file(tmp_path / "part.bin", range=(1000, 265_999))
    assert part.read_bytes() == data[1000:266_000]
    assert output.to_bytes(range=(len(data) - 5, len(data) - 1)) == data[-5:]


def test_the_signed_url_reads_without_a_key_and_is_absolute(sidecar: Sidecar) -> None:
    data = os.urandom(1000)
    body = upload(sidecar, data).json()
    url = body["url"]
    assert url.startswith(f"{sidecar.url}/api/v2/assets/{body['id']}/content?exp=")
    with httpx.Client() as client:
        whole = client.get(url)  # no key
        assert whole.status_code == 200 and whole.content == data
        assert whole.headers["content-type"] == "image/png"
        ranged = client.get(url, headers={"range": "bytes=10-19"})
        assert ranged.status_code == 206 and ranged.content == data[10:20]
        assert ranged.headers["content-range"] == "bytes 10-19/1000"
    fresh = sidecar.get(f"/api/v2/assets/{body['id']}", headers=AUTH).json()
    assert fresh["url"] != url or fresh["url_expires_at"] >= body["url_expires_at"]


def test_a_failed_upload_leaves_its_idempotency_key_free_and_a_success_uses_it_up(
    sidecar: Sidecar,
) -> None:
    data = os.urandom(2000)
    key = {"idempotency-key": f"key-{time.time_ns()}"}
    refused = upload(sidecar, data, fields={"expected_hash": b3(b"other")}, headers=key)
    envelope_of(refused, 409, "hash_mismatch")
    done = upload(sidecar, data, fields={"expected_hash": b3(data)}, headers=key)
    assert done.status_code == 201, done.text
    again = upload(sidecar, data, headers=key)
    error = envelope_of(again, 422, "idempotency_key_reuse")
    assert error["details"]["location"] == "Idempotency-Key"
    assert isinstance(sdk_error(again), sdk.IdempotencyKeyReuse)


def test_fields_after_the_file_part_count_too(sidecar: Sidecar) -> None:
    data = os.urandom(500)
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data
    body += (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="file_path"\r\n\r\nlate.webp'
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="content_type"\r\n\r\n'
        f"image/webp\r\n--{boundary}--\r\n"
    ).encode()
    response = sidecar.post(
        "/api/v2/assets",
        content=body,
        headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 201, response.text
    asset = response.json()
    assert asset["file_path"] == "late.webp" and asset["content_type"] == "image/webp"
    assert asset["size_bytes"] == 500 and asset["hash"] == b3(data)


def test_delete_removes_the_asset_and_an_unread_hash_is_gone(sidecar: Sidecar) -> None:
    data = os.urandom(1234)
    asset = upload(sidecar, data).json()
    assert (
        sidecar.client.head(
            f"{sidecar.url}/api/v2/assets/by-hash/{asset['hash']}", headers=AUTH
        ).status_code
        == 200
    )
    deleted = sidecar.client.delete(f"{sidecar.url}/api/v2/assets/{asset['id']}", headers=AUTH)
    assert deleted.status_code == 204
    envelope_of(sidecar.get(f"/api/v2/assets/{asset['id']}", headers=AUTH), 404, "not_found")
    assert (
        sidecar.client.head(
            f"{sidecar.url}/api/v2/assets/by-hash/{asset['hash']}", headers=AUTH
        ).status_code
        == 404
    )


# --- every caller's mistake, raw -----------------------------------------------------------


def test_a_body_that_is_not_multipart_is_422_naming_body(sidecar: Sidecar) -> None:
    response = sidecar.post(
        "/api/v2/assets", content=b"hello", headers={**AUTH, "content-type": "text/plain"}
    )
    assert envelope_of(response, 422, "invalid_request")["details"]["location"] == "body"


def test_a_multipart_body_without_a_file_is_422_naming_file(sidecar: Sidecar) -> None:
    response = sidecar.post(
        "/api/v2/assets", files={"other": ("x", b"x")}, data={"file_path": "a"}, headers=AUTH
    )
    assert envelope_of(response, 422, "invalid_request")["details"]["location"] == "file"


def test_a_cut_multipart_body_is_422_and_keeps_nothing(sidecar: Sidecar) -> None:
    before = assets_on_disk(sidecar)
    body = (
        b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n' + b"x" * 5000
    )
    response = sidecar.post(
        "/api/v2/assets",
        content=body,
        headers={**AUTH, "content-type": "multipart/form-data; boundary=zz"},
    )
    assert envelope_of(response, 422, "invalid_request")["details"]["location"] == "body"
    assert assets_on_disk(sidecar) == before


def assets_on_disk(sidecar: Sidecar) -> list[str]:
    root = Path(sidecar.env["ASSET_DIR"])
    return sorted(p.name for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("fields", "location"),
    [
        ({"content_type": "image/png\r\nx-evil: 1"}, "content_type"),
        ({"expected_hash": "sha256:abcd"}, "expected_hash"),
        ({"file_path": "x" * 2000}, "file_path"),
    ],
    ids=["content_type", "expected_hash", "file_path"],
)
def test_a_bad_field_is_422_naming_it(
    sidecar: Sidecar, fields: dict[str, str], location: str
) -> None:
    response = upload(sidecar, b"abc", fields=fields)
    assert envelope_of(response, 422, "invalid_request")["details"]["location"] == location


def test_bytes_that_differ_from_expected_hash_are_409_hash_mismatch(sidecar: Sidecar) -> None:
    data = b"the bytes sent"
    response = upload(sidecar, data, fields={"expected_hash": b3(b"the bytes meant")})
    error = envelope_of(response, 409, "hash_mismatch")
    assert error["details"]["hash"] == b3(data)
    assert isinstance(sdk_error(response), sdk.HashMismatch)


def test_an_upload_over_asset_max_upload_mb_is_413_announced_or_streamed(
    sidecar: Sidecar,
) -> None:
    big = b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1)
    announced = upload(sidecar, big)  # Content-Length says it: refused before reading
    envelope_of(announced, 413, "payload_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while it streams
        yield b'--cc\r\nContent-Disposition: form-data; name="file"; filename="big"\r\n\r\n'
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]
        yield b"\r\n--cc--\r\n"

    try:
        streamed = sidecar.post(
            "/api/v2/assets",
            content=chunked(),
            headers={**AUTH, "content-type": "multipart/form-data; boundary=cc"},
        )
    except httpx.WriteError:  # the server answered and closed before the body ended
        streamed = None
    if streamed is not None:
        envelope_of(streamed, 413, "payload_too_large")
    assert not [n for n in assets_on_disk(sidecar) if n.startswith(".partial-")]


@pytest.mark.parametrize(
    "key", ["", "k" * 256, "caf\u00e9"], ids=["empty", "too-long", "not-ascii"]
)
def test_a_malformed_idempotency_key_is_422_naming_the_header(sidecar: Sidecar, key: str) -> None:
    response = sidecar.post(
        "/api/v2/assets",
        files={"file": ("a", b"a")},
        headers={**AUTH, "idempotency-key": key.encode("utf-8")},  # type: ignore[dict-item]
    )
    error = envelope_of(response, 422, "invalid_request")
    assert error["details"]["location"] == "Idempotency-Key"


def test_from_hash_of_unknown_bytes_is_404_blob_not_found(sidecar: Sidecar) -> None:
    response = sidecar.post(
        "/api/v2/assets/from-hash", json={"hash": b3(os.urandom(8))}, headers=AUTH
    )
    assert envelope_of(response, 404, "blob_not_found")["details"]["location"] == "hash"
    assert isinstance(sdk_error(response), sdk.BlobNotFound)


@pytest.mark.parametrize(
    "body", [{"hash": "md5:00"}, {"file_path": "a.png"}, {"hash": 7}], ids=["bad", "none", "type"]
)
def test_from_hash_with_a_bad_hash_is_422_naming_it(sidecar: Sidecar, body: dict[str, Any]) -> None:
    response = sidecar.post("/api/v2/assets/from-hash", json=body, headers=AUTH)
    assert envelope_of(response, 422, "invalid_request")["details"]["location"] == "hash"


def test_head_by_hash_answers_404_for_unknown_and_422_for_malformed(sidecar: Sidecar) -> None:
    base = f"{sidecar.url}/api/v2/assets/by-hash/"
    assert sidecar.client.head(base + b3(b"never sent"), headers=AUTH).status_code == 404
    assert sidecar.client.head(base + "blake3:xyz", headers=AUTH).status_code == 422


@pytest.mark.parametrize("method", ["GET", "DELETE", "CONTENT"])
def test_an_unknown_asset_is_404_not_found(sidecar: Sidecar, method: str) -> None:
    path = "/api/v2/assets/9f8a1c0d-2b3e-4f56-8a7b-1c2d3e4f5a6b"
    if method == "CONTENT":
        response = sidecar.get(path + "/content", headers=AUTH)
    else:
        response = sidecar.client.request(method, sidecar.url + path, headers=AUTH)
    assert envelope_of(response, 404, "not_found")["details"]["location"] == "id"
    assert isinstance(sdk_error(response), sdk.NotFound)


def test_a_range_past_the_end_is_416(sidecar: Sidecar) -> None:
    asset = upload(sidecar, b"0123456789").json()
    response = sidecar.get(
        f"/api/v2/assets/{asset['id']}/content", headers={**AUTH, "range": "bytes=10-"}
    )
    assert envelope_of(response, 416, "range_not_satisfiable")["details"]["location"] == "range"
    assert response.headers["content-range"] == "bytes */10"


def test_without_a_key_every_asset_route_is_401_and_an_upload_is_never_read(
    sidecar: Sidecar,
) -> None:
    asset = upload(sidecar, b"kept").json()
    calls = [
        ("POST", "/api/v2/assets", {"files": {"file": ("a", b"a" * 100_000)}}),
        ("POST", "/api/v2/assets/from-hash", {"json": {"hash": asset["hash"]}}),
        ("GET", f"/api/v2/assets/{asset['id']}", {}),
        ("GET", f"/api/v2/assets/{asset['id']}/content", {}),
        ("DELETE", f"/api/v2/assets/{asset['id']}", {}),
    ]
    for method, path, kw in calls:
        response = sidecar.client.request(method, sidecar.url + path, **kw)
        assert envelope_of(response, 401, "unauthorized")["details"]["location"] == "authorization"
        assert isinstance(sdk_error(response), sdk.Unauthorized)
    head = sidecar.client.head(f"{sidecar.url}/api/v2/assets/by-hash/{asset['hash']}")
    assert head.status_code == 401
    assert sidecar.get(f"/api/v2/assets/{asset['id']}", headers=AUTH).status_code == 200


def test_a_wrong_or_expired_signature_is_403_forbidden_even_with_a_key(sidecar: Sidecar) -> None:
    asset = upload(sidecar, b"secret bytes").json()
    path = f"/api/v2/assets/{asset['id']}/content"
    signer = UrlSigner(SECRET, ttl_s=60)
    expired = signer.sign(asset["id"], now=time.time() - 3600).path  # signed right, in the past
    other = signer.sign("another-id").path.partition("?")[2]  # a signature for another asset
    for url, reason in [
        (sidecar.url + expired, "expired"),
        (f"{sidecar.url}{path}?{other}", "bad_signature"),
        (f"{sidecar.url}{path}?exp=99999999999&sig=AAAA", "bad_signature"),
        (f"{sidecar.url}{path}?sig=AAAA", "bad_signature"),
    ]:
        for headers in ({}, AUTH):
            response = sidecar.client.get(url, headers=headers)
            error = envelope_of(response, 403, "forbidden")
            assert error["details"]["reason"] == reason
            assert isinstance(sdk_error(response), sdk.Forbidden)


def test_a_body_in_small_pieces_arrives_whole(sidecar: Sidecar) -> None:
    """A body sent in small pieces with no Content-Length arrives whole (the streamed parser
    meets boundaries and headers split across pieces)."""
    data = os.urandom(200_000)
    boundary = "--split--"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.bin"\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def pieces() -> Iterator[bytes]:
        stream = io.BytesIO(body)
        while chunk := stream.read(997):
            yield chunk

    response = sidecar.post(
        "/api/v2/assets",
        content=pieces(),
        headers={**AUTH, "content-type": f'multipart/form-data; boundary="{boundary}"'},
    )
    assert response.status_code == 201, response.text
    assert response.json()["hash"] == b3(data)


def test_a_jobs_output_is_an_asset_read_through_the_job_backend(sidecar: Sidecar) -> None:
    submitted = sidecar.post(
        "/jobs", json={"prompt": basic_prompt(batch=1, size=32)}, headers=AUTH
    ).json()
    ended = sidecar.get(f"/jobs/{submitted['id']}", params={"wait": 30}, headers=AUTH).json()
    assert ended["status"] == "completed", ended
    file = sidecar.get(f"/jobs/{submitted['id']}/outputs/0", headers=AUTH).content

    asset_id = output_asset_id(submitted["id"], 0)
    asset = sidecar.get(f"/api/v2/assets/{asset_id}", headers=AUTH).json()
    assert asset["id"] == asset_id and asset["job_id"] == submitted["id"]
    assert asset["size_bytes"] == len(file) and asset["content_type"] == "image/png"
    with httpx.Client() as client:  # its signed url, no key
        assert client.get(asset["url"]).content == file
        ranged = client.get(asset["url"], headers={"range": "bytes=1-3"})
        assert ranged.status_code == 206 and ranged.content == file[1:4]
    deleted = sidecar.client.delete(f"{sidecar.url}/api/v2/assets/{asset_id}", headers=AUTH)
    assert envelope_of(deleted, 422, "invalid_request")["details"]["location"] == "id"
    beyond = sidecar.get(f"/api/v2/assets/{output_asset_id(submitted['id'], 5)}", headers=AUTH)
    envelope_of(beyond, 404, "not_found")


def test_docs_show_the_asset_routes_with_their_schemas(sidecar: Sidecar) -> None:
    document = sidecar.get("/openapi.json").json()
    paths = document["paths"]
    assert set(paths["/api/v2/assets"]) >= {"post"}
    assert set(paths["/api/v2/assets/from-hash"]) >= {"post"}
    assert set(paths["/api/v2/assets/by-hash/{hash}"]) >= {"head"}
    assert set(paths["/api/v2/assets/{asset_id}"]) >= {"get", "delete"}
    assert set(paths["/api/v2/assets/{asset_id}/content"]) >= {"get"}
    upload_op = paths["/api/v2/assets"]["post"]
    form = upload_op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and form["properties"]["file"]["format"] == "binary"
    assert set(form["properties"]) == {"file", "file_path", "content_type", "expected_hash", "tags"}
    created = upload_op["responses"]["201"]["content"]["application/json"]["schema"]
    assert created == {"$ref": "#/components/schemas/Asset"}
    mismatch = upload_op["responses"]["409"]["content"]["application/json"]["schema"]
    assert mismatch == {"$ref": "#/components/schemas/ErrorEnvelope"}
    asset = document["components"]["schemas"]["Asset"]
    assert {"id", "hash", "size_bytes", "url", "url_expires_at", "created_new"} <= set(
        asset["properties"]
    )
    assert upload_op["security"]  # API keys are on: the route says it needs one


def test_a_client_gone_mid_upload_leaves_no_file_and_its_key_free(sidecar: Sidecar) -> None:
    tmp = Path(sidecar.env["ASSET_DIR"]) / "tmp"
    key = f"gone-{time.time_ns()}"
    head = (
        b'--gg\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        + os.urandom(3 * 1024 * 1024)
    )
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        sock.sendall(
            (
                "POST /api/v2/assets HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {KEY}\r\nIdempotency-Key: {key}\r\n"
                "Content-Type: multipart/form-data; boundary=gg\r\n"
                f"Content-Length: {len(head) + 1_000_000}\r\n\r\n"
            ).encode()
            + head
        )
        wait_for(
            lambda: any(tmp.glob(".partial-*")), timeout=10, what="the upload to reach the disk"
        )
    wait_for(lambda: not any(tmp.glob(".partial-*")), timeout=10, what="the partial file to go")
    again = upload(sidecar, b"now whole", headers={"idempotency-key": key})
    assert again.status_code == 201, again.text  # the failed request did not use the key up
