"""``GET /metrics``: Prometheus's text format (see :mod:`comfy_sidecar.observability.metrics`)."""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency

from comfy_sidecar.observability import metrics
from comfy_sidecar.observability.metrics import MEDIA_TYPE, PATH, Scraped


@get(PATH, tags=["probes"], summary="Prometheus metrics", media_type=MEDIA_TYPE)
async def metrics_route(scrape: NamedDependency[Scraped]) -> Response[bytes]:
    """Every metric in Prometheus text format 0.0.4 (the README's "Metrics" lists them). Open
    unless `METRICS_REQUIRE_AUTH=true`."""
    return Response(await metrics.exposition(scrape), media_type=MEDIA_TYPE)
