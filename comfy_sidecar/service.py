"""The sidecar process: state machine, ComfyUI lifecycle, warmup, drain, HTTP server.

Phases (what ``/health`` and ``/ready`` report)::

    starting -> provisioning -> launching -> warming -> ready
                                    ^                     |
                                    +---- restarting <----+   (child exited, ALWAYS_RESTART_COMFYUI)
    any -> stopping (SIGTERM/SIGINT)        any -> failed (exit 1)

``/health`` is 200 from the first time the sidecar is ready until it exits (comfyui-api's
``wasEverWarm``); ``/ready`` is 200 only in ``ready`` with the websocket connected and the queue
below ``MAX_QUEUE_DEPTH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from comfy_sidecar import __version__
from comfy_sidecar.backoff import backoff_delay
from comfy_sidecar.boot import BootProbes
from comfy_sidecar.comfy.client import ComfyClient
from comfy_sidecar.comfy.events import EventStream
from comfy_sidecar.config import Settings
from comfy_sidecar.errors import SidecarError
from comfy_sidecar.jobs.runner import JobService
from comfy_sidecar.jobs.store import JobStore
from comfy_sidecar.logs import setup_logging
from comfy_sidecar.pipeline.deliver import Delivery
from comfy_sidecar.pipeline.jobs import JobRegistry
from comfy_sidecar.pipeline.run import Pipeline
from comfy_sidecar.salad import DeletionCost
from comfy_sidecar.schemas import Prompt, PromptRequest
from comfy_sidecar.storage import Storage
from comfy_sidecar.supervisor import ComfyProcess, LaunchError
from comfy_sidecar.webhooks import WebhookDispatcher

log = logging.getLogger("comfy_sidecar")

T = TypeVar("T")


class Phase(enum.StrEnum):
    """Lifecycle phase, reported by the probes."""

    STARTING = "starting"
    PROVISIONING = "provisioning"
    LAUNCHING = "launching"
    WARMING = "warming"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    FAILED = "failed"


class Fatal(Exception):
    """The sidecar cannot go on; the message is logged as one line and the exit status is 1."""


class ChildExited(Exception):
    """ComfyUI exited; ``code`` is its exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(f"ComfyUI exited with code {code}")
        self.code = code


