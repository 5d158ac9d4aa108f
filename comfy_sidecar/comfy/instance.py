"""One supervised ComfyUI: its child process, HTTP client, websocket, jobs in flight and phase.

A sidecar runs one :class:`ComfyInstance` per GPU (``COMFYUI_INSTANCES``/``COMFYUI_GPUS``), like
ai-dock's ``COMFYUI_BACKENDS``. Each is brought up on its own port (``COMFYUI_PORT_HOST + i``,
``{port}`` in CMD), warmed up, and restarted alone when it exits, under the
:class:`~comfy_sidecar.comfy.process.RestartPolicy`; the others keep serving. Jobs reach it through
the dispatcher (:mod:`comfy_sidecar.comfy.dispatch`) only while it is :attr:`accepting`.

Bring-up does not wait on a fixed poll: the port is pinged with a short backoff (20 ms doubling
up to STARTUP_CHECK_INTERVAL_S) and at once when ComfyUI prints that it listens, and the
websocket is opened as soon as the port answers.

Once the port answers, a watchdog pings the child (``GET /system_stats`` with a short timeout,
and the websocket's own ping/pong). A child that has not answered for COMFYUI_HANG_TIMEOUT_S is
*hung*; one that holds queued jobs but runs none, with no frame of ours for
COMFYUI_STALL_TIMEOUT_S, is *stalled* (its prompt worker died). Either way the instance stops
being ready, its process group is SIGKILLed and it is restarted as after a crash: the running
job fails (``reason`` ``comfyui_hung`` / ``comfyui_stalled``), the jobs that had not started go
back to the sidecar's queue. After each job the RECYCLE_* limits are checked; when one trips the
instance stops taking jobs, lets its jobs finish, and restarts and warms its child again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from comfy_sidecar.comfy.client import ComfyClient, ComfyUnavailable
from comfy_sidecar.comfy.events import EventStream
from comfy_sidecar.comfy.executions import JobRegistry
from comfy_sidecar.comfy.phase import Fatal, Phase
from comfy_sidecar.comfy.process import (
    ComfyProcess,
    CrashLoop,
    LaunchError,
    RestartPolicy,
    port_taken,
)
from comfy_sidecar.comfy.watchdog import (
    keepalive_s,
    recycle_reason,
    socket_missed_progress,
    vram_used_bytes,
    watch_child,
)
from comfy_sidecar.config import Settings
from comfy_sidecar.observability import metrics

log = logging.getLogger("comfy_sidecar.instance")

T = TypeVar("T")

#: First ping interval while waiting for ComfyUI's port, in seconds (doubles up to
#: STARTUP_CHECK_INTERVAL_S).
FIRST_PING_S = 0.02

#: Restart reasons counted in :attr:`ComfyInstance.restarts` (and the restart metric):
#: ``exit`` (ComfyUI exited), ``hang``, ``stall`` and ``recycle``.
RESTART_REASONS = ("exit", "hang", "stall", "recycle")


class ChildExited(Exception):
    """ComfyUI exited; ``code`` is its exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(f"ComfyUI exited with code {code}")
        self.code = code


def expand_cmd(argv: list[str], port: int, index: int, gpu: str | None) -> list[str]:
    """CMD with ``{port}``, ``{instance}`` and ``{gpu}`` filled in (``{gpu}`` is empty without
    one)."""
    values = {"{port}": str(port), "{instance}": str(index), "{gpu}": gpu or ""}
    out = []
    for part in argv:
        for key, value in values.items():
            part = part.replace(key, value)
        out.append(part)
    return out


def base_url(address: str, port: int) -> str:
    """``http://<address>:<port>`` (IPv6 addresses bracketed)."""
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"http://{address}:{port}"


FrameHook = Callable[["ComfyInstance", dict[str, Any]], None]
InstanceHook = Callable[["ComfyInstance"], None]
EventHook = Callable[["ComfyInstance", str, dict[str, Any]], None]
Warmup = Callable[["ComfyInstance"], Awaitable[None]]
"""``warmup(instance)``: run the warmup prompt on ``instance``; raises :class:`Fatal`."""


