"""The job model every layer above the pipeline shares: statuses, events, outputs and the one
job body, :class:`JobView`, that both job backends return and every route maps to its own API.

Status names are those of ComfyUI's own ``/api/jobs``: pending, in_progress, completed,
failed, cancelled, timed_out. Times in a view are ISO 8601 UTC strings with milliseconds;
times kept by the code are ms since the epoch.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from comfy_sidecar.errors import Interrupted, SidecarError, TimedOut, internal_message

__all__ = [
    "DifferentBody",
    "JobEvent",
    "JobLinks",
    "JobStatus",
    "JobView",
    "OutputInfo",
    "error_body",
    "iso",
    "job_links",
    "ms_of",
    "now_ms",
    "status_for",
]


class JobStatus(enum.StrEnum):
    """Where a job is (ComfyUI ``/api/jobs`` names). The last four are terminal."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        """True once the job has ended."""
        return self not in (JobStatus.PENDING, JobStatus.IN_PROGRESS)


def iso(ms: int | None) -> str | None:
    """``ms`` since the epoch as an ISO 8601 UTC timestamp with milliseconds, or None."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def ms_of(when: Any) -> int | None:
    """An ISO 8601 time of a job body as ms since the epoch (None if absent or unreadable)."""
    try:
        return int(datetime.fromisoformat(str(when)).timestamp() * 1000) if when else None
    except ValueError:
        return None


def now_ms() -> int:
    """Milliseconds since the epoch."""
    return int(time.time() * 1000)


def status_for(exc: BaseException) -> JobStatus:
    """The job status an exception ends a job with: an interrupt is ``cancelled``,
    PROMPT_TIMEOUT_S is ``timed_out``, anything else ``failed``."""
    if isinstance(exc, Interrupted):
        return JobStatus.CANCELLED
    if isinstance(exc, TimedOut):
        return JobStatus.TIMED_OUT
    return JobStatus.FAILED


def error_body(exc: BaseException, job_id: str) -> dict[str, Any]:
    """The body the API answers ``exc`` with (``/prompt``'s), for a job's ``error``."""
    if isinstance(exc, SidecarError):
        return exc.body()
    return {"error": internal_message(exc), "id": job_id}


class DifferentBody(Exception):
    """A job with this id exists with a different request body."""


class OutputInfo(msgspec.Struct, kw_only=True):
    """One output file of a job. ``url`` is the upload URL, or ``/jobs/{id}/outputs/{n}`` for a
    retained file, or None when the file was answered inline (``/prompt``) and is gone.
    ``size_bytes`` in bytes."""

    node_id: str
    filename: str
    media_type: str
    mime_type: str
    size_bytes: int
    url: str | None


class JobLinks(msgspec.Struct, kw_only=True):
    """Where to watch and cancel a job (host-relative links)."""

    self: str
    events: str
    cancel: str


def job_links(job_id: str, base_url: str = "") -> JobLinks:
    """``{self, events, cancel}`` links of a job under ``/jobs``."""
    root = f"{base_url}/jobs/{job_id}"
    return JobLinks(self=root, events=f"{root}/events", cancel=f"{root}/cancel")


@dataclass(slots=True)
class JobEvent:
    """One entry of a job's event log: ``id`` increases by one per event of the job (0 for a
    live-only ``preview``); ``data`` is the JSON text of the event's body."""

    id: int
    type: str
    data: bytes


class JobView(msgspec.Struct, kw_only=True):
    """A job as ``GET /jobs/{id}`` shows it, whichever backend keeps it: status, times (ISO
    8601), progress (the Modal jobs API's names: ``progress`` a percentage, ``progress_value``
    and ``progress_max`` the running node's steps), outputs' metadata, the error body the API
    answered with and comfyui-api's ``stats``. ``owner`` is the name of the API key that
    submitted it (absent without keys). With JOB_QUEUE_URL it also names the
    ``replica`` that ran it last and its ``attempts`` (``[{replica, started_at}]``); in-process
    both are absent."""

    id: str
    status: JobStatus
    endpoint: str
    created_at: str | None
    started_at: str | None = None
    completed_at: str | None = None
    prompt_id: str | None = None
    instance: str | None = None
    queue_position: int | None = None
    last_event_time: str | None = None
    progress: float = 0.0
    progress_value: float = 0.0
    progress_max: float = 0.0
    nodes_total: int = 0
    nodes_done: int = 0
    nodes_cached: int = 0
    current_node: str | None = None
    current_node_type: str | None = None
    urls: JobLinks | None = None
    outputs: list[OutputInfo] = []
    error: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    owner: str | msgspec.UnsetType = msgspec.UNSET
    replica: str | msgspec.UnsetType = msgspec.UNSET
    attempts: list[dict[str, Any]] | msgspec.UnsetType = msgspec.UNSET

    def body(self) -> dict[str, Any]:
        """The ``GET /jobs/{id}`` JSON body, as plain data."""
        body: dict[str, Any] = msgspec.to_builtins(self)
        return body

    def summary(self) -> dict[str, Any]:
        """A listing entry (``GET /jobs``): the body without outputs and stats, the error cut
        to its ``error`` line."""
        body = self.body()
        body.pop("outputs", None)
        body.pop("stats", None)
        if self.error is not None:
            body["error"] = {"error": self.error.get("error")}
        return body

    @property
    def ended(self) -> bool:
        """True once the job has ended."""
        return self.status.terminal


def decode_view(raw: bytes | str) -> JobView:
    """A :class:`JobView` from its JSON (as a backend stores it). Raises
    ``msgspec.DecodeError`` / ``msgspec.ValidationError``."""
    return msgspec.json.decode(raw, type=JobView)
