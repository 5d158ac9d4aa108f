"""Where HTTP statuses are decided, once: :data:`STATUS` maps each domain error class
(:mod:`comfy_sidecar.errors`) and each storage error class to one status, and the app's
exception handlers (:func:`exception_handlers`) answer every error as JSON ``{"error",
"location"?, ...}`` (``location`` names the field of a caller's mistake, e.g.
``prompt.3.inputs.image``). The Comfy API v2 router answers in its own envelope from the same
map (:mod:`comfy_sidecar.http.adapters.comfy_v2.errors`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, MutableMapping
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from comfy_sidecar.errors import (
    AssetUrlRefused,
    Conflict,
    ExecutionFailed,
    IdempotencyKeyReuse,
    InputError,
    Interrupted,
    MissingAsset,
    NotFound,
    OutputsTooLarge,
    Overloaded,
    PayloadTooLarge,
    SidecarError,
    TimedOut,
    Unavailable,
    UpstreamFailed,
    internal_message,
)
from comfy_sidecar.pipeline.preprocess import MAX_NESTING_DEPTH
from comfy_sidecar.schemas.locations import msgspec_location, nesting_location
from comfy_sidecar.storage.errors import (
    AuthError,
    BackendError,
    BadRequestError,
    CacheConflictError,
    DiskFullError,
    NotFoundError,
    OutputMissingError,
    StorageError,
    SupersededError,
)

log = logging.getLogger("comfy_sidecar.app")

ExceptionHandlers = MutableMapping[
    int | type[Exception], Callable[[Request[Any, Any, Any], Any], Response[Any]]
]
"""What Litestar takes as ``exception_handlers``."""


def _node_location(body: bytes, location: str) -> str:
    """msgspec writes dict keys as ``[...]``: find which prompt node fails, by id."""
    from comfy_sidecar.schemas import PromptNode

    try:
        nodes = msgspec.json.decode(body).get("prompt", {})
        for node_id, node in nodes.items():
            try:
                msgspec.convert(node, PromptNode)
            except msgspec.ValidationError:
                return location.replace("prompt[...]", f"prompt.{node_id}", 1)
    except (msgspec.DecodeError, AttributeError, RecursionError):
        pass
    return location


def validation_body(request: Request[Any, Any, Any], exc: ValidationException) -> dict[str, Any]:
    """``{"error", "location"}`` of a request Litestar refused: the body re-decoded with
    msgspec to name the exact field (Litestar drops node ids)."""
    error, location = str(exc.detail), ""
    extra = exc.extra if isinstance(exc.extra, list) else []
    if extra and isinstance(extra[0], dict):
        error = str(extra[0].get("message", error))
        location = str(extra[0].get("key", ""))
    try:
        annotation = request.route_handler.parsed_fn_signature.parameters["data"].annotation
        body = request._connection_state.body  # cached by Litestar when it read the body
        if isinstance(body, bytes):
            msgspec.json.decode(body, type=annotation)
    except msgspec.ValidationError as decode_error:
        error, location = msgspec_location(str(decode_error))
        if location.startswith("prompt[...]") and isinstance(body, bytes):
            location = _node_location(body, location)
    except msgspec.DecodeError as decode_error:
        error, location = f"the body is not valid JSON: {decode_error}", "body"
    except Exception:
        pass
    if location in ("", "data"):
        location = "body"
    return {"error": error, "location": location}


def _validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
    return Response(validation_body(request, exc), status_code=400)


#: The HTTP status of each error class; a class not listed takes its nearest listed base's.
STATUS: dict[type[Exception], int] = {
    # the domain errors (comfy_sidecar.errors)
    InputError: 400,  # with ValidationFailed, ComfyUI's own validation
    NotFound: 404,
    Conflict: 409,
    Interrupted: 499,
    ExecutionFailed: 500,
    UpstreamFailed: 502,
    Overloaded: 429,  # MAX_QUEUE_DEPTH: a load balancer or the Salad queue tries elsewhere
    PayloadTooLarge: 413,  # an asset upload over ASSET_MAX_UPLOAD_MB (or ASSET_INLINE_MB)
    Unavailable: 503,
    TimedOut: 504,
    OutputsTooLarge: 507,  # only ever a job's error body: the job's outputs had no room
    # assets (Comfy API v2); AssetNotFound and BlobNotFound are 404 as NotFound, HashMismatch
    # 409 as Conflict
    MissingAsset: 422,  # a core/ASSET reference that is malformed or names no asset
    AssetUrlRefused: 403,  # a signed content URL with a wrong signature, or expired
    IdempotencyKeyReuse: 422,  # an Idempotency-Key used before (keys are single-use)
    # storage errors that reach a request (an upload's is an UpstreamFailed's cause)
    BadRequestError: 400,
    AuthError: 400,
    NotFoundError: 400,
    SupersededError: 409,
    CacheConflictError: 409,  # a file the cache did not make is where a link should go
    OutputMissingError: 500,
    DiskFullError: 507,  # the sidecar's disk, not the caller's mistake
    BackendError: 502,
    StorageError: 502,
}

#: Headers added to every error answer with that status.
HEADERS: dict[int, dict[str, str]] = {429: {"retry-after": "1"}, 503: {"retry-after": "1"}}


def status_of(exc: Exception) -> int:
    """The HTTP status for ``exc``: :data:`STATUS` of its class or nearest listed base class;
    an :class:`UpstreamFailed` with a ``cause`` takes the cause's status; 500 otherwise."""
    if isinstance(exc, UpstreamFailed) and exc.cause is not None:
        return status_of(exc.cause)
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def headers_of(status: int, exc: Exception | None = None) -> dict[str, str]:
    """The headers of an error answer with ``status``: :data:`HEADERS`, with ``Retry-After``
    the error's own ``retry_after_s`` when it has one (a key's quota: until its minute's
    window frees a place)."""
    headers = dict(HEADERS.get(status, {}))
    retry = getattr(exc, "retry_after_s", None)
    if isinstance(retry, int | float) and retry > 0:
        headers["retry-after"] = str(max(1, math.ceil(retry)))
    return headers


