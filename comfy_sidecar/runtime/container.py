"""The container: every service of one sidecar process, built once, in dependency order, with
nothing completed by mutation afterwards.

:func:`build` reads the settings and wires the parts: the webhook dispatcher, storage, the
ComfyUI instances and their dispatcher, the pipeline, the job store, the job lifecycle, the job
backend chosen once (in-process, or Redis with ``JOB_QUEUE_URL``), the health, the model
downloads. Listeners subscribe to the instances' signals in their own constructors. The HTTP
layer gets narrow services from it through Litestar's ``Provide``; the runtime lifecycle
(:mod:`comfy_sidecar.runtime.lifecycle`) starts and stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from comfy_sidecar.assets import AssetStore, UrlSigner
from comfy_sidecar.assets.service import AssetService, LocalAssets
from comfy_sidecar.comfy.client import ComfyClient
from comfy_sidecar.comfy.dispatch import Dispatcher
from comfy_sidecar.comfy.health import Health
from comfy_sidecar.comfy.instance import ComfyInstance, InstanceSignals
from comfy_sidecar.config import ConfigError, Settings
from comfy_sidecar.http.idempotency import (
    IdempotencyKeys,
    LocalIdempotencyKeys,
    RedisIdempotencyKeys,
)
from comfy_sidecar.jobs.backend import JobBackend
from comfy_sidecar.jobs.lifecycle import JobLifecycle
from comfy_sidecar.jobs.local import LocalBackend
from comfy_sidecar.jobs.quotas import LocalQuotas, Quotas
from comfy_sidecar.jobs.store import JobStore
from comfy_sidecar.pipeline.deliver import storage_uploader
from comfy_sidecar.pipeline.run import Pipeline
from comfy_sidecar.pipeline.staging import FolderStaging, InlineStaging, Staging
from comfy_sidecar.runtime.salad import DeletionCost
from comfy_sidecar.storage import Storage
from comfy_sidecar.storage.errors import BadRequestError
from comfy_sidecar.webhooks import WebhookDispatcher
from comfy_sidecar.webhooks.adapters import FORMATS

__all__ = ["Container", "Tasks", "build", "detect_gpus", "plan_instances"]

T = TypeVar("T")


def detect_gpus() -> list[str]:
    """The GPUs ``COMFYUI_GPUS=auto`` means: CUDA_VISIBLE_DEVICES when set, else one per line of
    ``nvidia-smi -L``; empty when neither says anything."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return [part.strip() for part in visible.split(",") if part.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def plan_instances(settings: Settings) -> list[tuple[int, str | None]]:
    """``(port, gpu)`` of each instance: COMFYUI_INSTANCES of them (default one per GPU, else
    one) on COMFYUI_PORT_HOST + i, GPUs handed out in turn. Raises :class:`ConfigError` naming
    CMD when more than one would run and CMD has no ``{port}``."""
    gpus = detect_gpus() if settings.comfyui_gpus == ["auto"] else list(settings.comfyui_gpus)
    count = settings.comfyui_instances or max(1, len(gpus))
    if count > 1 and not any("{port}" in part for part in settings.cmd):
        raise ConfigError(
            f"CMD: must hold {{port}} when more than one ComfyUI instance runs ({count})"
        )
    return [
        (settings.comfyui_port + i, gpus[i % len(gpus)] if gpus else None) for i in range(count)
    ]


