"""Secret decoding (Node's lenient base64), signatures checked with `standardwebhooks`, bodies."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from comfy_sidecar.webhooks import (
    JsonBody,
    WebhookDispatcher,
    decode_secret,
    node_base64_decode,
    v1_failed_body,
    v1_output_body,
    v2_complete_body,
    v2_failed_body,
)

from .conftest import Receiver, make_settings

RAW_KEY = bytes(range(1, 25))
B64_KEY = base64.b64encode(RAW_KEY).decode()


def test_testsecret_decodes_like_node() -> None:
    assert node_base64_decode("testsecret") == bytes.fromhex("b5eb2db1e72b7a")
    assert decode_secret("testsecret") == bytes.fromhex("b5eb2db1e72b7a")


def test_lenient_decode_matches_strict_decode_on_valid_input() -> None:
    rng = random.Random(7)
    for n in range(0, 40):
        raw = bytes(rng.randrange(256) for _ in range(n))
        std = base64.b64encode(raw).decode()
        url = base64.urlsafe_b64encode(raw).decode()
        assert node_base64_decode(std) == raw
        assert node_base64_decode(std.rstrip("=")) == raw  # missing padding
        assert node_base64_decode(url.rstrip("=")) == raw  # URL-safe alphabet
        assert node_base64_decode(" \n".join([std[:3], std[3:]])) == raw  # junk skipped


def test_lenient_decode_quirks() -> None:
    assert node_base64_decode("aGVsbG8=d29ybGQ=") == b"hello"  # stops at the first '='
    assert node_base64_decode("aGV*sbG8!") == b"hello"  # junk ignored
    assert node_base64_decode("Y") == b""  # a lone trailing character yields nothing
    assert node_base64_decode("") == b""
    assert decode_secret(None) == b""
    assert decode_secret("") == b""


def test_whsec_prefix_is_stripped() -> None:
    assert decode_secret("whsec_" + B64_KEY) == RAW_KEY
    assert decode_secret(B64_KEY) == RAW_KEY


def _post(settings_env: dict[str, str], url: str, body: JsonBody, webhook_id: str) -> bool:
    async def go() -> bool:
        d = WebhookDispatcher(make_settings(**settings_env))
        await d.start()
        fut = await d.send_prompt(url, body, webhook_id)
        ok = await fut
        await d.close(1)
        return ok

    return asyncio.run(go())


RESULT: dict[str, Any] = {
    "id": "job-1",
    "prompt": {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "job-1_x"}}},
    "images": ["https://bucket.example/job-1_x_00001_.png"],
    "filenames": ["job-1_x_00001_.png"],
    "stats": {"total_time": 12, "comfy_execution": {"start": 1, "end": 5, "duration": 4}},
    "credentials": [{"url_pattern": "*", "auth": {"type": "bearer", "token": "s3cr3t"}}],
}


@pytest.mark.parametrize("secret", [B64_KEY, "whsec_" + B64_KEY, "testsecret"])
def test_v2_complete_signature_verifies(receiver: Any, secret: str) -> None:
    r: Receiver = receiver()
    assert _post({"WEBHOOK_SECRET": secret}, r.url + "/hook", v2_complete_body(RESULT), "job-1")
    (req,) = r.wait_for(1)
    assert req.path == "/hook"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["webhook-id"] == "job-1"
    payload = Webhook(secret).verify(req.body, req.headers)
    assert list(payload)[:2] == ["type", "timestamp"]
    assert payload["type"] == "prompt.complete"
    assert payload["timestamp"].endswith("Z")
    datetime.fromisoformat(payload["timestamp"].replace("Z", "+00:00"))
    assert {k: payload[k] for k in ("id", "prompt", "images", "filenames", "stats")} == {
        k: RESULT[k] for k in ("id", "prompt", "images", "filenames", "stats")
    }
    assert "credentials" not in payload
    assert b"s3cr3t" not in req.body


def test_wrong_secret_does_not_verify(receiver: Any) -> None:
    r: Receiver = receiver()
    assert _post({"WEBHOOK_SECRET": B64_KEY}, r.url, v2_complete_body(RESULT), "job-1")
    (req,) = r.wait_for(1)
    with pytest.raises(Exception, match="signature"):
        Webhook(base64.b64encode(b"another key").decode()).verify(req.body, req.headers)


def test_no_secret_signs_with_empty_key_like_comfyui_api(receiver: Any) -> None:
    r: Receiver = receiver()
    assert _post({}, r.url, v2_failed_body(id="j", prompt={}, error={"error": "x"}), "j")
    (req,) = r.wait_for(1)
    msg = f"j.{req.headers['webhook-timestamp']}.".encode() + req.body
    expected = base64.b64encode(hmac.new(b"", msg, hashlib.sha256).digest()).decode()
    assert req.headers["webhook-signature"] == "v1," + expected


def open_paths() -> set[str]:
    """The files this process has open (``/proc/self/fd``)."""
    found: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
    return found


def test_v1_output_streams_file_held_by_path(receiver: Any, tmp_path: Path) -> None:
    """The body holds the file's path, not an open file (a delivery waiting for its receiver
    holds no descriptor); ``on_close`` runs once it was delivered."""
    data = os.urandom(3 * 1024 * 1024 + 1)  # several chunks, not a multiple of 3
    path = tmp_path / "job-2_x_00001_.png"
    path.write_bytes(data)
    closed: list[bool] = []
    body = v1_output_body(
        id="job-2",
        filename=path.name,
        prompt={"p": 1},
        stats={"total_time": 3},
        image_path=path,
        on_close=lambda: closed.append(True),
    )
    assert body.static is None
    assert str(path) not in open_paths()
    r: Receiver = receiver()
    assert _post({"WEBHOOK_SECRET": B64_KEY}, r.url, body, "job-2")
    assert closed == [True]
    assert str(path) not in open_paths()
    (req,) = r.wait_for(1)
    assert int(req.headers["content-length"]) == len(req.body) == body.length
    assert "chunked" not in req.headers.get("transfer-encoding", "")
    payload = Webhook(B64_KEY).verify(req.body, req.headers)
    assert list(payload) == ["event", "image", "id", "filename", "prompt", "stats"]
    assert payload["event"] == "output.complete"
    assert base64.b64decode(payload["image"]) == data
    assert (payload["id"], payload["filename"], payload["prompt"], payload["stats"]) == (
        "job-2",
        path.name,
        {"p": 1},
        {"total_time": 3},
    )


def test_failure_bodies() -> None:
    err = {
        "error": "Error in node 3 (KSampler): RuntimeError: boom",
        "node_id": "3",
        "node_type": "KSampler",
        "exception_type": "RuntimeError",
        "exception_message": "boom",
    }
    v1 = json.loads(v1_failed_body(id="a", prompt={"n": 1}, error=err).read())
    assert v1 == {"event": "prompt.failed", "id": "a", "prompt": {"n": 1}, "error": err["error"]}
    v1s = json.loads(v1_failed_body(id="a", prompt={}, error="Failed to queue").read())
    assert v1s["error"] == "Failed to queue"
    v2 = json.loads(v2_failed_body(id="a", prompt={"n": 1}, error=err).read())
    assert list(v2) == ["type", "timestamp", "id", "prompt", "error"]
    assert v2["type"] == "prompt.failed"
    assert v2["error"] == err


def test_json_body_is_compact_utf8_like_json_stringify() -> None:
    body = JsonBody({"a": [1, 2], "é": "ü", "n": None})
    assert body.read() == '{"a":[1,2],"é":"ü","n":null}'.encode()
    assert body.length == len(body.read())
