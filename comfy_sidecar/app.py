"""Litestar app factory: routes, error bodies and OpenAPI wiring, nothing else.

Every error body is JSON with ``error`` (what is wrong) and, for a caller's mistake, ``location``
(which field, e.g. ``prompt.3.inputs.image`` or ``convert_output.options.effort``).
HTTP statuses of errors are decided here and nowhere else: :data:`STATUS` maps each domain error
class (:mod:`comfy_sidecar.errors`) and each storage error class to one status.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from comfy_sidecar import __version__
from comfy_sidecar.errors import (
    Conflict,
    ExecutionFailed,
    InputError,
    Interrupted,
    NotFound,
    Overloaded,
    SidecarError,
    TimedOut,
    Unavailable,
    UpstreamFailed,
)
from comfy_sidecar.locations import msgspec_location
from comfy_sidecar.routes.jobs import ROUTES as JOB_ROUTES
from comfy_sidecar.routes.models import download, download_status, models
from comfy_sidecar.routes.probes import health, ready
from comfy_sidecar.routes.prompt import interrupt, prompt
from comfy_sidecar.routes.workflows import workflow_route
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

if TYPE_CHECKING:
    from comfy_sidecar.service import Sidecar

log = logging.getLogger("comfy_sidecar.app")


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
    except (msgspec.DecodeError, AttributeError):
        pass
    return location


def _validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[dict[str, Any]]:
    """Re-decode the body with msgspec to name the exact field (Litestar drops node ids)."""
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
    return Response({"error": error, "location": location}, status_code=400)


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
    Unavailable: 503,
    TimedOut: 504,
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


def _sidecar_error(_: Request[Any, Any, Any], exc: SidecarError) -> Response[dict[str, Any]]:
    status = status_of(exc)
    return Response(exc.body(), status_code=status, headers=HEADERS.get(status, {}))


def _storage_error(_: Request[Any, Any, Any], exc: StorageError) -> Response[dict[str, Any]]:
    status = status_of(exc)
    return Response({"error": str(exc)}, status_code=status, headers=HEADERS.get(status, {}))


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {"error": str(exc.detail)}
    if exc.status_code == 400:
        body["location"] = "body"
    return Response(body, status_code=exc.status_code, headers=exc.headers or {})


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return Response({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


@get("/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_json(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The OpenAPI document (also at ``/docs/openapi.json``)."""
    schema: dict[str, Any] = request.app.openapi_schema.to_schema()
    return schema


DESCRIPTION = (
    "A drop-in, Python re-creation of SaladTechnologies/comfyui-api: it supervises ComfyUI and "
    "serves a stateless API. Every error body is JSON with `error` and, for a caller's mistake, "
    "`location` naming the field."
)


def create_app(sidecar: Sidecar) -> Litestar:
    """Build the ASGI app for ``sidecar`` (reachable in handlers as ``state.sidecar``)."""
    settings = sidecar.settings
    return Litestar(
        route_handlers=[
            health,
            ready,
            openapi_json,
            prompt,
            interrupt,
            download,
            download_status,
            models,
            *JOB_ROUTES,
            *(
                workflow_route(wf, settings.markdown_schema_descriptions)
                for wf in sidecar.workflows
            ),
        ],
        state=State({"sidecar": sidecar}),
        dependencies={"jobs": Provide(lambda: sidecar.jobs, sync_to_thread=False)},
        request_max_body_size=settings.max_body_size_mb * 1024 * 1024,
        exception_handlers={
            ValidationException: _validation_error,
            SidecarError: _sidecar_error,
            StorageError: _storage_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        openapi_config=OpenAPIConfig(
            title="comfy-sidecar",
            version=__version__,
            description=DESCRIPTION,
            path="/docs",
            render_plugins=[SwaggerRenderPlugin(path="/")],
        ),
        logging_config=None,
        debug=False,
    )
