"""The Comfy API v2 error envelope: every error under ``/api/v2`` answers
``{"error": {"code", "message", "details"}}`` with a machine-readable ``code`` that the
official ``comfy-sdk`` maps to its exception classes (``comfy_sdk/exceptions.py``
``_BY_CODE``; ``comfy_low.models.ErrorEnvelope``).

The HTTP status is still the one :data:`comfy_sidecar.http.app.STATUS` gives each domain error
(one home), except where the v2 contract names another for the same meaning: a caller's
mistake in the body is 422 (the v2 ``invalid_workflow``, ``missing_asset``, ...), not 400.
``details`` carries the fields of our own error body (``location``, ComfyUI's
``node_errors``, ...), so nothing the other APIs tell a caller is lost here.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from comfy_sidecar.errors import (
    InputError,
    NotFound,
    Overloaded,
    SidecarError,
    Unavailable,
    ValidationFailed,
    internal_message,
)
from comfy_sidecar.http.errors import (
    V2_CODE_BY_STATUS,
    ExceptionHandlers,
    envelope,
    headers_of,
    http_error_body,
    status_of,
    validation_body,
)
from comfy_sidecar.storage.errors import StorageError

__all__ = ["V2Error", "code_of", "exception_handlers", "status_code"]

log = logging.getLogger("comfy_sidecar.app")


class V2Error(SidecarError):
    """An error the v2 surface raises with its own ``code`` and status (``status``; the
    domain errors carry theirs through :data:`~comfy_sidecar.http.errors.STATUS`)."""

    def __init__(
        self, status: int, code: str, message: str, *, location: str | None = None, **fields: Any
    ) -> None:
        super().__init__(message, location=location, **fields)
        self.status = status
        self.code = code


def code_of(exc: SidecarError, status: int) -> str:
    """The v2 ``code`` of a domain error answered with ``status``: the class's own ``code``
    (the asset errors'), ``invalid_workflow`` for ComfyUI's validation failure and a caller's
    mistake in the workflow, ``queue_full`` for a full queue (a key past its quota:
    :class:`~comfy_sidecar.errors.RateLimited`'s own code, ``rate_limited``), else the
    status's code."""
    own = getattr(exc, "code", None)
    if isinstance(own, str):
        return own
    if isinstance(exc, ValidationFailed):
        return "invalid_workflow"
    if isinstance(exc, InputError):
        where = exc.location or ""
        if where == "workflow" or where.startswith(("workflow.", "prompt")):
            return "invalid_workflow"
        return "invalid_request"
    if isinstance(exc, Overloaded):
        return "queue_full"
    if isinstance(exc, NotFound):
        return "not_found"
    if isinstance(exc, Unavailable):
        return "unavailable"
    return V2_CODE_BY_STATUS.get(status, "error")


def status_code(exc: SidecarError) -> int:
    """The status a domain error answers with under ``/api/v2``: a caller's mistake is 422
    (the contract's status for ``invalid_workflow`` and the other body checks)."""
    if isinstance(exc, V2Error):
        return exc.status
    status = status_of(exc)
    return 422 if status == 400 else status


def _sidecar_error(_: Request[Any, Any, Any], exc: SidecarError) -> Response[dict[str, Any]]:
    status = status_code(exc)
    body = exc.body()
    message = str(body.pop("error", exc.message))
    return Response(
        envelope(code_of(exc, status), message, body),
        status_code=status,
        headers=headers_of(status, exc),
    )


def _storage_error(_: Request[Any, Any, Any], exc: StorageError) -> Response[dict[str, Any]]:
    status = status_of(exc)
    status = 422 if status == 400 else status
    return Response(
        envelope(V2_CODE_BY_STATUS.get(status, "error"), str(exc)),
        status_code=status,
        headers=headers_of(status),
    )


def _validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
    """A body or parameter that does not decode: 422 ``invalid_request`` naming the field
    (the same ``location`` the other APIs' 400 gives)."""
    body = validation_body(request, exc)
    message = str(body.pop("error"))
    return Response(envelope("invalid_request", message, body), status_code=422)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    """A framework error on a v2 route, in the envelope; a body Litestar cannot decode (its
    400, e.g. malformed JSON) is a caller's mistake like any other here: 422
    ``invalid_request``."""
    status = 422 if exc.status_code == 400 else exc.status_code
    body = http_error_body(request.url.path, exc.status_code, str(exc.detail))
    return Response(body, status_code=status, headers=exc.headers or {})


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return Response(envelope("internal_error", internal_message(exc)), status_code=500)


def exception_handlers() -> ExceptionHandlers:
    """The ``/api/v2`` router's exception handlers (they take precedence over the app's)."""
    return {
        ValidationException: _validation_error,
        SidecarError: _sidecar_error,
        StorageError: _storage_error,
        HTTPException: _http_error,
        Exception: _internal_error,
    }