class InstanceSignals:
    """What every instance tells its listeners, each of which subscribes in its own
    constructor (the dispatcher, the health, the system webhooks):

    - ``frame(instance, frame)``: every websocket frame, after the instance's registry took it;
    - ``ready(instance)``: each time it becomes ready (launched, warm, connected);
    - ``connected(instance)``: each time its websocket (re)connects, so jobs waiting in the
      sidecar's queue through a blip are handed out at once;
    - ``event(instance, name, data)``: restarts (``restart``: ``{instance, reason,
      message}``) and recycling (``recycle``: ``{instance, reason, jobs, rss_bytes,
      vram_bytes}``).

    A listener that raises is logged; the others still hear."""

    def __init__(self) -> None:
        self._frame: list[FrameHook] = []
        self._ready: list[InstanceHook] = []
        self._connected: list[InstanceHook] = []
        self._event: list[EventHook] = []

    def on_frame(self, listener: FrameHook) -> None:
        """Subscribe ``listener`` to every frame."""
        self._frame.append(listener)

    def on_ready(self, listener: InstanceHook) -> None:
        """Subscribe ``listener`` to an instance becoming ready."""
        self._ready.append(listener)

    def on_connected(self, listener: InstanceHook) -> None:
        """Subscribe ``listener`` to a websocket (re)connecting."""
        self._connected.append(listener)

    def on_event(self, listener: EventHook) -> None:
        """Subscribe ``listener`` to restarts and recycling."""
        self._event.append(listener)

    def frame(self, instance: ComfyInstance, frame: dict[str, Any]) -> None:
        """Tell every frame listener."""
        for listener in self._frame:
            _call(listener, instance, frame)

    def ready(self, instance: ComfyInstance) -> None:
        """Tell every ready listener."""
        for listener in self._ready:
            _call(listener, instance)

    def connected(self, instance: ComfyInstance) -> None:
        """Tell every connected listener."""
        for listener in self._connected:
            _call(listener, instance)

    def event(self, instance: ComfyInstance, name: str, data: dict[str, Any]) -> None:
        """Tell every event listener."""
        for listener in self._event:
            _call(listener, instance, name, data)


def _call(listener: Callable[..., None], *args: Any) -> None:
    try:
        listener(*args)
    except Exception:
        log.exception("an instance listener failed")


