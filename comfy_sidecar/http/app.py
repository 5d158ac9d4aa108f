"""Litestar app factory: routes, error bodies and OpenAPI wiring, nothing else.

Every error body is JSON with ``error`` (what is wrong) and, for a caller's mistake, ``location``
(which field, e.g. ``prompt.3.inputs.image`` or ``convert_output.options.effort``).
HTTP statuses of errors are decided here and nowhere else: :data:`STATUS` maps each domain error
class (:mod:`comfy_sidecar.errors`) and each storage error class to one status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec
from litestar import Litestar, Request, Response, Router, get
from litestar.datastructures import CacheControlHeader, State
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components
from litestar.static_files import create_static_files_router

from comfy_sidecar import __version__
from comfy_sidecar.errors import (
    AssetUrlRefused,
    Conflict,
    ExecutionFailed,
    InputError,
    Interrupted,
    MissingAsset,
    NotFound,
    OutputsTooLarge,
    Overloaded,
    SidecarError,
    TimedOut,
    Unavailable,
    UpstreamFailed,
    internal_message,
)
from comfy_sidecar.http.adapters import aidock, modal_jobs, modal_simple
from comfy_sidecar.http.apikeys import ApiKeys
from comfy_sidecar.http.auth import SECURITY, SECURITY_SCHEMES, ApiKeyMiddleware, open_paths
from comfy_sidecar.http.routes.jobs import ROUTES as JOB_ROUTES
from comfy_sidecar.http.routes.metrics import metrics_route
from comfy_sidecar.http.routes.models import ModelDownloads, download, download_status, models
from comfy_sidecar.http.routes.probes import health, ready
from comfy_sidecar.http.routes.prompt import interrupt, prompt
from comfy_sidecar.http.routes.workflows import WorkflowHost, workflow_route
from comfy_sidecar.observability import metrics
from comfy_sidecar.observability.logs import bind_traceparent
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

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Receive, Scope, Send

    from comfy_sidecar.comfy.client import ComfyClient
    from comfy_sidecar.comfy.health import Health
    from comfy_sidecar.config import Settings
    from comfy_sidecar.jobs.backend import JobBackend
    from comfy_sidecar.jobs.lifecycle import JobLifecycle
    from comfy_sidecar.observability.metrics import Scraped
    from comfy_sidecar.pipeline.staging import Staging
    from comfy_sidecar.storage import Storage

log = logging.getLogger("comfy_sidecar.app")

T = TypeVar("T")


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
    OutputsTooLarge: 507,  # only ever a job's error body: the job's outputs had no room
    # assets (Comfy API v2); AssetNotFound and BlobNotFound are 404 as NotFound, HashMismatch
    # 409 as Conflict
    MissingAsset: 422,  # a core/ASSET reference that is malformed or names no asset
    AssetUrlRefused: 403,  # a signed content URL with a wrong signature, or expired
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
    elif exc.status_code == 401:  # comfy_sidecar.http.auth: no API key, or a wrong one
        body["location"] = "authorization"
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


@get("/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_json(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The OpenAPI document (also at ``/docs/openapi.json``)."""
    schema: dict[str, Any] = request.app.openapi_schema.to_schema()
    return schema


# --- /docs without the internet: Swagger UI's files from the swagger-ui-py package ------------

#: Where /docs loads Swagger UI's files from (served by the sidecar, no CDN).
DOCS_ASSETS_PATH = "/docs/assets"
#: The files /docs needs, from the package's ``swagger_ui/static`` (also what build.spec freezes).
DOCS_ASSETS = (
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "swagger-ui.css",
    "favicon-32x32.png",
)


def docs_assets_dir() -> str:
    """The directory holding :data:`DOCS_ASSETS`: ``swagger_ui/static`` of the swagger-ui-py
    package, found without importing it (it would import Jinja); in the frozen binary the
    same relative directory under the bundle. ``RuntimeError`` when it is missing."""
    import importlib.util
    import os
    import sys

    bundle = getattr(sys, "_MEIPASS", None)
    if bundle is not None:
        directory = os.path.join(bundle, "swagger_ui", "static")
    else:
        spec = importlib.util.find_spec("swagger_ui")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the swagger-ui-py package is not installed (needed for /docs)")
        directory = os.path.join(next(iter(spec.submodule_search_locations)), "static")
    if not os.path.isfile(os.path.join(directory, DOCS_ASSETS[0])):
        raise RuntimeError(f"Swagger UI's files are missing from {directory}")
    return directory


def _swagger_plugin() -> SwaggerRenderPlugin:
    base = DOCS_ASSETS_PATH
    return SwaggerRenderPlugin(
        path="/",
        js_url=f"{base}/swagger-ui-bundle.js",
        css_url=f"{base}/swagger-ui.css",
        standalone_preset_js_url=f"{base}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{base}/favicon-32x32.png'>",
    )


def _docs_assets_router() -> Router:
    return create_static_files_router(
        path=DOCS_ASSETS_PATH,
        directories=[docs_assets_dir()],
        name="docs-assets",
        cache_control=CacheControlHeader(max_age=86400, public=True),
        include_in_schema=False,
    )


# --- request context and API keys -----------------------------------------------------------


