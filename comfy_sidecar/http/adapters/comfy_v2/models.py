"""The Comfy API v2 bodies, as ``comfy-sdk`` 0.5.0 reads them (``comfy_low/models/_generated.py``,
generated from the v2 OpenAPI document; the SDK's pydantic models are the spec).

Times are RFC 3339 strings with a zone; ``urls`` are host-relative links (the SDK resolves a
link holding ``/api/`` against the request's origin); ``url`` of an asset or output is absolute
(the SDK's model is ``AnyUrl``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "Asset",
    "ErrorBody",
    "ErrorEnvelope",
    "ExtraData",
    "Health",
    "Job",
    "JobError",
    "JobList",
    "JobListItem",
    "JobRequest",
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


class ErrorBody(msgspec.Struct, kw_only=True):
    """``error`` of the v2 error envelope: ``code`` (machine-readable: comfy-sdk maps it to its
    exception class), ``message``, ``details`` (``location``: the field at fault; ComfyUI's
    ``node_errors``; ...)."""

    code: Annotated[str, Meta(examples=["invalid_workflow"])]
    message: str
    details: dict[str, Any] | None = None


class ErrorEnvelope(msgspec.Struct, kw_only=True):
    """Every error of the v2 surface (comfy_low.models ``ErrorEnvelope``)."""

    error: ErrorBody


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
    """Execution failure detail, carried in ``job.error`` (not an HTTP error). ``details``
    (ours) carries what else the failure said: ComfyUI's ``node_errors`` when it refused the
    workflow as it ran (``code`` ``invalid_workflow``), ``exception_type``, the log tail."""

    code: str
    message: str
    node_id: str | None = None
    class_type: str | None = None
    traceback: str | None = None
    details: dict[str, Any] | None = None


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


class JobListItem(Job, kw_only=True):
    """A job in ``GET /api/v2/jobs``: the job, plus ``create_time`` and ``update_time`` (RFC
    3339; when it was submitted and when it last changed), the names comfy-sdk's
    ``JobSummary`` reads."""

    create_time: str
    update_time: str


class JobList(msgspec.Struct, kw_only=True):
    """``GET /api/v2/jobs``: newest first; ``next_cursor`` pages on (null on the last page)."""

    jobs: list[JobListItem]
    next_cursor: str | None


class ExtraData(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``extra_data`` of ``POST /api/v2/jobs``: closed, as the v2 contract's
    ``additionalProperties: false``."""

    api_key_comfy_org: Annotated[
        str,
        Meta(
            min_length=1,
            description="The Comfy API key partner (API) nodes authenticate with: sent to "
            "ComfyUI with the prompt, never stored with the job, shown or logged.",
        ),
    ]


class JobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /api/v2/jobs``."""

    workflow: Annotated[
        Any,
        Meta(
            description="The API-format graph (node id -> {class_type, inputs}); "
            "`core/ASSET` references stand where a file name goes.",
            examples=[
                {
                    "1": {
                        "class_type": "EmptyImage",
                        "inputs": {"width": 256, "height": 256, "batch_size": 1, "color": 0},
                    },
                    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                    "3": {
                        "class_type": "SaveImage",
                        "inputs": {"images": ["2", 0], "filename_prefix": "v2"},
                    },
                }
            ],
        ),
    ]
    extra_data: ExtraData | None = None
    metadata: Annotated[
        Any,
        Meta(
            description="At most 16 string labels (`{key: value}`), kept with the job and "
            "filtered on by `GET /api/v2/jobs?metadata[key]=value`.",
            examples=[{"client": "acme"}],
        ),
    ] = None


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
