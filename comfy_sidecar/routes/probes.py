"""``GET /health`` and ``GET /ready`` (comfyui-api's probes, plus ``phase`` and ``detail``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Response, get
from litestar.datastructures import State

from comfy_sidecar.schemas import InstanceStatus, ProbeResponse

if TYPE_CHECKING:
    from comfy_sidecar.service import Sidecar


def _probe(sidecar: Sidecar, ok: bool, detail: str, good: str, bad: str) -> Response[ProbeResponse]:
    body = ProbeResponse(
        version=sidecar.version,
        status=good if ok else bad,
        phase=sidecar.phase.value,
        detail=detail,
        queue={"waiting": sidecar.dispatcher.waiting, "running": sidecar.dispatcher.running},
        instances=[InstanceStatus(**status) for status in sidecar.instance_status()],
    )
    headers = {} if ok else {"retry-after": "1"}
    return Response(body, status_code=200 if ok else 503, headers=headers)


@get(
    "/health",
    summary="Liveness",
    sync_to_thread=False,
    tags=["probes"],
    description="200 from the first time the sidecar was ready (warmup done) for as long as "
    "it runs, even while ComfyUI restarts; 503 before.",
)
def health(state: State) -> Response[ProbeResponse]:
    """Liveness probe."""
    sidecar = state.sidecar
    ok, detail = sidecar.health()
    return _probe(sidecar, ok, detail, "healthy", "not healthy")


@get(
    "/ready",
    summary="Readiness",
    sync_to_thread=False,
    tags=["probes"],
    description="200 only while ComfyUI is up, the websocket connected, the warmup done and "
    "ComfyUI's queue below MAX_QUEUE_DEPTH (when set); else 503 with the reason.",
)
def ready(state: State) -> Response[ProbeResponse]:
    """Readiness probe."""
    sidecar = state.sidecar
    ok, detail = sidecar.readiness()
    return _probe(sidecar, ok, detail, "ready", "not ready")