def _sidecar_error(_: Request[Any, Any, Any], exc: SidecarError) -> Response[dict[str, Any]]:
    status = status_of(exc)
    return Response(exc.body(), status_code=status, headers=headers_of(status, exc))


def _storage_error(_: Request[Any, Any, Any], exc: StorageError) -> Response[dict[str, Any]]:
    status = status_of(exc)
    return Response({"error": str(exc)}, status_code=status, headers=HEADERS.get(status, {}))


#: Paths whose errors answer in the Comfy API v2 envelope even when no route matched them
#: (404, 405: the v2 router's own handlers never see those).
ENVELOPE_PREFIX = "/api/v2/"

#: The v2 ``code`` of a status, when the error names none (comfy_low's ErrorEnvelope codes).
V2_CODE_BY_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    416: "range_not_satisfiable",
    422: "invalid_request",
    429: "queue_full",  # a key's quota: RateLimited.code, rate_limited
    499: "canceled",
    500: "internal_error",
    502: "upstream_failed",
    503: "unavailable",
    504: "timeout",
    507: "insufficient_storage",
}


def envelope(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Comfy API v2 error body: ``{"error": {"code", "message", "details"}}``."""
    return {"error": {"code": code, "message": message, "details": details or None}}


def http_error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """The body of a framework error (no route, wrong method, no key, a bad body) at
    ``path``: the v2 envelope under :data:`ENVELOPE_PREFIX`, else ours (with ``location``
    ``body`` for a 400 and ``authorization`` for a 401)."""
    where = {400: "body", 401: "authorization"}.get(status)
    if path.startswith(ENVELOPE_PREFIX):
        details = {"location": where} if where else None
        return envelope(V2_CODE_BY_STATUS.get(status, "error"), message, details)
    body: dict[str, Any] = {"error": message}
    if where:
        body["location"] = where
    return body


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    body = http_error_body(request.url.path, exc.status_code, str(exc.detail))
    return Response(body, status_code=exc.status_code, headers=exc.headers or {})


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return Response({"error": internal_message(exc)}, status_code=500)


def _recursion_error(
    request: Request[Any, Any, Any], exc: RecursionError
) -> Response[dict[str, Any]]:
    """A body nested too deeply for msgspec's decoder (about 900 levels: it stops at Python's
    recursion limit) is the caller's mistake: 400 naming where it nests deeper than
    :data:`~comfy_sidecar.pipeline.preprocess.MAX_NESTING_DEPTH`. Any other RecursionError
    is ours (500)."""
    body = request._connection_state.body  # cached by Litestar when it read the body
    where = nesting_location(body, MAX_NESTING_DEPTH) if isinstance(body, bytes) else None
    if where is None:
        return _internal_error(request, exc)
    return Response(
        {
            "error": f"nested deeper than {MAX_NESTING_DEPTH} levels of lists and objects",
            "location": where,
        },
        status_code=400,
    )


def exception_handlers() -> ExceptionHandlers:
    """The app's exception handlers: every error body is JSON."""
    return {
        ValidationException: _validation_error,
        RecursionError: _recursion_error,
        SidecarError: _sidecar_error,
        StorageError: _storage_error,
        HTTPException: _http_error,
        Exception: _internal_error,
    }