def _trace_context(app: ASGIApp) -> ASGIApp:
    """Middleware: a W3C ``traceparent`` header tags the request's logs and webhooks
    (:func:`comfy_sidecar.observability.logs.bind_traceparent`). Not reset at the end: each
    request runs in its own task, so the binding ends with it, after the error handlers have
    logged."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope.get("headers", ()):
            if name == b"traceparent":
                bind_traceparent(value.decode("latin-1"))
                break
        await app(scope, receive, send)

    return middleware


def _protect(handlers: list[Any], keys: ApiKeys, settings: Settings) -> list[Any]:
    """``handlers`` with those outside :func:`~comfy_sidecar.http.auth.open_paths` on one router
    that needs an API key and says so in the OpenAPI document (unchanged when no key is set:
    then the API is open and one warning says so). A new route is protected by being listed in
    ``create_app``'s ``handlers``; the docs routes (``openapi_json``, the assets) stay open."""
    if not keys.enabled:
        log.warning("API_KEYS and API_KEYS_FILE are not set: the API is open to every caller")
        return handlers
    log.info("API keys required (%d configured) on every route but the probes", len(keys))
    exempt = open_paths(settings)
    open_ = [h for h in handlers if set(h.paths) <= exempt]
    protected = [h for h in handlers if not set(h.paths) <= exempt]
    router = Router(
        "/",
        route_handlers=protected,
        middleware=[ApiKeyMiddleware],
        security=SECURITY,
    )
    return [*open_, router]


DESCRIPTION = (
    "A drop-in, Python re-creation of SaladTechnologies/comfyui-api: it supervises ComfyUI and "
    "serves a stateless API. Every error body is JSON with `error` and, for a caller's mistake, "
    "`location` naming the field."
)


class ComfyClients(Protocol):
    """Where the HTTP layer gets a ComfyUI client outside jobs."""

    def client(self) -> ComfyClient: ...


class Spawner(Protocol):
    """The owner of the process's background tasks."""

    def spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]: ...


class AppServices(Protocol):
    """What the app is built from: the runtime's container
    (:class:`comfy_sidecar.runtime.container.Container`) has all of it."""

    @property
    def settings(self) -> Settings: ...
    @property
    def jobs(self) -> JobBackend: ...
    @property
    def lifecycle(self) -> JobLifecycle: ...
    @property
    def health(self) -> Health: ...
    @property
    def storage(self) -> Storage: ...
    @property
    def comfy(self) -> ComfyClients: ...
    @property
    def tasks(self) -> Spawner: ...
    @property
    def gauges(self) -> Scraped: ...
    @property
    def staging(self) -> Staging: ...
    @property
    def workflows(self) -> list[Any]: ...


def _provide(value: Any) -> Provide:
    """A dependency that is one service of the container, built once."""
    return Provide(lambda: value, sync_to_thread=False, use_cache=True)


def create_app(
    container: AppServices, warmup_prompt: Callable[[], dict[str, Any] | None] = lambda: None
) -> Litestar:
    """Build the ASGI app over ``container``'s services. Each handler declares the narrow
    services it needs by name (Litestar ``Provide``): ``jobs`` (the job backend),
    ``lifecycle`` (the job lifecycle, for ``/prompt``), ``probes`` (health), ``downloads``
    (model downloads), ``workflow_host``, ``scrape`` (the metrics' view), ``staging``
    (request files). ``warmup_prompt()`` is the warmup prompt once loaded (the workflow
    endpoints' ``ctx.warmup_checkpoint``)."""
    settings = container.settings
    api_keys = ApiKeys.from_settings(settings)
    handlers: list[Any] = [
        health,
        ready,
        prompt,
        interrupt,
        download,
        download_status,
        models,
        metrics_route,
        *JOB_ROUTES,
        *modal_jobs.ROUTES,
        *modal_simple.ROUTES,
        *aidock.ROUTES,
        *(workflow_route(wf, settings.markdown_schema_descriptions) for wf in container.workflows),
    ]
    downloads = ModelDownloads(
        container.storage, settings.model_dir, container.comfy.client, container.tasks.spawn
    )
    workflow_host = WorkflowHost(
        lambda path: container.comfy.client().get_json(path), warmup_prompt
    )
    app = Litestar(
        route_handlers=[
            openapi_json,
            _docs_assets_router(),
            *_protect(handlers, api_keys, settings),
        ],
        middleware=[_trace_context],
        state=State({"api_keys": api_keys}),
        dependencies={
            "jobs": _provide(container.jobs),
            "lifecycle": _provide(container.lifecycle),
            "probes": _provide(container.health),
            "downloads": _provide(downloads),
            "workflow_host": _provide(workflow_host),
            "scrape": _provide(container.gauges),
            "staging": _provide(container.staging),
        },
        request_max_body_size=settings.max_body_size_mb * 1024 * 1024,
        exception_handlers={
            ValidationException: _validation_error,
            RecursionError: _recursion_error,
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
            render_plugins=[_swagger_plugin()],
            components=Components(
                security_schemes=dict(SECURITY_SCHEMES) if api_keys.enabled else None
            ),
        ),
        logging_config=None,
        debug=False,
    )
    return metrics.instrument(app)  # http_server_request_duration_seconds, 404s included