class Tasks:
    """The process's background tasks: each owned here, cancelled at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        """Run ``coro`` as a task owned here (cancelled by :meth:`cancel_all`)."""
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        """Cancel every task and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class ComfyAccess:
    """What the HTTP layer asks of ComfyUI outside jobs (model folders, node info for workflow
    endpoints): a ready instance's client, else the first instance's."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def client(self) -> ComfyClient:
        """The client to ask."""
        return self._pipeline.client()


class Gauges:
    """What ``/metrics`` reads of this sidecar at scrape time (a
    :class:`~comfy_sidecar.observability.metrics.Scraped`)."""

    def __init__(
        self,
        settings: Settings,
        instances: list[ComfyInstance],
        dispatcher: Dispatcher,
        storage: Storage,
        lifecycle: JobLifecycle,
        jobs: JobBackend,
    ) -> None:
        from comfy_sidecar import __version__

        self.version = __version__
        self.instances = instances
        self.cache = storage.cache
        self._shared = settings.job_queue_url is not None
        self._dispatcher = dispatcher
        self._lifecycle = lifecycle
        self._jobs = jobs

    @property
    def jobs_waiting(self) -> int:
        """Jobs waiting in the sidecar for an instance slot."""
        return self._dispatcher.waiting

    @property
    def jobs_oldest_wait_s(self) -> float:
        """Seconds the job waiting longest for a slot has waited."""
        return self._dispatcher.oldest_wait_s

    @property
    def jobs_running(self) -> int:
        """Jobs holding an instance slot."""
        return self._dispatcher.running

    @property
    def queue_up(self) -> bool | None:
        """Whether the shared job queue answers (None without JOB_QUEUE_URL)."""
        return None if not self._shared else self._jobs.problem is None

    @property
    def pending_deliveries(self) -> int:
        """Asynchronous jobs with a webhook not yet delivered."""
        return self._lifecycle.pending_deliveries

    @property
    def max_pending_deliveries(self) -> int:
        """MAX_PENDING_DELIVERIES."""
        return self._lifecycle.max_pending


@dataclass(frozen=True)
class Container:
    """Every service of one sidecar process (see the module docstring)."""

    settings: Settings
    tasks: Tasks
    webhooks: WebhookDispatcher
    storage: Storage
    deletion_cost: DeletionCost
    signals: InstanceSignals
    instances: list[ComfyInstance]
    dispatcher: Dispatcher
    pipeline: Pipeline
    store: JobStore
    lifecycle: JobLifecycle
    jobs: JobBackend
    #: Where files that come with a job request go (chosen with the backend).
    staging: Staging
    health: Health
    comfy: ComfyAccess
    gauges: Gauges
    #: The Comfy API v2 assets: ASSET_DIR in-process, Redis (+ object store) with the queue.
    assets: AssetService
    #: Signs and checks asset content URLs (ASSET_URL_SECRET, ASSET_URL_TTL_S).
    signer: UrlSigner
    #: Used Idempotency-Keys: in-process, or Redis with the queue.
    idempotency: IdempotencyKeys
    #: The typed workflow endpoints loaded from WORKFLOW_DIR.
    workflows: list[Any] = field(default_factory=list)
    #: The variables the storage SDKs and the manifest read (None: ``os.environ``).
    env: Mapping[str, str] | None = None


def build(
    settings: Settings,
    workflows: list[Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Container:
    """Build every service for ``settings`` (inside the running event loop); ``env`` (default
    ``os.environ``) supplies the storage SDKs' variables (``AWS_*``, ``HF_*``,
    ``AZURE_STORAGE_*``) and the manifest's. Raises :class:`ConfigError` when the instances
    cannot be planned (:func:`plan_instances`) or JOB_OUTPUT_URL names no storage backend."""
    tasks = Tasks()
    webhooks = WebhookDispatcher(settings)
    storage = Storage(settings, on_event=webhooks.storage_event, env=env)
    deletion_cost = DeletionCost(settings)
    signals = InstanceSignals()
    plan = plan_instances(settings)
    instances = [
        ComfyInstance(
            index,
            settings,
            port=port,
            gpu=gpu,
            label=str(index) if len(plan) > 1 else "",
            signals=signals,
            env=env,
        )
        for index, (port, gpu) in enumerate(plan)
    ]
    dispatcher = Dispatcher(instances, settings.max_jobs_per_instance, signals)
    pipeline = Pipeline(settings, instances, dispatcher, storage)
    store = JobStore(settings.jobs_dir, settings.job_retention_s, settings.job_retention_max)
    health = Health(settings, instances, dispatcher, signals)
    redis_jobs = _redis_jobs(settings)
    quotas = _quotas(redis_jobs)
    lifecycle = JobLifecycle(
        pipeline,
        store,
        webhooks,
        storage_uploader(storage),
        tasks.spawn,
        admit=health.admit,
        formats=FORMATS,
        quotas=quotas,
    )
    jobs = _backend(settings, lifecycle, dispatcher, pipeline, storage, redis_jobs, quotas)
    staging: Staging = (
        FolderStaging(settings, storage) if settings.job_queue_url is None else InlineStaging()
    )
    assets, idempotency = _assets(settings, storage, jobs)
    _system_events(settings, signals, webhooks, deletion_cost, instances, dispatcher)
    return Container(
        settings=settings,
        tasks=tasks,
        webhooks=webhooks,
        storage=storage,
        deletion_cost=deletion_cost,
        signals=signals,
        instances=instances,
        dispatcher=dispatcher,
        pipeline=pipeline,
        store=store,
        lifecycle=lifecycle,
        jobs=jobs,
        staging=staging,
        health=health,
        comfy=ComfyAccess(pipeline),
        gauges=Gauges(settings, instances, dispatcher, storage, lifecycle, jobs),
        assets=assets,
        signer=UrlSigner(settings.asset_url_secret, settings.asset_url_ttl_s),
        idempotency=idempotency,
        workflows=list(workflows or []),
        env=env,
    )


def _redis_jobs(settings: Settings) -> Any:
    """The replica's Redis job store with JOB_QUEUE_URL (a
    :class:`~comfy_sidecar.jobs.redis.store.RedisJobs`), else None."""
    if settings.job_queue_url is None:
        return None
    from comfy_sidecar.jobs.redis.store import RedisJobs

    replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return RedisJobs(
        settings.job_queue_url,
        replica,
        retention_s=settings.job_retention_s,
        lease_s=settings.job_lease_s,
        max_attempts=settings.job_max_attempts,
    )


def _quotas(redis_jobs: Any) -> Quotas:
    """Where the API keys' quotas are counted: in Redis with JOB_QUEUE_URL (every replica's
    jobs count), else in memory."""
    if redis_jobs is None:
        return LocalQuotas()
    from comfy_sidecar.jobs.redis.quotas import RedisQuotas

    return RedisQuotas(redis_jobs)


def _backend(
    settings: Settings,
    lifecycle: JobLifecycle,
    dispatcher: Dispatcher,
    pipeline: Pipeline,
    storage: Storage,
    redis_jobs: Any,
    quotas: Quotas,
) -> JobBackend:
    """The job backend, chosen once: Redis with JOB_QUEUE_URL, else in-process."""
    if redis_jobs is None:
        return LocalBackend(lifecycle)
    from comfy_sidecar.jobs.redis.backend import RedisBackend, Slots
    from comfy_sidecar.jobs.redis.quotas import RedisQuotas

    spill_to: Callable[[str], Any] | None = None
    if settings.job_output_url is not None:
        base = settings.job_output_url.rstrip("/")
        storage.upload_spec(base)  # a prefix no backend takes fails at start-up

        def spill_to(job_id: str) -> Any:
            return storage.upload_spec(f"{base}/{job_id}")

    return RedisBackend(
        redis_jobs,
        lifecycle,
        Slots(dispatcher),
        pipeline.check,
        inline_mb=settings.job_inline_output_mb,
        spill_to=spill_to,
        quotas=quotas if isinstance(quotas, RedisQuotas) else None,
    )


MIB = 1024 * 1024


def asset_spill_prefix(settings: Settings) -> str | None:
    """Where shared assets over ASSET_INLINE_MB go: ASSET_STORE_URL, else
    ``<JOB_OUTPUT_URL>/.assets`` (a job id never starts with a dot, so no job's outputs land
    there), else None."""
    if settings.asset_store_url is not None:
        return settings.asset_store_url.rstrip("/")
    if settings.job_output_url is not None:
        return settings.job_output_url.rstrip("/") + "/.assets"
    return None


def _assets(
    settings: Settings, storage: Storage, jobs: JobBackend
) -> tuple[AssetService, IdempotencyKeys]:
    """The asset service and the Idempotency-Key store, chosen once with the job backend:
    ASSET_DIR and this process's memory, or (JOB_QUEUE_URL) Redis, with bytes over
    ASSET_INLINE_MB in :func:`asset_spill_prefix`'s object store. Raises
    :class:`ConfigError` when that prefix names no storage backend."""

    async def is_retained(job_id: str) -> bool:
        return await jobs.get(job_id) is not None

    max_upload = int(settings.asset_max_upload_mb * MIB)
    if settings.job_queue_url is None:
        store = AssetStore.from_settings(settings)
        local = LocalAssets(
            store, settings.input_dir, max_upload_bytes=max_upload, is_retained=is_retained
        )
        return local, LocalIdempotencyKeys()
    from comfy_sidecar.assets.shared import SharedAssets
    from comfy_sidecar.net.redisconn import connect

    prefix = asset_spill_prefix(settings)
    try:
        spill = storage.upload_spec(prefix) if prefix is not None else None
    except BadRequestError as exc:
        name = "ASSET_STORE_URL" if settings.asset_store_url else "JOB_OUTPUT_URL"
        raise ConfigError(f"{name}: {exc}") from None
    redis = connect(settings.job_queue_url)
    shared = SharedAssets(
        redis,
        Path(settings.asset_dir) / "tmp",
        storage=storage,
        spill=spill,
        spill_prefix=prefix,
        inline_max_bytes=int(settings.asset_inline_mb * MIB),
        inline_total_bytes=int(settings.asset_store_gb * 1024 * MIB),
        max_upload_bytes=max_upload,
        retention_s=settings.asset_retention_s,
        is_retained=is_retained,
    )
    return shared, RedisIdempotencyKeys(redis)


def _system_events(
    settings: Settings,
    signals: InstanceSignals,
    webhooks: WebhookDispatcher,
    deletion_cost: DeletionCost,
    instances: list[ComfyInstance],
    dispatcher: Dispatcher,
) -> None:
    """ComfyUI's frames as system events (and the deletion cost from its queue); restarts and
    recycling as ``sidecar.<name>`` system events when subscribed (SYSTEM_WEBHOOK_EVENTS
    ``restart``, ``recycle``)."""

    def frame(instance: ComfyInstance, data: dict[str, Any]) -> None:
        webhooks.handle_comfy_frame(data, instance.registry.api_id_for)
        if data.get("type") == "status":
            queued = sum(i.events.queue_remaining for i in instances)
            deletion_cost.set(queued + dispatcher.waiting)

    def event(instance: ComfyInstance, name: str, data: dict[str, Any]) -> None:
        if name in settings.system_webhook_events:
            webhooks.emit_system(f"sidecar.{name}", data)

    signals.on_frame(frame)
    signals.on_event(event)