class ComfyInstance:
    """One ComfyUI child, numbered ``index``, on ``port`` (and ``gpu``, when given).

    It tells ``signals`` (:class:`InstanceSignals`) of its frames, readiness, connections,
    restarts and recycling. ``env`` holds variables for the child over the sidecar's own
    environment (the container passes the sidecar's ``env`` when it was given one).
    """

    def __init__(
        self,
        index: int,
        settings: Settings,
        *,
        port: int,
        gpu: str | None,
        label: str,
        signals: InstanceSignals | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.index = index
        #: The child's environment beyond the sidecar's own (None: the sidecar's), plus
        #: CUDA_VISIBLE_DEVICES for its GPU.
        self.env = dict(env or {})
        if gpu is not None:
            self.env["CUDA_VISIBLE_DEVICES"] = gpu
        self.name = str(index)
        self.settings = settings
        self.port = port
        self.gpu = gpu
        self.label = label
        self.argv = expand_cmd(settings.cmd, port, index, gpu)
        url = base_url(settings.direct_address, port)
        # POST /prompt outlasts the hang verdict, so a job sent into a ComfyUI that froze is
        # re-queued when the hung child is killed instead of failing on its own timeout first.
        self.client = ComfyClient(url, timeout_s=max(30.0, settings.comfyui_hang_timeout_s + 10))
        self.client_id = f"comfy-sidecar-{uuid.uuid4()}"
        self.registry = JobRegistry()
        self.registry.attach(self.client)
        self.events = EventStream(
            "ws" + url[len("http") :] + "/ws",
            self.client_id,
            self._on_frame,
            self._on_connect,
            self.registry.mark_missed_frames,
            on_preview=self.registry.on_preview,
            ping_interval_s=keepalive_s(settings.comfyui_hang_timeout_s),
        )
        self.policy = RestartPolicy(settings.restart_max, settings.restart_window_s)
        self.process: ComfyProcess | None = None
        self.phase = Phase.LAUNCHING
        self.detail = "not started"
        self.ever_ready = False
        self.draining = False
        #: Set when a RECYCLE_* limit tripped: no new jobs until the child was restarted.
        self.recycling = False
        #: Jobs run (warmup aside) by the current child.
        self.jobs_done = 0
        #: Restarts by reason (:data:`RESTART_REASONS`), for the restart metric.
        self.restarts: collections.Counter[str] = collections.Counter()
        metrics.restarts_known(self.name, RESTART_REASONS)
        #: (restart reason, job fail reason, message) when the sidecar took the child down.
        self._down: tuple[str, str, str] | None = None
        self._recycle = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None
        self._last_job_frame_at = time.monotonic()
        self.signals = signals or InstanceSignals()
        #: Runs the warmup prompt on this instance after each start (set by :meth:`run`).
        self._warmup: Warmup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<ComfyInstance {self.name} port={self.port} {self.phase.value}>"

    # --- state ------------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """True while new jobs may be sent to it: ready, connected, not draining or recycling."""
        return (
            self.phase is Phase.READY
            and self.events.connected
            and not self.draining
            and not self.recycling
        )

    @property
    def up(self) -> bool:
        """True while this instance's ComfyUI child process runs."""
        child = self.process.process if self.process is not None else None
        return child is not None and child.returncode is None

    @property
    def going_down(self) -> bool:
        """True once the current child is being replaced (it exited, or was declared hung or
        stalled, or is recycling) or is not up: a prompt it took dies with it, so a job it
        lost before it started may run elsewhere."""
        process = self.process.process if self.process is not None else None
        return self.phase is not Phase.READY or process is None or process.returncode is not None

    def set_phase(self, phase: Phase, detail: str) -> None:
        """Move to ``phase`` and log it."""
        self.phase, self.detail = phase, detail
        log.info("%sphase %s: %s", self._prefix(), phase.value, detail)

    def _prefix(self) -> str:
        return f"instance {self.name}: " if self.label else ""

    def log_tail(self, lines: int) -> list[str]:
        """The last ``lines`` lines this ComfyUI printed."""
        return self.process.tail(lines) if self.process else []

    def status(self) -> dict[str, Any]:
        """``{name, phase, detail, port, gpu, connected, jobs, pid}`` for the probe bodies."""
        return {
            "name": self.name,
            "phase": self.phase.value,
            "detail": self.detail,
            "port": self.port,
            "gpu": self.gpu,
            "connected": self.events.connected,
            "jobs": len(self.registry),
            "pid": self.process.pid if self.process is not None else None,
        }

    # --- events -----------------------------------------------------------------------------

    def _on_frame(self, frame: dict[str, Any]) -> None:
        data = frame.get("data")
        if isinstance(data, dict) and self.registry.api_id_for(str(data.get("prompt_id"))):
            self._last_job_frame_at = time.monotonic()
        self.registry.on_frame(frame)
        self.signals.frame(self, frame)

    async def _on_connect(self, reconnected: bool) -> None:
        self.signals.connected(self)  # it may take jobs again (a blip ended)
        if reconnected:
            log.info("%swebsocket re-established; reconciling jobs in flight", self._prefix())
            self._spawn(self.registry.reconcile())

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self.signals.event(self, name, {"instance": self.name, **data})

    async def _watch_quiet_socket(self) -> None:
        """Every COMFYUI_QUIET_RECONCILE_S / 2: when jobs are in flight and no frame came for
        COMFYUI_QUIET_RECONCILE_S, reopen a socket that ComfyUI's ``/queue`` shows to be stale
        (comfyui-api issue #186; reconciled on reconnect), else reconcile the jobs."""
        quiet_s = self.settings.quiet_reconcile_s
        while True:
            await asyncio.sleep(quiet_s / 2)
            quiet = time.monotonic() - self.events.last_frame_at
            if not len(self.registry) or quiet <= quiet_s:
                continue
            if self.events.connected and await socket_missed_progress(self.registry, self.client):
                log.warning(
                    "%swebsocket silent for %.1f s while ComfyUI's /queue moved on; reopening it",
                    self._prefix(),
                    quiet,
                )
                await self.events.reconnect()  # on_connect(True) reconciles the jobs
            else:
                await self.registry.reconcile()

    # --- hang and stall detection -----------------------------------------------------------

    async def _watch_child(self, process: ComfyProcess) -> None:
        """From the child's first answer until it ends: take it down when it hangs or stalls
        (:func:`~comfy_sidecar.comfy.watchdog.watch_child`)."""
        self._last_job_frame_at = time.monotonic()
        verdict = await watch_child(
            self.settings,
            self.client,
            self.registry,
            lambda: self.events.last_frame_at,
            lambda: self._last_job_frame_at,
        )
        if verdict is not None:
            self._take_down(process, *verdict)

    def _take_down(self, process: ComfyProcess, kind: str, reason: str, message: str) -> None:
        """Declare the child ``kind`` (hang, stall): not ready at once, SIGKILL its process
        group; :meth:`_supervise` fails its jobs with ``reason`` and restarts it."""
        log.error("%s%s; killing ComfyUI (pid %s)", self._prefix(), message, process.pid)
        self._down = (kind, reason, message)
        self.set_phase(Phase.RESTARTING, message)
        process.kill()

    # --- recycling --------------------------------------------------------------------------

    def job_ended(self) -> None:
        """A job this instance ran (not the warmup) ended: count it and check the RECYCLE_*
        limits (the job count and RSS at once, the VRAM through ``/system_stats``)."""
        self.jobs_done += 1
        settings = self.settings
        if self.recycling or self.process is None:
            return
        rss = self.process.rss_bytes() if settings.recycle_rss_gb else 0
        reason = recycle_reason(settings, self.jobs_done, rss, 0)
        if reason is not None:
            self._start_recycling(reason, rss, 0)
        elif settings.recycle_vram_gb:
            self._spawn(self._check_vram(rss))

    async def _check_vram(self, rss: int) -> None:
        try:
            vram = vram_used_bytes(await self.client.system_stats())
        except ComfyUnavailable:
            return
        reason = recycle_reason(self.settings, self.jobs_done, rss, vram)
        if reason is not None and not self.recycling:
            self._start_recycling(reason, rss, vram)

    def _start_recycling(self, reason: str, rss: int, vram: int) -> None:
        self.recycling = True
        log.info(
            "%srecycling ComfyUI (%s): no new jobs; restarting once %d job(s) finished",
            self._prefix(),
            reason,
            len(self.registry),
        )
        self._emit(
            "recycle",
            {"reason": reason, "jobs": self.jobs_done, "rss_bytes": rss, "vram_bytes": vram},
        )
        self._recycle.set()

    async def _serve_until_recycled(self) -> None:
        """Return once a RECYCLE_* limit tripped and this instance's jobs all finished."""
        await self._recycle.wait()
        self.set_phase(Phase.RESTARTING, f"recycling: letting {len(self.registry)} job(s) finish")
        await self.registry.wait_empty()

    # --- lifecycle --------------------------------------------------------------------------

    async def run(self, warmup: Warmup | None = None) -> None:
        """Launch, warm (``warmup``, after each start; None: no warmup) and keep this ComfyUI
        running until cancelled. Raises :class:`Fatal` when it cannot go on (CMD cannot run,
        no answer within the start-up deadline, a crash loop, or an exit with
        ALWAYS_RESTART_COMFYUI=false)."""
        self._warmup = warmup
        self._spawn(self.events.run())
        self._spawn(self._watch_quiet_socket())
        try:
            await self._supervise()
        except Fatal as exc:
            self.set_phase(Phase.FAILED, str(exc))
            raise

    async def _supervise(self) -> None:
        while True:
            process = ComfyProcess(
                self.argv,
                env=self.env or None,
                instance=self.name,
                label=self.label,
            )
            self.process = process
            await self._refuse_taken_port()
            try:
                await process.start()
            except LaunchError as exc:
                raise Fatal(f"CMD: {exc}") from None
            exited = asyncio.ensure_future(process.wait())
            self._down = None
            self.jobs_done = 0
            self.recycling = False
            self._recycle.clear()
            try:
                await self._bring_up(process, exited)
                self.ever_ready = True
                self.set_phase(Phase.READY, "ComfyUI is up, warm and connected")
                self.signals.ready(self)
                await self._race(self._serve_until_recycled(), exited)
            except ChildExited as exc:
                self._child_lost(exc)
            else:
                await self._recycle_child(process)
                continue
            finally:
                self._stop_watching()
            await process.stop(timeout_s=5)
            try:
                delay = self.policy.next_delay()
            except CrashLoop as exc:
                raise Fatal(str(exc)) from None
            self.set_phase(Phase.RESTARTING, f"restarting ComfyUI in {delay:.1f} s")
            await asyncio.sleep(delay)

    async def _refuse_taken_port(self) -> None:
        """Raise :class:`Fatal` when this instance's port answers before its child started:
        another process (often a ComfyUI left by a SIGKILLed sidecar) would be taken for ours,
        and would answer jobs whose outputs never reach OUTPUT_DIR."""
        host = self.settings.direct_address.strip("[]")
        if await port_taken(host, self.port):
            raise Fatal(
                f"COMFYUI_PORT_HOST: port {self.port} on {host} already answers before ComfyUI "
                f"instance {self.name} was started (a ComfyUI left running by an earlier "
                f"sidecar, or another program); stop it or choose another port"
            )

    def _child_lost(self, exc: ChildExited) -> None:
        """The child exited, or was killed as hung or stalled: fail its jobs (the pipeline
        re-queues the ones not started), count the restart; raises :class:`Fatal` with
        ALWAYS_RESTART_COMFYUI=false."""
        kind, reason, message = self._down or ("exit", "comfyui_exited", str(exc))
        self.registry.fail_all(message, reason)
        log.error("%s%s", self._prefix(), exc if self._down is None else message)
        if not self.settings.always_restart_comfyui:
            raise Fatal(f"{message}; ALWAYS_RESTART_COMFYUI is false") from None
        self.restarts[kind] += 1
        metrics.process_restart(self.name, kind)
        self._emit("restart", {"reason": reason, "message": message})

    async def _recycle_child(self, process: ComfyProcess) -> None:
        """Restart a child whose jobs finished after a RECYCLE_* limit tripped: SIGTERM, wait,
        and let :meth:`_supervise` start and warm a new one (no crash backoff)."""
        code = await process.stop(timeout_s=30)
        self.registry.fail_all("ComfyUI was recycled", "recycle")  # none, unless one slipped in
        log.info("%srecycled ComfyUI (exit code %s); starting a new one", self._prefix(), code)
        self.restarts["recycle"] += 1
        metrics.process_restart(self.name, "recycle")
        self.set_phase(Phase.RESTARTING, "recycling: starting a new ComfyUI")

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
        self._watchdog = self._spawn(self._watch_child(process))
        self.events.connect_now()
        remaining = max(5.0, deadline - (time.monotonic() - started))
        if not await self._race(self.events.wait_connected(remaining), exited):
            await process.stop()
            raise Fatal("the websocket to ComfyUI could not be opened")
        log.info("%sComfyUI answered after %.2f s", self._prefix(), time.monotonic() - started)
        metrics.startup_phase("launch", time.monotonic() - started)
        learned = self._spawn(self._learn_output_nodes())  # beside the warmup, not after it
        if self._warmup is not None:
            self.set_phase(Phase.WARMING, "running the warmup prompt")
            await self._race(self._warmup(self), exited)
        await self._race(learned, exited)

    async def _learn_output_nodes(self) -> None:
        """Ask ComfyUI once which node classes are output nodes (``GET /object_info``), so a
        submission to the shared queue is checked with no call to ComfyUI. A failure is
        logged: those checks then leave the output-node question to the running replica."""
        try:
            count = await self.client.load_output_nodes()
        except ComfyUnavailable as exc:
            log.warning("%scould not read ComfyUI's node classes: %s", self._prefix(), exc)
            return
        log.debug("%sComfyUI has %d node classes", self._prefix(), count)

    def _stop_watching(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()

    async def _wait_answering(self, deadline_s: float, listening: asyncio.Event) -> bool:
        """Ping ComfyUI with a short backoff (FIRST_PING_S doubling up to
        STARTUP_CHECK_INTERVAL_S), and at once when it prints that its socket is bound; False
        when ``deadline_s`` passed."""
        ceiling = self.settings.startup_check_interval_s
        interval = min(FIRST_PING_S, ceiling)
        end = time.monotonic() + deadline_s
        while True:
            if await self.client.ping():
                return True
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            was_listening = listening.is_set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listening.wait(), min(interval, remaining))
            if was_listening or not listening.is_set():
                interval = min(interval * 2, ceiling)
            # else: the marker just appeared: ping again at once

    async def stop(self) -> int | None:
        """Stop the child (SIGTERM, then SIGKILL); returns its exit code."""
        if self.process is None:
            return None
        code = await self.process.stop()
        log.info("%sComfyUI stopped (exit code %s)", self._prefix(), code)
        return code

    async def aclose(self) -> None:
        """Cancel the instance's own tasks and close its HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.client.aclose()
