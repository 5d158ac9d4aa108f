"""What the Comfy API v2 job tests share: an official comfy-sdk client pointed at a sidecar
(``COMFY_BASE_URL``, as the SDK's quickstart configures it), the workflows they run, and
readers of the raw v2 surface (envelope, SSE)."""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from typing import Any

import httpx
from comfy_sdk import Comfy

from tests.conftest import Sidecar


@contextlib.contextmanager
def sdk(sidecar: Sidecar, api_key: str | None = None) -> Iterator[Comfy]:
    """A comfy-sdk client for ``sidecar`` (``COMFY_BASE_URL`` set while it is made, as the
    SDK reads it at construction)."""
    before = os.environ.get("COMFY_BASE_URL")
    os.environ["COMFY_BASE_URL"] = sidecar.url
    try:
        client = Comfy(api_key=api_key, timeout=60)
    finally:
        if before is None:
            os.environ.pop("COMFY_BASE_URL", None)
        else:
            os.environ["COMFY_BASE_URL"] = before
    with client:
        yield client


def quickstart(size: int = 256, prefix: str = "v2") -> dict[str, Any]:
    """EmptyImage -> ImageInvert -> SaveImage (the issue's figure), a random colour so
    ComfyUI's cache never serves it."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {
                "width": size,
                "height": size,
                "batch_size": 1,
                "color": random.randrange(1 << 24),
            },
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def two_outputs(blurs: int = 3, size: int = 1024) -> dict[str, Any]:
    """An early output (node 2: SaveImage of the EmptyImage) and a late one (node 9, after
    ``blurs`` ImageBlur nodes, a few tenths of a second each on both backends)."""
    color = random.randrange(1 << 24)
    prompt: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
    }
    source = "1"
    for i in range(blurs):
        node = str(3 + i)
        prompt[node] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [source, 0], "blur_radius": 31, "sigma": 5.0},
        }
        source = node
    prompt["9"] = {
        "class_type": "SaveImage",
        "inputs": {"images": [source, 0], "filename_prefix": "b"},
    }
    return prompt


def envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The v2 error envelope of ``response``, checked: ``status``, ``{"error": {code,
    message, details}}`` with ``code``; returns ``error``."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


def sse(
    client: httpx.Client, url: str, headers: dict[str, str] | None = None, **params: Any
) -> list[dict[str, Any]]:
    """Every event of an SSE stream until it ends: ``{"event", "id", "data"}`` (``data``
    decoded), comments left out."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with client.stream("GET", url, headers=headers, params=params, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    current["data"] = json.loads(current["data"])
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                current[name] = value[1:] if value.startswith(" ") else value
    return events
