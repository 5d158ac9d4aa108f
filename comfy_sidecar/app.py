"""Litestar app factory: routes, error bodies and OpenAPI wiring, nothing else.

Every error body is JSON with ``error`` (what is wrong) and, for a caller's mistake, ``location``
(which field, e.g. ``prompt.3.inputs.image`` or ``convert_output.options.effort``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from comfy_sidecar import __version__
from comfy_sidecar.locations import msgspec_location
from comfy_sidecar.pipeline.run import PipelineError
from comfy_sidecar.routes.models import download, download_status, models
from comfy_sidecar.routes.probes import health, ready
from comfy_sidecar.routes.prompt import interrupt, prompt
from comfy_sidecar.routes.workflows import workflow_route

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


def _pipeline_error(_: Request[Any, Any, Any], exc: PipelineError) -> Response[dict[str, Any]]:
    headers = {"retry-after": "1"} if exc.status == 503 else {}
    return Response(exc.body, status_code=exc.status, headers=headers)


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
            *(
                workflow_route(wf, settings.markdown_schema_descriptions)
                for wf in sidecar.workflows
            ),
        ],
        state=State({"sidecar": sidecar}),
        request_max_body_size=settings.max_body_size_mb * 1024 * 1024,
        exception_handlers={
            ValidationException: _validation_error,
            PipelineError: _pipeline_error,
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
