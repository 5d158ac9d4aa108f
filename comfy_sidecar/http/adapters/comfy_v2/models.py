"""The Comfy API v2 bodies, as ``comfy-sdk`` 0.5.0 reads them (``comfy_low/models/_generated.py``,
generated from the v2 OpenAPI document; the SDK's pydantic models are the spec).

Times are RFC 3339 strings with a zone; ``urls`` are host-relative links (the SDK resolves a
link holding ``/api/`` against the request's origin); ``url`` of an asset or output is absolute
(the SDK's model is ``AnyUrl``).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "Asset",
    "Error",
    "ErrorEnvelope",
    "Health",
    "Job",
    "JobError",
    "JobList",
    "JobUrls",
    "JobWorkflow",
    "Output",
    "OutputType",
    "Progress",
    "V2Status",
]

V2Status = Literal["queued", "running", "succeeded", "canceling", "canceled", "failed", "expired"]
"""Lifecycle: queued -> running -> succeeded | failed | expired; a cancel moves running ->
canceling -> canceled. Terminal: succeeded, canceled, failed, expired."""

OutputType = Literal["image", "video", "audio", "text", "file", "latent"]
"""Normalized output kind; nothing silently dropped."""


class Health(msgspec.Struct, kw_only=True):
    """``GET /api/v2/health``: ``status`` ``healthy`` while the sidecar is live (as
    ``GET /health``), with its ``phase`` and ``version``."""

    status: str
    phase: str
    version: str


class Progress(msgspec.Struct, kw_only=True):
    """A complete progress snapshot (one fully re-syncs a client): ``value`` 0..1, monotonic,
    1 only at the end; node counts; the running node and its sampler ``step`` of ``steps``."""

    value: float
    nodes_done: int
    nodes_total: int
    current_node: str | None = None
    current_node_class: str | None = None
    step: int | None = None
    steps: int | None = None
    message: str | None = None


class JobError(msgspec.Struct, kw_only=True):
    """Execution failure detail, carried in ``job.error`` (not an HTTP error)."""

    code: str
    message: str
    node_id: str | None = None
    class_type: str | None = None
    traceback: str | None = None


class JobUrls(msgspec.Struct, kw_only=True):
    """Follow-up links (host-relative, with the ``/api/v2`` prefix)."""

    self: str
    events: str
    cancel: str


class Output(msgspec.Struct, kw_only=True):
    """A committed job output; outputs are assets (``id`` is the asset's)."""

    node_id: str
    name: str
    type: OutputType
    content_type: str
    size_bytes: int
    id: str
    hash: str | None
    url: str
    url_expires_at: str
    job_id: str | None = None


class Job(msgspec.Struct, kw_only=True):
    """One execution of a workflow; ``outputs`` fill in while it runs."""

    id: str
    status: V2Status
    created_at: str
    started_at: str | None
    completed_at: str | None
    expires_at: str
    queue_position: int | None
    progress: Progress | None
    outputs: list[Output]
    error: JobError | None
    urls: JobUrls
    metrics: dict[str, int | None] | None = None
    metadata: dict[str, str] | None = None


class JobList(msgspec.Struct, kw_only=True):
    """``GET /api/v2/jobs``: newest first; ``next_cursor`` pages on."""

    jobs: list[Job]
    next_cursor: str | None


class JobWorkflow(msgspec.Struct, kw_only=True):
    """``GET /api/v2/jobs/{id}/workflow``: the executed API-format graph."""

    workflow: dict[str, Any]
    format: Literal["api", "save"] = "api"


class Asset(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An asset record: an immutable blob (blake3 ``hash``, ``null`` while computed) with a
    short-lived content ``url``."""

    id: str
    hash: str | None
    size_bytes: int
    content_type: str
    created_at: str
    url: str
    url_expires_at: str
    file_path: str | None = None
    created_new: bool | None = None
    expires_at: str | None = None
    job_id: str | None = None


class Error(msgspec.Struct, kw_only=True):
    """An error's ``code`` (``invalid_request``, ``not_found``, ``missing_asset``, ...: what
    comfy-sdk maps to its exception classes), ``message`` and ``details`` (``location``
    naming the field of a caller's mistake, ...)."""

    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorEnvelope(msgspec.Struct, kw_only=True):
    """Every error under ``/api/v2``: ``{"error": {code, message, details}}``."""

    error: Error
