"""``GET /health`` and ``GET /ready`` (comfyui-api's probes, plus ``phase`` and ``detail``)."""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency

from comfy_sidecar.comfy.health import Health
from comfy_sidecar.jobs.backend import JobBackend
from comfy_sidecar.schemas import InstanceStatus, ProbeResponse


def _probe(health: Health, ok: bool, detail: str, good: str, bad: str) -> Response[ProbeResponse]:
    body = ProbeResponse(
        version=health.version,
        status=good if ok else bad,
        phase=health.phase.value,
        detail=detail,
        queue={"waiting": health.dispatcher.waiting, "running": health.dispatcher.running},
        instances=[InstanceStatus(**status) for status in health.instance_status()],
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
def health(probes: NamedDependency[Health]) -> Response[ProbeResponse]:
    """Liveness probe."""
    ok, detail = probes.health()
    return _probe(probes, ok, detail, "healthy", "not healthy")


@get(
    "/ready",
    summary="Readiness",
    sync_to_thread=False,
    tags=["probes"],
    description="200 only while ComfyUI is up, the websocket connected, the warmup done and "
    "ComfyUI's queue below MAX_QUEUE_DEPTH (when set); else 503 with the reason.",
)
def ready(
    probes: NamedDependency[Health], jobs: NamedDependency[JobBackend]
) -> Response[ProbeResponse]:
    """Readiness probe."""
    ok, detail = probes.readiness(jobs.problem)
    return _probe(probes, ok, detail, "ready", "not ready")
