"""The Comfy API v2 (``/api/v2``): the contract of Comfy-Org's official ``comfy-sdk``
(Comfy Cloud, Comfy's serverless deployments and ``comfy-api-proxy`` serve it too), as one more
thin adapter over the job model.

- :mod:`.errors`: the error envelope ``{"error": {code, message, details}}``;
- :mod:`.models`: the v2 bodies;
- :mod:`.jobs`: ``/api/v2/jobs`` (submit, list, get, workflow, cancel, events);
- :mod:`.assets`: ``/api/v2/assets`` (upload, from-hash, by-hash, get, content, delete).

Every route sits on a router of :func:`v2_routers`, whose exception handlers answer in the
envelope: one open (health, as ``GET /health`` is), one for the rest (API keys apply there as
on every other route).
"""

from __future__ import annotations

from typing import Any

from litestar import Router, get
from litestar.di import NamedDependency

from comfy_sidecar.comfy.health import Health as SidecarHealth
from comfy_sidecar.http.adapters.comfy_v2.assets import ROUTES as ASSET_ROUTES
from comfy_sidecar.http.adapters.comfy_v2.errors import exception_handlers
from comfy_sidecar.http.adapters.comfy_v2.models import Health

__all__ = ["PREFIX", "ROUTES", "v2_routers"]

#: Where the v2 surface is mounted.
PREFIX = "/api/v2"


@get(
    "/health",
    summary="Health (Comfy API v2)",
    tags=["comfy api v2"],
    sync_to_thread=False,
    description="`status: healthy` while the sidecar is live (as `GET /health`, which says why "
    "not), with its `phase`; answered without a key.",
)
def v2_health(probes: NamedDependency[SidecarHealth]) -> Health:
    """Process health: ``healthy`` or ``unhealthy`` (always 200: a v2 client reads the body)."""
    ok, _ = probes.health()
    return Health(
        status="healthy" if ok else "unhealthy", phase=probes.phase.value, version=probes.version
    )


#: The v2 routes that need a key when keys are set (every one but health); the jobs and
#: assets modules add theirs here.
ROUTES: list[Any] = [*ASSET_ROUTES]


def v2_routers() -> list[Router]:
    """The ``/api/v2`` routers, answering errors in the v2 envelope: health (open), and every
    other v2 route."""
    routers = [Router(PREFIX, route_handlers=[v2_health], exception_handlers=exception_handlers())]
    if ROUTES:
        routers.append(
            Router(PREFIX, route_handlers=list(ROUTES), exception_handlers=exception_handlers())
        )
    return routers
