"""The sidecar process's life: start-up, provisioning once, its ComfyUI instances, warmup,
drain and close, and the HTTP server around them (:func:`serve`).

1. Leftovers of a killed predecessor are cleared (JOBS_DIR, the sidecar's inputs, the webhook
   spool), webhooks, storage and the deletion cost start, the warmup prompt is loaded.
2. The manifest is installed (``provisioning``).
3. The instances launch, each warmed by :meth:`Runtime.warmup`; the job backend starts.
4. On SIGTERM: :meth:`Runtime.drain` (the backend stops claiming, DRAIN_DELAY_S, then jobs in
   flight get SHUTDOWN_GRACE_S), then :meth:`Runtime.close` (ComfyUI stopped, webhooks flushed
   after the last job ended, the deletion cost reset, every owned task cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from comfy_sidecar import __version__
from comfy_sidecar.boot import BootProbes
from comfy_sidecar.comfy.instance import ComfyInstance
from comfy_sidecar.comfy.phase import Fatal, Phase
from comfy_sidecar.config import ConfigError, Settings
from comfy_sidecar.errors import SidecarError
from comfy_sidecar.observability import metrics, tracing
from comfy_sidecar.observability.logs import setup_logging
from comfy_sidecar.pipeline.preprocess import remove_leftover_inputs
from comfy_sidecar.runtime.container import Container, build
from comfy_sidecar.schemas import Prompt, PromptRequest

if TYPE_CHECKING:
    from litestar import Litestar

log = logging.getLogger("comfy_sidecar")

__all__ = ["Runtime", "load_workflows_from", "run", "serve"]


class Runtime:
    """Starts, runs, drains and closes the services of ``container`` (see the module
    docstring)."""

    def __init__(self, container: Container) -> None:
        self.c = container
        self.settings = container.settings
        self.health = container.health
        self.stop_requested = asyncio.Event()
        #: The warmup prompt (API format), loaded at start-up; None: no warmup.
        self.warmup_prompt: dict[str, Any] | None = None
        self._after_start: Any = None
        container.signals.on_ready(self._first_ready)

    def _first_ready(self, instance: ComfyInstance) -> None:
        start, self._after_start = self._after_start, None
        if start is not None:
            start()  # manifest models.after_start, in the background

    async def _expire_jobs(self) -> None:
        """Drop ended jobs past JOB_RETENTION_S (reads expire them too; this frees files)."""
        interval = max(1.0, min(60.0, self.settings.job_retention_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.c.store.expire()

    async def lifecycle(self) -> int:
        """Provision once, then run every instance; returns 1 when the sidecar must exit."""
        c = self.c
        try:
            try:
                await asyncio.to_thread(c.store.clear_leftovers)
            except (OSError, ValueError) as exc:
                raise Fatal(f"JOBS_DIR: {exc}") from None
            await asyncio.to_thread(remove_leftover_inputs, self.settings.input_dir)
            await asyncio.to_thread(c.lifecycle.spool.clear)
            await c.webhooks.start()
            await c.storage.start()
            try:
                await c.assets.start()
            except ConfigError as exc:
                raise Fatal(str(exc)) from None
            except (OSError, ValueError) as exc:
                raise Fatal(f"ASSET_DIR: {exc}") from None
            c.deletion_cost.start()
            self.warmup_prompt = await self._load_warmup()
            await metrics.time_startup("provision", self.provision())
            c.tasks.spawn(self._expire_jobs())
            await c.jobs.start(c.tasks.spawn)
            return await self._run_instances()
        except Fatal as exc:
            self.health.set_phase(Phase.FAILED, str(exc))
            log.error("fatal: %s", exc)
            return 1

    async def _run_instances(self) -> int:
        """Run the instances until one fails for good (with ALWAYS_RESTART_COMFYUI=false) or all
        have; returns 1 then."""
        warmup = self.warmup if self.warmup_prompt is not None else None
        self.health.set_phase(Phase.LAUNCHING, "starting ComfyUI")
        running = {asyncio.ensure_future(i.run(warmup)): i for i in self.c.instances}
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
        if not (self.settings.manifest_json or self.settings.manifest):
            # no manifest: its modules are never imported (bench/rss_bench.py)
            self.health.set_phase(Phase.PROVISIONING, "nothing to install")
            return
        from comfy_sidecar.manifest import ManifestError, Provisioner

        c = self.c
        try:
            provisioner = Provisioner.from_settings(self.settings, env=c.env)
        except ManifestError as exc:
            raise Fatal(str(exc)) from None
        self._after_start = lambda: provisioner.start_after(c.storage, c.tasks.spawn)
        if provisioner.empty:
            self.health.set_phase(Phase.PROVISIONING, "nothing to install")
            return
        self.health.set_phase(Phase.PROVISIONING, f"installing the {provisioner.source} manifest")
        try:
            await provisioner.before_start(c.storage, self.health.report)
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

    async def warmup(self, instance: ComfyInstance) -> None:
        """Run the warmup prompt on ``instance``. Raises :class:`Fatal` when it fails."""
        assert self.warmup_prompt is not None
        request = PromptRequest(
            prompt=msgspec.convert(self.warmup_prompt, Prompt), id=f"warmup-{uuid.uuid4()}"
        )
        started = time.monotonic()
        try:
            await self.c.lifecycle.warmup(request, instance)
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
        c, health = self.c, self.health
        grace = self.settings.shutdown_grace_s
        await c.jobs.stop()
        if self.settings.drain_delay_s > 0 and health.phase is Phase.READY:
            health.leaving = True
            log.info(
                "/ready now fails; taking requests for DRAIN_DELAY_S=%g s",
                self.settings.drain_delay_s,
            )
            await asyncio.sleep(self.settings.drain_delay_s)
        health.set_phase(Phase.STOPPING, f"draining: {c.pipeline.active} job(s) in flight")
        started = time.monotonic()
        if not await c.pipeline.wait_idle(grace):
            log.warning(
                "%d job(s) still in flight after SHUTDOWN_GRACE_S=%g s", c.pipeline.active, grace
            )
        else:  # failed jobs leave the pipeline before their failure webhook is queued
            await c.lifecycle.wait_idle(grace - (time.monotonic() - started))
        # claimed jobs' ends written to Redis before closing
        await c.jobs.wait_idle(max(0.0, grace - (time.monotonic() - started)))

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop every ComfyUI; let the jobs that ends (503) queue their failure webhooks and
        flush the webhooks, both within ``grace_s`` seconds of ComfyUI's stop; reset the
        deletion cost, and cancel every task the sidecar owns. Jobs still waiting for an
        instance get 503 now (no instance will take them). The webhook dispatcher closes only
        after the last background job ended (or ``grace_s`` ran out), so no job ends after it
        with its webhook unsent."""
        c = self.c
        if self.health.phase is Phase.STOPPING:
            c.dispatcher.close("the sidecar is shutting down")
        else:
            c.dispatcher.close(f"ComfyUI is not ready ({self.health.readiness()[1]})")
        await asyncio.gather(*(instance.stop() for instance in c.instances))
        for instance in c.instances:
            instance.registry.fail_all("the sidecar is shutting down")
        deadline = time.monotonic() + grace_s
        if not await c.lifecycle.wait_idle(deadline - time.monotonic()):
            log.warning(
                "%d job(s) had not ended when webhooks were flushed", c.lifecycle.background
            )
        await c.webhooks.close(max(0.0, deadline - time.monotonic()))
        await c.storage.close()
        await c.assets.close()
        await c.deletion_cost.close()
        await c.tasks.cancel_all()
        for instance in c.instances:
            await instance.aclose()
        await c.jobs.close()


