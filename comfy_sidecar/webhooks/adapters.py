"""The job adapters' bodies in their own formats: what their webhooks send once a job ended, and
the result objects their routes answer with (one builder for both, so they never drift).

Each takes a job's ``GET /jobs/{id}`` body (``JobView.body()``: plain data, statuses as their
``/api/jobs`` names) and, for webhooks, the job's
:class:`~comfy_sidecar.jobs.spec.AfterEnd`. :data:`FORMATS` maps each after-end ``kind`` to its
webhook body builder; the job lifecycle sends it from whichever replica ends the job.

- ``aidock``: ai-dock's ComfyUI API wrapper (its README): the result object ``{id, status,
  message, output: [{filename, url, type: "output", node_id, output_type}]}`` plus the
  webhook's ``extra_params``; statuses ``queued``, ``generating``, ``completed``, ``failed``.
- ``modal_jobs``: the Modal jobs API operator guide: ``job.completed`` / ``job.failed``
  (``{event, job_id, timestamp[, error]}``, no outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

__all__ = [
    "AIDOCK_STATUS",
    "FORMATS",
    "MODAL_STATUS",
    "Format",
    "aidock_message",
    "aidock_result",
    "aidock_webhook_body",
    "message_of",
    "modal_webhook_body",
]


class _After(Protocol):
    """What a body builder reads of an after-end action."""

    @property
    def extra_params(self) -> dict[str, Any]: ...


Format = Callable[[dict[str, Any], Any], dict[str, Any]]
"""``format(view, after) -> body``: the webhook body of a job whose final ``GET /jobs/{id}``
body is ``view`` (``after``: its :class:`~comfy_sidecar.jobs.spec.AfterEnd`)."""


def message_of(status: str, error: dict[str, Any] | None) -> str | None:
    """The one-line reason a job did not complete: ``Cancelled by user`` for a cancel, else
    the ``error`` of its error body; None for a job that has not failed."""
    if status == "cancelled":
        return "Cancelled by user"
    if error is None:
        return None
    return str(error.get("error", "failed"))


# --- ai-dock ----------------------------------------------------------------------------------

#: Our status -> ai-dock's.
AIDOCK_STATUS = {
    "pending": "queued",
    "in_progress": "generating",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "failed",
    "timed_out": "failed",
}
#: An output's media type -> the ComfyUI output key ai-dock's ``output_type`` names.
AIDOCK_OUTPUT_TYPE = {"image": "images", "video": "videos", "audio": "audio", "text": "text"}


def aidock_message(view: dict[str, Any]) -> str:
    """ai-dock's ``message`` for a job's body: its queue position (1-based) while it waits,
    its progress while it runs, then how it ended."""
    status = view["status"]
    if status == "pending":
        position = view.get("queue_position")
        return f"Queued for generation (position {(position or 0) + 1})"
    if status == "in_progress":
        return f"Generating: {view.get('progress') or 0.0:.0f}%"
    if status == "completed":
        return "Generation complete"
    return message_of(status, view.get("error")) or "failed"


def aidock_result(view: dict[str, Any]) -> dict[str, Any]:
    """A job's ``GET /jobs/{id}`` body (``queue_position`` set while it waits) as ai-dock's
    result object."""
    return {
        "id": view["id"],
        "status": AIDOCK_STATUS[view["status"]],
        "message": aidock_message(view),
        "output": [
            {
                "filename": o["filename"],
                "url": o.get("url"),
                "type": "output",
                "node_id": o["node_id"],
                "output_type": AIDOCK_OUTPUT_TYPE.get(o.get("media_type", ""), "files"),
            }
            for o in view.get("outputs") or []
        ],
    }


def aidock_webhook_body(view: dict[str, Any], after: _After) -> dict[str, Any]:
    """ai-dock's webhook body: the job's result object plus ``extra_params``."""
    return {**aidock_result(view), **after.extra_params}


# --- Modal jobs API ---------------------------------------------------------------------------

#: Our status -> the Modal jobs API's.
MODAL_STATUS = {
    "pending": "queued",
    "in_progress": "running",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "failed",
    "timed_out": "failed",
}


def modal_webhook_body(view: dict[str, Any], after: object = None) -> dict[str, Any]:
    """``job.completed`` / ``job.failed`` (``{event, job_id, timestamp[, error]}``) of a job
    whose final ``GET /jobs/{id}`` body is ``view`` (``after`` adds nothing here)."""
    status = view["status"]
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    body: dict[str, Any] = {
        "event": "job.completed" if status == "completed" else "job.failed",
        "job_id": view["id"],
        "timestamp": view.get("completed_at") or now,
    }
    if status != "completed":
        body["error"] = message_of(status, view.get("error"))
    return body


#: Every after-end ``kind`` and its webhook body builder.
FORMATS: dict[str, Format] = {
    "aidock": aidock_webhook_body,
    "modal_jobs": modal_webhook_body,
}