class Sidecar:
    """Everything one sidecar process owns. Build it inside the running event loop.

    ``quiet_reconcile_s``: seconds without a websocket frame, while jobs are in flight, after
    which the jobs are reconciled through ``/queue`` and ``/history`` (a socket that stays open
    but went silent); checked every half of it.
    """

    def __init__(self, settings: Settings, *, quiet_reconcile_s: float = 10.0) -> None:
        self.settings = settings
        self.quiet_reconcile_s = quiet_reconcile_s
        self.version = __version__
        self.client_id = f"comfy-sidecar-{uuid.uuid4()}"
        self.client = ComfyClient(settings.comfy_url)
        self.registry = JobRegistry()
        self.registry.attach(self.client)
        self.events = EventStream(
            settings.comfy_ws_url,
            self.client_id,
            self._on_frame,
            self._on_connect,
            self.registry.mark_missed_frames,
        )
        self.process: ComfyProcess | None = None
        self.webhooks = WebhookDispatcher(settings)
        self.storage = Storage(settings, on_event=self.webhooks.storage_event)
        self.pipeline = Pipeline(
            settings, self.client, self.registry, self.client_id, self.log_tail, self.storage
        )
        self.deletion_cost = DeletionCost(settings)
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
        self.jobs = JobService(self.store, self.delivery)
        self.workflows: list[Any] = []
        self.phase = Phase.STARTING
        self.detail = "starting"
        self.ever_ready = False
        self.stop_requested = asyncio.Event()
        self.restarts: deque[float] = deque()
        self.warmup_prompt: dict[str, Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- probes -------------------------------------------------------------------------------

    def set_phase(self, phase: Phase, detail: str) -> None:
        """Move to ``phase`` and log it."""
        self.phase, self.detail = phase, detail
        log.info("phase %s: %s", phase.value, detail)

    def health(self) -> tuple[bool, str]:
        """(healthy, detail) for ``/health``."""
        if self.ever_ready and self.phase is not Phase.FAILED:
            return True, self.detail
        return False, self.detail

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for ``/ready`` and for admitting ``/prompt``."""
        if self.phase is not Phase.READY:
            return False, f"{self.phase.value}: {self.detail}"
        if not self.events.connected:
            return False, "the websocket to ComfyUI is disconnected"
        limit = self.settings.max_queue_depth
        if limit and self.events.queue_remaining >= limit:
            return False, f"ComfyUI's queue depth {self.events.queue_remaining} >= {limit}"
        return True, "ComfyUI is up, warm and connected"

    def log_tail(self, lines: int) -> list[str]:
        """The last ``lines`` lines ComfyUI printed."""
        return self.process.tail(lines) if self.process else []

    # --- events -------------------------------------------------------------------------------

    def _on_frame(self, frame: dict[str, Any]) -> None:
        self.registry.on_frame(frame)
        self.webhooks.handle_comfy_frame(frame, self.registry.api_id_for)
        if frame.get("type") == "status":
            self.deletion_cost.set(self.events.queue_remaining)

    async def _on_connect(self, reconnected: bool) -> None:
        if reconnected:
            log.info("websocket to ComfyUI re-established; reconciling jobs in flight")
            self.spawn(self.registry.reconcile())

    def spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        """Run ``coro`` as a task owned by the sidecar (cancelled at shutdown)."""
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watch_quiet_socket(self) -> None:
        while True:
            await asyncio.sleep(self.quiet_reconcile_s / 2)
            quiet = time.monotonic() - self.events.last_frame_at
            if len(self.registry) and quiet > self.quiet_reconcile_s:
                await self.registry.reconcile()

    async def _expire_jobs(self) -> None:
        """Drop ended jobs past JOB_RETENTION_S (reads expire them too; this frees files)."""
        interval = max(1.0, min(60.0, self.settings.job_retention_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.store.expire()

    # --- lifecycle ----------------------------------------------------------------------------

    async def lifecycle(self) -> int:
        """Provision, launch, warm, serve, restart; returns 1 when the sidecar must exit."""
        try:
            try:
                await asyncio.to_thread(self.store.clear_leftovers)
            except (OSError, ValueError) as exc:
                raise Fatal(f"JOBS_DIR: {exc}") from None
            await self.webhooks.start()
            await self.storage.start()
            self.deletion_cost.start()
            self.warmup_prompt = await self._load_warmup()
            await self.provision()
            self.spawn(self.events.run())
            self.spawn(self._watch_quiet_socket())
            self.spawn(self._expire_jobs())
            await self._supervise()
        except Fatal as exc:
            self.set_phase(Phase.FAILED, str(exc))
            log.error("fatal: %s", exc)
            return 1
        return 1

    async def provision(self) -> None:
        """Install the manifest (apt, pip, custom nodes, models) before ComfyUI starts."""
        from comfy_sidecar.manifest import ManifestError, Provisioner

        try:
            provisioner = Provisioner.from_settings(self.settings)
        except ManifestError as exc:
            raise Fatal(str(exc)) from None
        self.after_start: Callable[[], None] = lambda: provisioner.start_after(
            self.storage, self.spawn
        )
        if provisioner.empty:
            self.set_phase(Phase.PROVISIONING, "nothing to install")
            return
        self.set_phase(Phase.PROVISIONING, f"installing the {provisioner.source} manifest")

        def report(detail: str) -> None:
            self.detail = detail

        try:
            await provisioner.before_start(self.storage, report)
        except ManifestError as exc:
            raise Fatal(str(exc)) from None

    async def _supervise(self) -> None:
        while True:
            process = ComfyProcess(self.settings.cmd)
            self.process = process
            try:
                await process.start()
            except LaunchError as exc:
                raise Fatal(f"CMD: {exc}") from None
            exited = asyncio.ensure_future(process.wait())
            try:
                await self._bring_up(process, exited)
                first_ready = not self.ever_ready
                self.ever_ready = True
                self.set_phase(Phase.READY, "ComfyUI is up, warm and connected")
                if first_ready:
                    self.after_start()  # manifest models.after_start, in the background
                code = await exited
                raise ChildExited(code)
            except ChildExited as exc:
                self.registry.fail_all(f"ComfyUI exited with code {exc.code}")
                log.error("%s", exc)
                if not self.settings.always_restart_comfyui:
                    raise Fatal(f"{exc}; ALWAYS_RESTART_COMFYUI is false") from None
            await process.stop(timeout_s=5)
            delay = self._next_restart_delay()
            self.set_phase(Phase.RESTARTING, f"restarting ComfyUI in {delay:.1f} s")
            await asyncio.sleep(delay)

    def _next_restart_delay(self) -> float:
        now = time.monotonic()
        window = self.settings.restart_window_s
        while self.restarts and now - self.restarts[0] > window:
            self.restarts.popleft()
        if len(self.restarts) >= self.settings.restart_max:
            raise Fatal(
                f"ComfyUI exited {len(self.restarts) + 1} times within {window:g} s "
                f"(RESTART_MAX={self.settings.restart_max}); giving up"
            )
        self.restarts.append(now)
        # 0.5 s doubling to 30 s, times a factor in [0.8, 1.2].
        return backoff_delay(len(self.restarts), 0.5 * 1.2, 30.0 * 1.2, jitter=1 - 0.8 / 1.2)

    async def _race(self, awaitable: Awaitable[T], exited: asyncio.Future[int]) -> T:
        """Await ``awaitable`` unless ComfyUI exits first (then raise :class:`ChildExited`)."""
        task = asyncio.ensure_future(awaitable)
        waiting: set[asyncio.Future[Any]] = {task, exited}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        finished = task.done() and not task.cancelled()
        if finished and (task.exception() is None or not exited.done()):
            return task.result()  # its value, or its own exception while ComfyUI still runs
        raise ChildExited(exited.result())

    async def _bring_up(self, process: ComfyProcess, exited: asyncio.Future[int]) -> None:
        settings = self.settings
        deadline = settings.startup_check_interval_s * settings.startup_check_max_tries
        if self.phase is not Phase.RESTARTING:
            self.set_phase(Phase.LAUNCHING, f"waiting up to {deadline:g} s for ComfyUI")
        started = time.monotonic()
        up = await self._race(self._wait_answering(deadline, process.listening), exited)
        if not up:
            await process.stop()
            raise Fatal(
                f"STARTUP_CHECK_MAX_TRIES: ComfyUI did not answer within {deadline:g} s "
                f"(STARTUP_CHECK_INTERVAL_S x STARTUP_CHECK_MAX_TRIES)"
            )
        self.client.forget_process_state()
        remaining = max(5.0, deadline - (time.monotonic() - started))
        if not await self._race(self.events.wait_connected(remaining), exited):
            await process.stop()
            raise Fatal("the websocket to ComfyUI could not be opened")
        log.info("ComfyUI answered after %.1f s", time.monotonic() - started)
        if self.warmup_prompt is not None:
            self.set_phase(Phase.WARMING, "running the warmup prompt")
            await self._race(self._run_warmup(), exited)

    async def _wait_answering(self, deadline_s: float, listening: asyncio.Event) -> bool:
        """Ping ComfyUI every STARTUP_CHECK_INTERVAL_S, and at once when it logs that its
        socket is bound; False when ``deadline_s`` passed."""
        interval = self.settings.startup_check_interval_s
        end = time.monotonic() + deadline_s
        while True:
            if await self.client.ping():
                return True
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listening.wait(), min(interval, remaining))
            if listening.is_set():
                await asyncio.sleep(0.02)  # the marker may precede accept() by a moment

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

    async def _run_warmup(self) -> None:
        assert self.warmup_prompt is not None
        request = PromptRequest(
            prompt=msgspec.convert(self.warmup_prompt, Prompt), id=f"warmup-{uuid.uuid4()}"
        )
        started = time.monotonic()
        try:
            await self.delivery.run(request, "warmup")
        except SidecarError as exc:
            raise Fatal(f"the warmup prompt failed ({type(exc).__name__}): {exc.message}") from None
        log.info("warmup finished in %.2f s", time.monotonic() - started)

    # --- shutdown -----------------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop admitting work, let jobs in flight finish within SHUTDOWN_GRACE_S, stop ComfyUI."""
        grace = self.settings.shutdown_grace_s
        self.set_phase(Phase.STOPPING, f"draining: {self.pipeline.active} job(s) in flight")
        if not await self.pipeline.wait_idle(grace):
            log.warning(
                "%d job(s) still in flight after SHUTDOWN_GRACE_S=%g s", self.pipeline.active, grace
            )

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop ComfyUI, flush webhooks within ``grace_s`` seconds, reset the deletion cost,
        and cancel every task the sidecar owns."""
        if self.process is not None:
            code = await self.process.stop()
            log.info("ComfyUI stopped (exit code %s)", code)
        self.registry.fail_all("the sidecar is shutting down")
        await self.webhooks.close(grace_s)
        await self.storage.close()
        await self.deletion_cost.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.client.aclose()


async def serve(settings: Settings, sock: socket.socket, boot: BootProbes) -> int:
    """Run the HTTP server on ``sock`` and the sidecar until stopped; returns the exit status."""
    import uvicorn

    from comfy_sidecar.app import create_app

    sidecar = Sidecar(settings)
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
    remaining = settings.shutdown_grace_s - (time.monotonic() - drain_started)
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
