"""``GET /api/v2/assets/{id}/content`` for job outputs only: a stand-in for the v2 assets
module's content route, which serves uploads and outputs alike and replaces this one (drop
this module from :data:`comfy_sidecar.http.adapters.comfy_v2.ROUTES` when it lands).

The seam both use: an output's asset id is ``<job id>.<n>``
(:func:`~comfy_sidecar.http.adapters.comfy_v2.views.output_asset_id`); its metadata is
``JobBackend.get(job id).outputs[n]`` and its bytes ``JobBackend.output(job id, n)``, streamed
from wherever the backend keeps them (a file under JOBS_DIR in-process; Redis with
JOB_QUEUE_URL), so any replica serves any output. A signed URL's ``exp``/``sig`` are checked
when present (403 ``forbidden``); the API key applies as on every v2 route.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Stream

from comfy_sidecar.assets.signing import UrlSigner
from comfy_sidecar.errors import AssetNotFound
from comfy_sidecar.http.adapters.comfy_v2.models import ErrorEnvelope
from comfy_sidecar.http.adapters.comfy_v2.views import parse_output_asset_id
from comfy_sidecar.http.routes.jobs import ranged
from comfy_sidecar.jobs.backend import JobBackend

__all__ = ["ROUTES"]


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


@get(
    "/assets/{asset_id:str}/content",
    summary="An output's bytes (Comfy API v2)",
    tags=["comfy api v2"],
    responses={
        206: ResponseSpec(None, description="The requested byte range."),
        400: ResponseSpec(ErrorEnvelope, description="A malformed request."),
        403: ResponseSpec(ErrorEnvelope, description="`forbidden`: a wrong or expired signature."),
        404: ResponseSpec(ErrorEnvelope, description="`not_found`: no such output is kept."),
        416: ResponseSpec(None, description="The range starts past the end."),
    },
    description="The bytes of a job output (`<job id>.<n>`), streamed; one `Range` honoured (206).",
)
async def output_content(
    asset_id: str,
    request: Request[Any, Any, Any],
    jobs: NamedDependency[JobBackend],
    signer: NamedDependency[UrlSigner],
) -> Response[Any]:
    """``GET /api/v2/assets/{id}/content`` of an output."""
    query = request.query_params
    if "sig" in query or "exp" in query:
        signer.verify(asset_id, query.get("exp"), query.get("sig"))
    parsed = parse_output_asset_id(asset_id)
    blob = None if parsed is None else await jobs.output(*parsed)
    if blob is None:
        raise AssetNotFound(f"no asset with id {asset_id!r}", location="id")

    def stream(first: int, last: int, status: int, headers: dict[str, str]) -> Response[Any]:
        headers["content-length"] = str(max(0, last - first + 1))
        chunks = blob.chunks(first, last) if blob.size else _nothing()
        return Stream(chunks, media_type=blob.mime_type, status_code=status, headers=headers)

    return ranged(request, blob.size, blob.filename, stream)


ROUTES = [output_content]
