"""The sidecar process: start-up, provisioning once, its ComfyUI instances, warmup, drain and
the HTTP server.

Phases (what ``/health`` and ``/ready`` report) are in :mod:`comfy_sidecar.phase`: the sidecar
is ``starting`` then ``provisioning``; after that its phase is its instances' (``ready`` while
at least READY_MIN_INSTANCES of them are). ``/health`` is 200 from the first time the sidecar
is ready until it exits (comfyui-api's ``wasEverWarm``); ``/ready`` is 200 while enough
instances are ready and the sidecar's queue is below ``MAX_QUEUE_DEPTH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from comfy_sidecar import __version__, metrics
from comfy_sidecar.boot import BootProbes
from comfy_sidecar.comfy.client import ComfyClient
from comfy_sidecar.config import ConfigError, Settings
from comfy_sidecar.dispatch import Dispatcher
from comfy_sidecar.errors import Overloaded, SidecarError, Unavailable
from comfy_sidecar.instance import ComfyInstance
from comfy_sidecar.jobs.runner import JobService
from comfy_sidecar.jobs.store import JobStore
from comfy_sidecar.logs import setup_logging
from comfy_sidecar.phase import Fatal, Phase
from comfy_sidecar.pipeline.deliver import Delivery
from comfy_sidecar.pipeline.preprocess import remove_leftover_inputs
from comfy_sidecar.pipeline.run import Pipeline
from comfy_sidecar.salad import DeletionCost
from comfy_sidecar.schemas import Prompt, PromptRequest
from comfy_sidecar.storage import Storage
from comfy_sidecar.webhooks import WebhookDispatcher

log = logging.getLogger("comfy_sidecar")

T = TypeVar("T")

__all__ = ["Fatal", "Phase", "Sidecar", "plan_instances", "run", "serve"]


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


class Sidecar:
    """Everything one sidecar process owns. Build it inside the running event loop.

    Raises :class:`ConfigError` when the instances cannot be planned (see
    :func:`plan_instances`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.version = __version__
        self.webhooks = WebhookDispatcher(settings)
        self.storage = Storage(settings, on_event=self.webhooks.storage_event)
        self.deletion_cost = DeletionCost(settings)
        plan = plan_instances(settings)
        self.instances = [
            ComfyInstance(
                index,
                settings,
                port=port,
                gpu=gpu,
                label=str(index) if len(plan) > 1 else "",
                on_frame=self._on_frame,
                warmup=None,
                on_ready=self._instance_ready,
                on_event=self._instance_event,
                on_connected=lambda _instance: self.dispatcher.poke(),
            )
            for index, (port, gpu) in enumerate(plan)
        ]
        self.dispatcher = Dispatcher(self.instances, settings.max_jobs_per_instance)
        self.pipeline = Pipeline(settings, self.instances, self.dispatcher, self.storage)
        self.store = JobStore(
            settings.jobs_dir, settings.job_retention_s, settings.job_retention_max
        )
        self.delivery = Delivery(
            self.pipeline,
            self.webhooks,
            self.spawn,
            Delivery.storage_uploader(self.storage),
            self.store,
        )
        self.jobs = JobService(self.store, self.delivery, self.admit)
        self.queue = self._shared_queue() if settings.job_queue_url else None
        self.workflows: list[Any] = []
        self._phase = Phase.STARTING
        self._detail = "starting"
        self.ever_ready = False
        #: Set on SIGTERM for DRAIN_DELAY_S: /ready says 503, new work is still taken.
        self.leaving = False
        self.stop_requested = asyncio.Event()
        self.warmup_prompt: dict[str, Any] | None = None
        self.after_start: Callable[[], None] = lambda: None
        self._tasks: set[asyncio.Task[Any]] = set()

    def _shared_queue(self) -> Any:
        """JOB_QUEUE_URL: jobs of the job API kept in Redis, claimed by free replicas."""
        from comfy_sidecar.jobs.after import AfterEnds
        from comfy_sidecar.jobs.redis_store import RedisJobs
        from comfy_sidecar.jobs.shared import SharedJobs
        from comfy_sidecar.jobs.worker import QueueWorker
        from comfy_sidecar.routes import aidock, modal_jobs

        settings = self.settings
        assert settings.job_queue_url is not None
        replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        redis_jobs = RedisJobs(
            settings.job_queue_url,
            replica,
            retention_s=settings.job_retention_s,
            lease_s=settings.job_lease_s,
            max_attempts=settings.job_max_attempts,
        )

        async def send(url: str, body: dict[str, Any], job_id: str) -> None:
            await self.webhooks.send_prompt(url, body, job_id, order_key=job_id)

        after_end = AfterEnds(
            redis_jobs,
            send,
            {"aidock": aidock.webhook_body, "modal_jobs": modal_jobs.webhook_body},
        )
        self.jobs.shared = SharedJobs(
            redis_jobs, self._check_job, self.delivery.send_failure, after_end
        )
        spill_to = None
        if settings.job_output_url is not None:
            base = settings.job_output_url.rstrip("/")
            self.storage.upload_spec(base)  # a prefix no backend takes fails at start-up

            def spill_to(job_id: str) -> Any:
                return self.storage.upload_spec(f"{base}/{job_id}")

        return QueueWorker(
            redis_jobs,
            self.delivery,
            self.dispatcher,
            self.spawn,
            settings.job_inline_output_mb,
            spill_to,
            after_end,
        )

    async def _check_job(self, request: Any) -> None:
        """What ``POST /jobs`` checks before it accepts a job in queue mode: the in-process
        mode's preprocessing (:meth:`Pipeline.prepare`: URLs guarded, inputs fetched into the
        cache, an output node present), then dropped; the replica that claims the job
        prepares it again (from its cache when it is this one). Raises what ``prepare``
        raises (:class:`InputError` with ``location``: a 400)."""
        pending = await self.pipeline.prepare(request)
        pending.abandon()

    # --- probes -------------------------------------------------------------------------------

    def set_phase(self, phase: Phase, detail: str) -> None:
        """Move the sidecar itself to ``phase`` (before and after its instances run) and log it."""
        self._phase, self._detail = phase, detail
        log.info("phase %s: %s", phase.value, detail)

    @property
    def client(self) -> ComfyClient:
        """A ComfyUI client for questions any instance answers (models, object_info)."""
        return self.pipeline.client()

    def ready_count(self) -> int:
        """Instances that accept jobs now."""
        return sum(1 for instance in self.instances if instance.accepting)

    @property
    def phase(self) -> Phase:
        """The sidecar's phase: its own before and after the instances run, else theirs."""
        if self._phase is not Phase.LAUNCHING:
            return self._phase
        if self.ready_count() >= self._ready_needed():
            return Phase.READY
        if len(self.instances) == 1:
            only = self.instances[0].phase
            return Phase.LAUNCHING if only is Phase.READY else only
        for phase in (Phase.WARMING, Phase.LAUNCHING, Phase.RESTARTING, Phase.READY):
            if any(instance.phase is phase for instance in self.instances):
                return Phase.RESTARTING if phase is Phase.READY else phase
        return Phase.FAILED

    @property
    def detail(self) -> str:
        """Words for the phase (the one instance's detail, when there is one)."""
        if self._phase is not Phase.LAUNCHING:
            return self._detail
        if len(self.instances) == 1:
            return self.instances[0].detail
        return f"{self.ready_count()} of {len(self.instances)} ComfyUI instances ready"

    def _ready_needed(self) -> int:
        return min(self.settings.ready_min_instances, len(self.instances))

    def queue_depth(self) -> int:
        """Jobs waiting in the sidecar's queue plus jobs held by instances."""
        return self.dispatcher.waiting + self.dispatcher.running

    def health(self) -> tuple[bool, str]:
        """(healthy, detail) for ``/health``."""
        if self.ever_ready and self.phase is not Phase.FAILED:
            return True, self.detail
        return False, self.detail

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for ``/ready``."""
        phase = self.phase
        if phase is not Phase.READY:
            if len(self.instances) == 1 and self.instances[0].phase is Phase.READY:
                return False, "the websocket to ComfyUI is disconnected"
            return False, f"{phase.value}: {self.detail}"
        if self.leaving:
            delay = self.settings.drain_delay_s
            return False, f"stopping: taking requests for DRAIN_DELAY_S={delay:g} s more"
        limit = self.settings.max_queue_depth
        if limit and self.queue_depth() >= limit:
            return False, f"queue depth {self.queue_depth()} >= MAX_QUEUE_DEPTH {limit}"
        if self.queue is not None and self.queue.problem:  # sync /prompt still works
            return True, f"{self.detail}; /jobs unavailable: {self.queue.problem}"
        return True, self.detail

    def admit(self) -> None:
        """Take a new job, or raise: :class:`Unavailable` (503) while draining, before the
        first ready or when every instance failed; :class:`Overloaded` (429) when the queue is
        at MAX_QUEUE_DEPTH. A restart, recycle or websocket reconnect refuses nothing: the job
        waits in the sidecar's queue."""
        phase = self.phase
        if phase is Phase.STOPPING:
            raise Unavailable("the sidecar is shutting down")
        if not self.ever_ready or phase is Phase.FAILED:
            _, reason = self.readiness()
            raise Unavailable(f"ComfyUI is not ready ({reason})")
        limit = self.settings.max_queue_depth
        if limit and self.queue_depth() >= limit:
            raise Overloaded(
                f"the queue is full: {self.queue_depth()} job(s) >= MAX_QUEUE_DEPTH {limit}"
            )

    def instance_status(self) -> list[dict[str, Any]]:
        """Each instance's ``{name, phase, detail, port, gpu, connected, jobs}``."""
        return [instance.status() for instance in self.instances]

    # --- events -------------------------------------------------------------------------------

    def _on_frame(self, instance: ComfyInstance, frame: dict[str, Any]) -> None:
        self.webhooks.handle_comfy_frame(frame, instance.registry.api_id_for)
        if frame.get("type") == "status":
            queued = sum(i.events.queue_remaining for i in self.instances)
            self.deletion_cost.set(queued + self.dispatcher.waiting)

    def _instance_event(self, instance: ComfyInstance, name: str, data: dict[str, Any]) -> None:
        """An instance restarted or recycled: ``sidecar.<name>`` to SYSTEM_WEBHOOK_URL when
        subscribed (SYSTEM_WEBHOOK_EVENTS ``restart``, ``recycle``)."""
        if name in self.settings.system_webhook_events:
            self.webhooks.emit_system(f"sidecar.{name}", data)

    async def _instance_ready(self, instance: ComfyInstance) -> None:
        first = not self.ever_ready
        self.ever_ready = True
        self.dispatcher.poke()
        if first:
            self.after_start()  # manifest models.after_start, in the background

    def spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        """Run ``coro`` as a task owned by the sidecar (cancelled at shutdown)."""
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _expire_jobs(self) -> None:
        """Drop ended jobs past JOB_RETENTION_S (reads expire them too; this frees files)."""
        interval = max(1.0, min(60.0, self.settings.job_retention_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.store.expire()

    # --- lifecycle ----------------------------------------------------------------------------

    async def lifecycle(self) -> int:
        """Provision once, then run every instance; returns 1 when the sidecar must exit."""
        try:
            try:
                await asyncio.to_thread(self.store.clear_leftovers)
            except (OSError, ValueError) as exc:
                raise Fatal(f"JOBS_DIR: {exc}") from None
            await asyncio.to_thread(remove_leftover_inputs, self.settings.input_dir)
            await asyncio.to_thread(self.delivery.clear_spool)
            await self.webhooks.start()
            await self.storage.start()
            self.deletion_cost.start()
            self.warmup_prompt = await self._load_warmup()
            await metrics.time_startup("provision", self.provision())
            self.spawn(self._expire_jobs())
            if self.queue is not None:
                self.spawn(self.queue.run())
            return await self._run_instances()
        except Fatal as exc:
            self.set_phase(Phase.FAILED, str(exc))
            log.error("fatal: %s", exc)
            return 1

    async def _run_instances(self) -> int:
        """Run the instances until one fails for good (with ALWAYS_RESTART_COMFYUI=false) or all
        have; returns 1 then."""
        for instance in self.instances:
            instance.warmup = self._run_warmup if self.warmup_prompt is not None else None
        self.set_phase(Phase.LAUNCHING, "starting ComfyUI")
        running = {asyncio.ensure_future(i.run()): i for i in self.instances}
        try:
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    instance = running.pop(task)
                    error = task.exception()
                    log.error("instance %s stopped: %s", instance.name, error)
                    if not self.settings.always_restart_comfyui or not running:
                        raise (
                            Fatal(str(error))
                            if isinstance(error, Fatal)
                            else Fatal(f"ComfyUI instance {instance.name} stopped: {error}")
                        )
            return 1
        finally:
            for task in running:
                task.cancel()
            for task in running:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def provision(self) -> None:
        """Install the manifest (apt, pip, custom nodes, models) before ComfyUI starts."""
        from comfy_sidecar.manifest import ManifestError, Provisioner

        try:
            provisioner = Provisioner.from_settings(self.settings)
        except ManifestError as exc:
            raise Fatal(str(exc)) from None
        self.after_start = lambda: provisioner.start_after(self.storage, self.spawn)
        if provisioner.empty:
            self.set_phase(Phase.PROVISIONING, "nothing to install")
            return
        self.set_phase(Phase.PROVISIONING, f"installing the {provisioner.source} manifest")

        def report(detail: str) -> None:
            self._detail = detail

        try:
            await provisioner.before_start(self.storage, report)
        except ManifestError as exc:
            raise Fatal(str(exc)) from None

    async def _load_warmup(self) -> dict[str, Any] | None:
        settings = self.settings
        if settings.warmup_prompt_file:
            name, source = "WARMUP_PROMPT_FILE", settings.warmup_prompt_file
            try:
                with open(source, "rb") as handle:
                    raw = handle.read()
            except OSError as exc:
                raise Fatal(f"{name}: cannot read {source!r}: {exc.strerror}") from None
        elif settings.warmup_prompt_url:
            name, source = "WARMUP_PROMPT_URL", settings.warmup_prompt_url
            import httpx

            try:
                async with httpx.AsyncClient(timeout=60, follow_redirects=True) as http:
                    response = await http.get(source)
                    response.raise_for_status()
                    raw = response.content
            except httpx.HTTPError as exc:
                raise Fatal(f"{name}: cannot download {source!r}: {exc}") from None
        else:
            return None
        try:
            document = msgspec.json.decode(raw)
            if isinstance(document, dict) and isinstance(document.get("prompt"), dict):
                document = document["prompt"]
            prompt = msgspec.convert(document, Prompt)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Fatal(f"{name}: not an API-format prompt: {exc}") from None
        result: dict[str, Any] = msgspec.to_builtins(prompt)
        return result

    async def _run_warmup(self, instance: ComfyInstance) -> None:
        """Run the warmup prompt on ``instance``. Raises :class:`Fatal` when it fails."""
        assert self.warmup_prompt is not None
        request = PromptRequest(
            prompt=msgspec.convert(self.warmup_prompt, Prompt), id=f"warmup-{uuid.uuid4()}"
        )
        started = time.monotonic()
        try:
            await self.delivery.run(request, "warmup", instance=instance)
        except SidecarError as exc:
            raise Fatal(f"the warmup prompt failed ({type(exc).__name__}): {exc.message}") from None
        took = time.monotonic() - started
        metrics.startup_phase("warmup", took)
        log.info("warmup finished in %.2f s (instance %s)", took, instance.name)

    # --- shutdown -----------------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop claiming shared-queue jobs; for DRAIN_DELAY_S seconds answer ``/ready`` 503 but
        still admit new requests (a load balancer sees the failing check and stops sending
        before any request is refused); then stop admitting work and let jobs in flight
        (waiting ones too) finish within SHUTDOWN_GRACE_S."""
        grace = self.settings.shutdown_grace_s
        if self.queue is not None:
            await self.queue.stop()
        if self.settings.drain_delay_s > 0 and self.phase is Phase.READY:
            self.leaving = True
            log.info(
                "/ready now fails; taking requests for DRAIN_DELAY_S=%g s",
                self.settings.drain_delay_s,
            )
            await asyncio.sleep(self.settings.drain_delay_s)
        self.set_phase(Phase.STOPPING, f"draining: {self.pipeline.active} job(s) in flight")
        started = time.monotonic()
        if not await self.pipeline.wait_idle(grace):
            log.warning(
                "%d job(s) still in flight after SHUTDOWN_GRACE_S=%g s", self.pipeline.active, grace
            )
        else:  # failed jobs leave the pipeline before their failure webhook is queued
            await self.delivery.wait_idle(grace - (time.monotonic() - started))
        if self.queue is not None:  # claimed jobs' ends written to Redis before closing
            await self.queue.wait_idle(max(0.0, grace - (time.monotonic() - started)))

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop every ComfyUI; let the jobs that ends (503) queue their failure webhooks and
        flush the webhooks, both within ``grace_s`` seconds of ComfyUI's stop; reset the
        deletion cost, and cancel every task the sidecar owns. Jobs still waiting for an
        instance get 503 now (no instance will take them). The webhook dispatcher closes only
        after the last background job ended (or ``grace_s`` ran out), so no job ends after it
        with its webhook unsent."""
        if self.phase is Phase.STOPPING:
            self.dispatcher.close("the sidecar is shutting down")
        else:
            self.dispatcher.close(f"ComfyUI is not ready ({self.readiness()[1]})")
        await asyncio.gather(*(instance.stop() for instance in self.instances))
        for instance in self.instances:
            instance.registry.fail_all("the sidecar is shutting down")
        deadline = time.monotonic() + grace_s
        if not await self.delivery.wait_idle(deadline - time.monotonic()):
            log.warning(
                "%d job(s) had not ended when webhooks were flushed", self.delivery.background
            )
        await self.webhooks.close(max(0.0, deadline - time.monotonic()))
        await self.storage.close()
        await self.deletion_cost.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for instance in self.instances:
            await instance.aclose()
        if self.queue is not None:
            await self.queue.jobs.close()


async def serve(settings: Settings, sock: socket.socket, boot: BootProbes) -> int:
    """Run the HTTP server on ``sock`` and the sidecar until stopped; returns the exit status."""
    import uvicorn

    from comfy_sidecar.app import create_app

    try:
        sidecar = Sidecar(settings)
    except ConfigError as exc:
        print(f"comfy-sidecar: {exc}", file=sys.stderr)
        return 2
    sidecar.workflows = await asyncio.to_thread(load_workflows_from, settings.workflow_dir)
    app = create_app(sidecar)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:  # the sidecar handles signals itself
            yield

    config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=False,
        log_config=None,
        ws="none",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    server = Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sidecar.stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, app.state.api_keys.reload)  # re-read API_KEYS_FILE
    boot.stop()
    server_task = asyncio.ensure_future(server.serve(sockets=[sock]))
    lifecycle = asyncio.ensure_future(sidecar.lifecycle())
    stop = asyncio.ensure_future(sidecar.stop_requested.wait())
    await asyncio.wait({lifecycle, stop, server_task}, return_when=asyncio.FIRST_COMPLETED)
    drain_started = time.monotonic()
    if sidecar.stop_requested.is_set():
        log.info("stop requested; draining")
        await sidecar.drain()
        code = 0
    elif server_task.done():
        log.error("the HTTP server stopped unexpectedly")
        code = 1
    else:
        code = lifecycle.result()
    lifecycle.cancel()
    stop.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await lifecycle
    budget = settings.shutdown_grace_s + settings.drain_delay_s
    remaining = budget - (time.monotonic() - drain_started)
    await sidecar.close(grace_s=max(1.0, remaining))
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await server_task
    log.info("exiting with status %d", code)
    return code


def load_workflows_from(directory: str) -> list[Any]:
    """Workflow modules in ``directory`` (none when it does not exist)."""
    from pathlib import Path

    if not Path(directory).is_dir():
        log.info("WORKFLOW_DIR %s does not exist: no workflow endpoints", directory)
        return []
    from comfy_sidecar.workflows import load_workflows

    workflows = load_workflows(directory)
    log.info("loaded %d workflow(s) from %s", len(workflows), directory)
    return list(workflows)


def run(settings: Settings, sock: socket.socket, boot: BootProbes) -> int:
    """Entry for ``__main__``: set up logging and run :func:`serve` in a new event loop."""
    setup_logging(settings.log_level, settings.log_format)
    try:
        try:
            import uvloop  # ~15% less CPU per request than the default loop (bench/overhead.py)
        except ImportError:
            return asyncio.run(serve(settings, sock, boot))
        return uvloop.run(serve(settings, sock, boot))
    except KeyboardInterrupt:
        return 0
    finally:
        sys.stdout.flush()
