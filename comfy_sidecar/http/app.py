"""Litestar app factory: routes, services, API keys and OpenAPI wiring, nothing else.

Every error body is JSON with ``error`` (what is wrong) and, for a caller's mistake, ``location``
(which field, e.g. ``prompt.3.inputs.image`` or ``convert_output.options.effort``). HTTP
statuses of errors are decided in :mod:`comfy_sidecar.http.errors` and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from litestar import Litestar, Request, Router, get
from litestar.datastructures import CacheControlHeader, State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components
from litestar.static_files import create_static_files_router

from comfy_sidecar import __version__
from comfy_sidecar.http.adapters import aidock, modal_jobs, modal_simple
from comfy_sidecar.http.adapters.comfy_v2 import v2_routers
from comfy_sidecar.http.adapters.comfy_v2.assets import AssetInputs
from comfy_sidecar.http.apikeys import ApiKeys
from comfy_sidecar.http.auth import (
    SECURITY,
    SECURITY_SCHEMES,
    ApiKeyMiddleware,
    caller_of,
    open_paths,
)
from comfy_sidecar.http.errors import exception_handlers
from comfy_sidecar.http.routes.jobs import ROUTES as JOB_ROUTES
from comfy_sidecar.http.routes.metrics import metrics_route
from comfy_sidecar.http.routes.models import ModelDownloads, download, download_status, models
from comfy_sidecar.http.routes.probes import health, ready
from comfy_sidecar.http.routes.prompt import interrupt, prompt
from comfy_sidecar.http.routes.workflows import WorkflowHost, workflow_route
from comfy_sidecar.jobs.visibility import CallerJobs
from comfy_sidecar.observability import metrics
from comfy_sidecar.observability.logs import bind_traceparent

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Receive, Scope, Send

    from comfy_sidecar.assets import UrlSigner
    from comfy_sidecar.assets.service import AssetService
    from comfy_sidecar.comfy.client import ComfyClient
    from comfy_sidecar.comfy.health import Health
    from comfy_sidecar.config import Settings
    from comfy_sidecar.http.idempotency import IdempotencyKeys
    from comfy_sidecar.jobs.backend import JobBackend
    from comfy_sidecar.jobs.lifecycle import JobLifecycle
    from comfy_sidecar.observability.metrics import Scraped
    from comfy_sidecar.pipeline.staging import Staging
    from comfy_sidecar.storage import Storage

log = logging.getLogger("comfy_sidecar.app")

T = TypeVar("T")


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


def _paths(handler: Any) -> set[str]:
    """The paths a route handler (or a router: its routes') answers."""
    if isinstance(handler, Router):
        return {route.path for route in handler.routes}
    return set(handler.paths)


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
    open_ = [h for h in handlers if _paths(h) <= exempt]
    protected = [h for h in handlers if not _paths(h) <= exempt]
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
    @property
    def assets(self) -> AssetService: ...
    @property
    def signer(self) -> UrlSigner: ...
    @property
    def idempotency(self) -> IdempotencyKeys: ...


def _provide(value: Any) -> Provide:
    """A dependency that is one service of the container, built once."""
    return Provide(lambda: value, sync_to_thread=False, use_cache=True)


def _caller_jobs(backend: JobBackend, owner_only: bool) -> Provide:
    """The ``jobs`` dependency: ``backend`` as the request's API key sees it
    (:class:`~comfy_sidecar.jobs.visibility.CallerJobs`: its jobs stamped with the key's
    policy; only its own visible with JOBS_VISIBLE_TO=owner)."""

    def jobs(request: Request[Any, Any, Any]) -> CallerJobs:
        return CallerJobs(backend, caller_of(request.scope), owner_only)

    return Provide(jobs, sync_to_thread=False)


def create_app(
    container: AppServices, warmup_prompt: Callable[[], dict[str, Any] | None] = lambda: None
) -> Litestar:
    """Build the ASGI app over ``container``'s services. Each handler declares the narrow
    services it needs by name (Litestar ``Provide``): ``jobs`` (the job backend),
    ``lifecycle`` (the job lifecycle, for ``/prompt``), ``probes`` (health), ``downloads``
    (model downloads), ``workflow_host``, ``scrape`` (the metrics' view), ``staging``
    (request files), ``assets`` (the v2 asset service), ``asset_inputs`` (``core/ASSET``
    references of a submitted workflow), ``signer`` (signed content URLs), ``idempotency``
    (single-use ``Idempotency-Key``). ``jobs`` is made per request: the backend as the
    request's API key sees it. ``warmup_prompt()`` is the warmup prompt once loaded (the
    workflow endpoints' ``ctx.warmup_checkpoint``)."""
    settings = container.settings
    api_keys = ApiKeys.from_settings(settings)
    metrics.keys_known(api_keys.names)
    if settings.jobs_visible_to == "owner" and not api_keys.enabled:
        log.warning("JOBS_VISIBLE_TO=owner without API keys: every caller sees every job")
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
        *v2_routers(),
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
            "jobs": _caller_jobs(container.jobs, settings.jobs_visible_to == "owner"),
            "lifecycle": _provide(container.lifecycle),
            "probes": _provide(container.health),
            "downloads": _provide(downloads),
            "workflow_host": _provide(workflow_host),
            "scrape": _provide(container.gauges),
            "staging": _provide(container.staging),
            "assets": _provide(container.assets),
            "asset_inputs": _provide(AssetInputs(container.assets, container.staging)),
            "signer": _provide(container.signer),
            "idempotency": _provide(container.idempotency),
        },
        request_max_body_size=settings.max_body_size_mb * 1024 * 1024,
        exception_handlers=exception_handlers(),
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
