"""The sidecar's domain errors: what went wrong, by meaning, with the JSON body's fields.

No class here knows an HTTP status: :mod:`comfy_sidecar.http.app` maps classes to statuses once, in
its exception handlers (the way httpx keeps transport errors apart from responses). Every body
is ``{"error": message, "location": ..., **fields}``, ``location`` only when one was given::

    raise InputError("expected a string", "prompt.3.inputs.image", id=job_id)
    # -> 400 {"error": "expected a string", "location": "prompt.3.inputs.image", "id": "..."}
"""

from __future__ import annotations

from typing import Any, ClassVar


class SidecarError(Exception):
    """Base of the domain errors. ``message`` says what is wrong in words; ``location`` names
    the request field at fault (``prompt.3.inputs.image``, ``id``, ``url``), when there is
    one; ``fields`` are further body fields, in order (``id``, ``node_id``, ...)."""

    def __init__(self, message: str, *, location: str | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.location = location
        self.fields = fields

    def body(self) -> dict[str, Any]:
        """The JSON body: ``error``, then ``location`` (when given), then ``fields``."""
        body: dict[str, Any] = {"error": self.message}
        if self.location is not None:
            body["location"] = self.location
        body.update(self.fields)
        return body


class InputError(SidecarError):
    """A caller's mistake: a bad field value, a download that failed, a prompt without an
    output node. ``location`` names the field (required)."""

    location: str

    def __init__(self, message: str, location: str, **fields: Any) -> None:
        super().__init__(message, location=location, **fields)


class ValidationFailed(InputError):
    """ComfyUI's validation refused the prompt (its ``POST /prompt`` answered 400): fields
    ``id``, ``comfyui_error`` (ComfyUI's ``error``) and ``node_errors``; ``location`` is
    ``prompt.<node>.inputs.<input>``, ``prompt.<node>`` or ``prompt``."""


class NotFound(SidecarError):
    """What the request names does not exist (a download key)."""


class Conflict(SidecarError):
    """The request collides with existing state: a job id in use, a file the cache did not
    make where a link should go."""


class Interrupted(SidecarError):
    """The job was interrupted (``POST /interrupt``): fields ``id`` and, when ComfyUI said
    where, ``node_id`` and ``node_type``."""


class ExecutionFailed(SidecarError):
    """The job ran but produced no result: ComfyUI's execution error (fields ``id``,
    ``node_id``, ``node_type``, ``exception_type``, ``exception_message``, ``traceback``,
    ``comfyui_log_tail``), or an output it reported that cannot be read (``id``). ComfyUI's text
    in it has its server paths scrubbed (:mod:`comfy_sidecar.pipeline.serverpaths`)."""


class UpstreamFailed(SidecarError):
    """A backend the request depends on failed: an output upload, ComfyUI's model lookup for a
    workflow. ``cause``, when given, is the storage error behind it; the app answers with the
    status of that error's class (a refused credential is the caller's, a later upload to the
    same URL supersedes this one) instead of the status of this class."""

    def __init__(
        self,
        message: str,
        *,
        cause: Exception | None = None,
        location: str | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message, location=location, **fields)
        self.cause = cause


class Unavailable(SidecarError):
    """The sidecar cannot take the work now: ComfyUI not ready, not answering or gone while
    the job ran, the sidecar draining, a feature missing from this build. Worth a retry.
    A job's body says why in ``reason``: ``comfyui_exited``, ``comfyui_hung``,
    ``comfyui_stalled`` (ComfyUI lost the running job; with ``comfyui_log_tail``) or
    ``out_of_memory`` (ComfyUI's out-of-memory error; the job may fit on another worker)."""


class Overloaded(SidecarError):
    """The sidecar's queue is full (MAX_QUEUE_DEPTH): try again later or elsewhere, after
    ``retry_after_s`` seconds (the ``Retry-After`` header)."""

    retry_after_s: int = 1


class RateLimited(Overloaded):
    """An API key is past one of its quotas (``API_KEYS_FILE``): fields ``key`` (its name),
    ``reason`` (the quota: ``max_concurrent_jobs``, ``jobs_per_minute`` or ``max_queue``),
    ``limit`` and ``retry_after_s`` (seconds until it may succeed: until the minute's window
    frees a place, or a small constant for the others; the ``Retry-After`` header).

    The hook of the Comfy API v2 envelope: ``code`` is ``rate_limited`` there (the class's own
    ``code``, as the asset errors carry theirs); the status is 429, as :class:`Overloaded`."""

    code: ClassVar[str] = "rate_limited"

    def __init__(
        self, message: str, *, key: str, reason: str, limit: int, retry_after_s: int
    ) -> None:
        super().__init__(message, key=key, reason=reason, limit=limit, retry_after_s=retry_after_s)
        self.reason = reason
        self.retry_after_s = max(1, retry_after_s)


class OutputsTooLarge(SidecarError):
    """A shared-queue job's outputs exceed JOB_INLINE_OUTPUT_MB and have nowhere else to go
    (the job names no upload target and JOB_OUTPUT_URL is unset): the job fails with this
    instead of losing them (fields ``id``, ``size_bytes``)."""


class PayloadTooLarge(SidecarError):
    """A request body (an asset upload) is larger than the sidecar takes: ASSET_MAX_UPLOAD_MB,
    or, with JOB_QUEUE_URL and nowhere but Redis to keep asset bytes, ASSET_INLINE_MB (v2
    ``payload_too_large``). Field ``limit_bytes``."""

    code: ClassVar[str] = "payload_too_large"


class TimedOut(SidecarError):
    """The job ran longer than PROMPT_TIMEOUT_S and was interrupted (field ``id``)."""


# --- assets (comfy_sidecar.assets; the Comfy API v2 surface, issue 22) -----------------------
# ``code`` is the v2 error envelope's ``error.code`` (comfy_low.models.ErrorEnvelope's core
# codes); the status is still decided at the edge.


class AssetNotFound(NotFound):
    """No asset with this id is kept (never uploaded, deleted, expired or evicted)."""

    code: ClassVar[str] = "not_found"


class BlobNotFound(NotFound):
    """``from-hash`` named bytes the asset store does not hold (v2 ``blob_not_found``)."""

    code: ClassVar[str] = "blob_not_found"


class HashMismatch(Conflict):
    """The uploaded bytes' blake3 differs from the ``expected_hash`` the client declared
    (v2 ``hash_mismatch``); nothing was kept. Fields ``expected_hash`` and ``hash``."""

    code: ClassVar[str] = "hash_mismatch"


class MissingAsset(InputError):
    """A ``core/ASSET`` reference in a workflow is malformed or names no kept asset
    (v2 ``missing_asset``). ``location`` is the first bad one
    (``workflow.<node>.inputs.<field>``); field ``missing`` lists every bad location."""

    code: ClassVar[str] = "missing_asset"


class IdempotencyKeyReuse(InputError):
    """An ``Idempotency-Key`` already used for this kind of request in the last 24 hours (or
    in use by a request still running): keys are single-use, a reuse is refused, never
    replayed (v2 ``idempotency_key_reuse``; comfy-sdk's ``IdempotencyKeyReuse``)."""

    code: ClassVar[str] = "idempotency_key_reuse"


class AssetUrlRefused(SidecarError):
    """A signed asset content URL whose signature is wrong, or whose ``exp`` has passed or
    is malformed. Field ``reason``: ``expired`` or ``bad_signature``."""

    code: ClassVar[str] = "forbidden"


def internal_message(exc: BaseException) -> str:
    """The ``error`` of a 500 for an unexpected exception: its class and, for an OSError,
    its reason (``internal error: OSError: No space left on device``). Never its ``str()``,
    which may name a server path (OSError's file name, ...): the log has the traceback."""
    what = type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        what = f"{what}: {exc.strerror}"
    return f"internal error: {what} (see the sidecar's log)"