async def serve(
    settings: Settings,
    sock: socket.socket,
    boot: BootProbes | None,
    *,
    env: Mapping[str, str] | None = None,
    control: Callable[[Runtime, Litestar], None] | None = None,
) -> int:
    """Run the HTTP server on ``sock`` (listening, non-blocking once ``boot`` stopped) and the
    sidecar until stopped; returns the exit status (0 after a drain, 1 when ComfyUI cannot be
    kept running or the server stopped, 2 for bad configuration).

    ``env`` (default ``os.environ``) supplies the storage SDKs' and the manifest's variables.
    With ``control`` None the process's signals drive it (SIGTERM/SIGINT drain and stop,
    SIGHUP re-reads API_KEYS_FILE); a caller running the sidecar in a thread of its own (the
    in-process test harness, tests/inprocess.py) passes ``control(runtime, app)`` instead,
    called once both are built, and stops it with ``runtime.stop_requested`` from the loop."""
    import signal

    import uvicorn

    from comfy_sidecar.http.app import create_app

    workflows = await asyncio.to_thread(load_workflows_from, settings.workflow_dir)
    try:
        container = build(settings, workflows, env=env)
    except ConfigError as exc:
        print(f"comfy-sidecar: {exc}", file=sys.stderr)
        return 2
    runtime = Runtime(container)
    app = create_app(container, lambda: runtime.warmup_prompt)

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
    if control is None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, app.state.api_keys.reload)  # API_KEYS_FILE
    else:
        control(runtime, app)
    if boot is not None:
        boot.stop()
    server_task = asyncio.ensure_future(server.serve(sockets=[sock]))
    lifecycle = asyncio.ensure_future(runtime.lifecycle())
    stop = asyncio.ensure_future(runtime.stop_requested.wait())
    await asyncio.wait({lifecycle, stop, server_task}, return_when=asyncio.FIRST_COMPLETED)
    drain_started = time.monotonic()
    if runtime.stop_requested.is_set():
        log.info("stop requested; draining")
        await runtime.drain()
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
    await runtime.close(grace_s=max(1.0, remaining))
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
    """Entry for ``__main__``: set up logging and tracing (when an OTLP endpoint is set, see
    :mod:`comfy_sidecar.observability.tracing`) and run :func:`serve` in a new event loop;
    the spans still buffered are exported at the end."""
    setup_logging(settings.log_level, settings.log_format)
    if tracing.setup(__version__):
        log.info("tracing: OpenTelemetry spans exported over OTLP/HTTP")
    try:
        try:
            import uvloop  # ~15% less CPU per request than the default loop (bench/overhead.py)
        except ImportError:
            return asyncio.run(serve(settings, sock, boot))
        return uvloop.run(serve(settings, sock, boot))
    except KeyboardInterrupt:
        return 0
    finally:
        tracing.shutdown()
        sys.stdout.flush()
