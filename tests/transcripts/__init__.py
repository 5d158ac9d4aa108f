"""Recordings of a real ComfyUI 0.8.0 (see README.md here), read by the tests.

``load(scenario)`` is the whole file; ``ws_frames`` the text frames in order (binary preview
frames left out); ``posted_prompts`` the ``POST /prompt`` request bodies; ``history`` the
recorded ``GET /history/{prompt_id}`` entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DIR = Path(__file__).resolve().parent


def load(scenario: str) -> dict[str, Any]:
    """``{"scenario", "client_id", "events": [...]}`` of ``<scenario>.json``."""
    data: dict[str, Any] = json.loads((DIR / f"{scenario}.json").read_text())
    return data


def ws_frames(scenario: str) -> list[dict[str, Any]]:
    """The websocket text frames ``{"type", "data"}`` in the order ComfyUI sent them."""
    return [e["ws"] for e in load(scenario)["events"] if "ws" in e and not e["ws"].get("binary")]


def posted_prompts(scenario: str) -> list[dict[str, Any]]:
    """The ``POST /prompt`` bodies (``prompt``, ``client_id``, ``prompt_id``) in order."""
    return [
        e["http"]["request"]
        for e in load(scenario)["events"]
        if "http" in e and e["http"]["method"] == "POST" and e["http"]["path"] == "/prompt"
    ]


def history(scenario: str, prompt_id: str) -> dict[str, Any]:
    """The recorded ``/history/{prompt_id}`` entry (``prompt``, ``outputs``, ``status``...)."""
    for e in load(scenario)["events"]:
        http = e.get("http")
        if http and http["method"] == "GET" and http["path"] == f"/history/{prompt_id}":
            entry: dict[str, Any] = http["response"][prompt_id]
            return entry
    raise KeyError(f"{scenario} has no /history/{prompt_id}")
