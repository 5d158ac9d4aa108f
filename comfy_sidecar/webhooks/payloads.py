"""Webhook payloads: prompt webhooks (v1 and v2) and ComfyUI frames made into system events.

Wire format copies SaladTechnologies/comfyui-api (behaviour doc B17/B18):

* Prompt webhooks: v1 ``{"event": "output.complete", "image", "id", "filename", "prompt",
  "stats"}`` per output and ``{"event": "prompt.failed", "id", "prompt", "error"}``; v2
  ``{"type": "prompt.complete", "timestamp", ...200 body}`` and ``{"type": "prompt.failed",
  "timestamp", "id", "prompt", "error"}`` with the structured error.
* System events ``{"event": "comfy.<type>" | "storage.<type>", "data", "metadata"}``; ComfyUI
  frames carry API ids (:func:`rewrite_prompt_ids`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from .body import Base64File, JsonBody

log = logging.getLogger("comfy_sidecar.webhooks")


def iso_timestamp(now: datetime | None = None) -> str:
    """UTC time as JavaScript's ``Date.toISOString()`` writes it: ``2026-01-02T03:04:05.678Z``."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def v1_output_body(
    *,
    id: str,
    filename: str,
    prompt: Any,
    stats: Any,
    image_path: str | os.PathLike[str],
    on_close: Callable[[], None] | None = None,
) -> JsonBody:
    """Deprecated v1 ``output.complete`` body for one output file (comfyui-api B17).

    Shape ``{"event": "output.complete", "image": <base64 of the file>, "id", "filename",
    "prompt", "stats"}``. The file is streamed from ``image_path`` when sent, so it must stay
    until the body is closed; ``on_close`` runs then (see :class:`Base64File`). Logs the
    deprecation warning comfyui-api logs. ``OSError`` if it cannot be read now.
    """
    log.warning("job %s: the `webhook` field is deprecated; use `webhook_v2`", id)
    return JsonBody(
        {
            "event": "output.complete",
            "image": Base64File(image_path, on_close),
            "id": id,
            "filename": filename,
            "prompt": prompt,
            "stats": stats,
        }
    )


def v1_failed_body(*, id: str, prompt: Any, error: str | Mapping[str, Any]) -> JsonBody:
    """Deprecated v1 ``prompt.failed`` body ``{"event": "prompt.failed", "id", "prompt", "error"}``.

    ``error`` is a string as in comfyui-api; given the structured error dict, its ``"error"``
    message is used.
    """
    log.warning("job %s: the `webhook` field is deprecated; use `webhook_v2`", id)
    message = str(error.get("error", error)) if isinstance(error, Mapping) else error
    return JsonBody({"event": "prompt.failed", "id": id, "prompt": prompt, "error": message})


def v2_complete_body(result: Mapping[str, Any], *, timestamp: str | None = None) -> JsonBody:
    """v2 ``prompt.complete`` body: ``{"type": "prompt.complete", "timestamp", **result}``.

    ``result`` is the sync 200 body (``id, prompt, images, filenames, stats``; ``images`` holds
    base64 strings, upload URLs, or :class:`Base64File` objects to stream). A ``credentials`` key
    is never sent (comfyui-api echoes it: W-S3). ``timestamp`` defaults to now (ISO-8601).
    """
    body: dict[str, Any] = {"type": "prompt.complete", "timestamp": timestamp or iso_timestamp()}
    body.update((k, v) for k, v in result.items() if k != "credentials")
    return JsonBody(body)


def v2_failed_body(
    *, id: str, prompt: Any, error: Mapping[str, Any] | str, timestamp: str | None = None
) -> JsonBody:
    """v2 failure body ``{"type": "prompt.failed", "timestamp", "id", "prompt", "error"}``.

    ``error`` is the structured error the sync call would have answered, e.g. ``{"error": msg,
    "node_id", "node_type", "exception_type", "exception_message"}`` (comfyui-api sends only a
    generic string here: W-B9).
    """
    return JsonBody(
        {
            "type": "prompt.failed",
            "timestamp": timestamp or iso_timestamp(),
            "id": id,
            "prompt": prompt,
            "error": error,
        }
    )


def rewrite_prompt_ids(
    frame: Mapping[str, Any], api_id_for: Callable[[str], str | None]
) -> tuple[dict[str, Any], str | None]:
    """Copy of a ComfyUI frame ``{"type", "data"}`` with ComfyUI prompt ids replaced by API ids.

    Rewrites ``data.prompt_id`` and the ``prompt_id`` of each entry of ``data.nodes`` (the
    ``progress_state`` frame). Ids ``api_id_for`` does not know (returns ``None``) are kept, as
    comfyui-api keeps them. The input is not modified. Returns ``(frame, api id or ComfyUI id of
    data.prompt_id or None)``.
    """
    out = dict(frame)
    data = frame.get("data")
    if not isinstance(data, Mapping):
        return out, None
    new_data = dict(data)
    seen: dict[str, str] = {}

    def mapped(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value not in seen:
            seen[value] = api_id_for(value) or value
        return seen[value]

    key: str | None = None
    if "prompt_id" in new_data:
        new_data["prompt_id"] = mapped(new_data["prompt_id"])
        if isinstance(new_data["prompt_id"], str):
            key = new_data["prompt_id"]
    nodes = new_data.get("nodes")
    if isinstance(nodes, Mapping):
        new_data["nodes"] = {
            k: (
                {**v, "prompt_id": mapped(v["prompt_id"])}
                if isinstance(v, Mapping) and "prompt_id" in v
                else v
            )
            for k, v in nodes.items()
        }
    out["data"] = new_data
    return out, key
