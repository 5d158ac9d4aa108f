"""In-process sidecars: the whole of comfy_sidecar run in a thread of the test process.

:class:`InProcessSidecar` has the surface of :class:`tests.conftest.Sidecar` (``url``, ``get``,
``post``, ``env``, ``backend``, ``log()``, ``wait_ready``, ``wait_exit``, ``child_pid``,
``stop``...), so a test reads the same whichever runs it. ``start()`` runs the sidecar's own
:func:`comfy_sidecar.runtime.lifecycle.serve` — settings parsed from the sidecar's ``env``, the
socket bound by :func:`comfy_sidecar.boot.bind_socket`, the container built, the runtime and
uvicorn started — in a new event loop on a thread of its own, on a real loopback port, in front
of its ComfyUI (the double, or a real one), which is still the instance's child process: the
supervision (exits, restarts, SIGKILL of a hung child) is the real one. What it saves is the
sidecar's interpreter start and imports (about 0.9 s of CPU each).

What it is not: a process. There is no ``proc``, no exit by signal, no SIGHUP (use
:meth:`InProcessSidecar.reload_api_keys`), no ``uvloop``, no ``__main__`` (argument parsing, the
boot probes, ``mallopt``) and no frozen binary; the Prometheus event metrics are process-wide,
so counters add up over every in-process sidecar of the session. Tests of those things use
subprocess sidecars (``process=True`` on ``running_sidecar``/``spawn``, see tests/conftest.py).

:func:`running_container` is the same sidecar without its HTTP server, in the test's own event
loop: the :class:`~comfy_sidecar.runtime.container.Container` built by
:func:`comfy_sidecar.runtime.container.build` and run by
:class:`~comfy_sidecar.runtime.lifecycle.Runtime`, for tests of the layers below HTTP (the
pipeline, the job lifecycle, both job backends, the dispatcher, the instances)::

    async with running_container(sidecar_env(Backend("double", tmp / "comfy"), tmp)[0]) as c:
        view = await c.jobs.submit(JobSpec(request=..., endpoint="jobs"))

Each sidecar's log records go to its own ``log_path`` in its LOG_FORMAT at its LOG_LEVEL: a
record is routed by the context it was made in (every task and ``asyncio.to_thread`` of the
sidecar's loop inherits it); a record made with no sidecar context (a bare executor thread of
the storage SDKs) goes to every in-process sidecar running, never one from the test's own main
thread. Exit codes are those of the process: 0 after a drain, 1 when ComfyUI cannot be kept
running, 2 for bad configuration (its one line written to the log, as on stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import subprocess
import threading
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from comfy_sidecar.boot import bind_socket
from comfy_sidecar.config import ConfigError, load_settings
from comfy_sidecar.observability import logs
from comfy_sidecar.runtime.container import Container, build
from comfy_sidecar.runtime.lifecycle import Runtime, serve
from tests.conftest import Sidecar
from tests.waiting import async_wait_for

if TYPE_CHECKING:
    from litestar import Litestar

__all__ = ["InProcessSidecar", "running_container"]

_CURRENT: contextvars.ContextVar[InProcessSidecar | None] = contextvars.ContextVar(
    "in_process_sidecar", default=None
)
_RUNNING: set[InProcessSidecar] = set()
_LOCK = threading.Lock()


class _Route(logging.Handler):
    """The one root handler routing records to the in-process sidecars' log files."""

    def emit(self, record: logging.LogRecord) -> None:
        owner = _CURRENT.get()
        if owner is not None:
            owner.write_record(record)
            return
        if record.thread == threading.main_thread().ident:
            return  # the test's own code, never a sidecar's
        with _LOCK:
            targets = list(_RUNNING)
        for sidecar in targets:
            sidecar.write_record(record)


_ROUTE = _Route(level=logging.NOTSET)
_DEFAULT_ROOT_LEVEL = logging.getLogger().level


def _relevel() -> None:
    """The root logger at the most verbose level of the running sidecars (pytest's at rest)."""
    root = logging.getLogger()
    with _LOCK:
        levels = [s.level for s in _RUNNING]
    if levels:
        if _ROUTE not in root.handlers:
            root.addHandler(_ROUTE)
        root.setLevel(min(levels))
        for noisy in logs.NOISY:
            logging.getLogger(noisy).setLevel(max(logging.WARNING, min(levels)))
    else:
        root.removeHandler(_ROUTE)
        root.setLevel(_DEFAULT_ROOT_LEVEL)


class InProcessSidecar(Sidecar):
    """A sidecar served from a thread of this process (see the module docstring)."""

    __hash__ = object.__hash__  # one entry per sidecar in the running set
    level = logging.INFO
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _runtime: Runtime | None = None
    _app: Litestar | None = None
    #: The exit status :func:`serve` returned (None while it runs).
    exit_code: int | None = None

    def start(
        self, binary: Any = None, python: str | None = None, module: str = "comfy_sidecar"
    ) -> InProcessSidecar:
        if binary is not None or python is not None or module != "comfy_sidecar":
            raise ValueError("a binary, another python or module needs a subprocess sidecar")
        self.exit_code = None
        self._controlled = threading.Event()
        self._log_lock = threading.Lock()
        self._log_file = self.log_path.open("a", encoding="utf-8")
        self.level = logs.level_number(self.env.get("LOG_LEVEL", "info"))
        self._formatter = logs.formatter(self.env.get("LOG_FORMAT", "text"))
        with _LOCK:
            _RUNNING.add(self)
        _relevel()
        self._thread = threading.Thread(target=self._main, name=f"sidecar-{self.port}", daemon=True)
        self._thread.start()
        return self

    # --- the sidecar's thread -----------------------------------------------------------------

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self.exit_code = loop.run_until_complete(self._serve())
        except asyncio.CancelledError:  # killed (see kill)
            self.exit_code = -9
        except BaseException as exc:  # a crash of the harness itself: the test must see it
            self.exit_code = 70
            self.write_line(f"in-process sidecar crashed: {exc!r}")
            logging.getLogger("tests.inprocess").exception("in-process sidecar crashed")
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                self._controlled.set()
                with _LOCK:
                    _RUNNING.discard(self)
                _relevel()
                with self._log_lock:
                    self._log_file.close()

    async def _serve(self) -> int:
        _CURRENT.set(self)
        self._task = asyncio.current_task()
        try:
            settings = load_settings(self.env)
            sock = bind_socket(settings.host, settings.port)
        except ConfigError as exc:
            self.write_line(f"comfy-sidecar: {exc}")
            return 2
        sock.setblocking(False)
        return await serve(settings, sock, None, env=self.env, control=self._control)

    def _control(self, runtime: Runtime, app: Litestar) -> None:
        self._runtime, self._app = runtime, app
        self._controlled.set()

    # --- its log ------------------------------------------------------------------------------

    def write_record(self, record: logging.LogRecord) -> None:
        if record.levelno < self.level:
            return
        try:
            line = self._formatter.format(record)
        except Exception:  # a record that cannot be formatted must not break the sidecar
            line = f"(unformattable record {record.msg!r})"
        self.write_line(line)

    def write_line(self, line: str) -> None:
        with self._log_lock:
            if not self._log_file.closed:
                self._log_file.write(line + "\n")
                self._log_file.flush()

    # --- the process-like surface ------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check_alive(self) -> None:
        if not self.running:
            raise AssertionError(f"sidecar exited {self.exit_code}:\n{self.log()[-4000:]}")

    def wait_status(self, path: str, code: int, timeout: float) -> Any:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                last = self.client.get(self.url + path, timeout=5)
                if last.status_code == code:
                    return last
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"{path} never answered {code} (last: {last}):\n{self.log()[-4000:]}")

    @property
    def container(self) -> Any:
        """The sidecar's :class:`~comfy_sidecar.runtime.container.Container` (once built)."""
        self._controlled.wait(30)
        assert self._runtime is not None, "the sidecar was never built"
        return self._runtime.c

    def child_pid(self) -> int:
        """The pid of ComfyUI (the first instance's child process)."""
        pid = self.container.instances[0].process.pid
        assert pid is not None, "the sidecar has no child process"
        return int(pid)

    def request_stop(self) -> None:
        """What SIGTERM does to the process: drain, then stop."""
        self._controlled.wait(30)
        runtime, loop = self._runtime, self._loop
        if runtime is not None and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(runtime.stop_requested.set)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def reload_api_keys(self) -> None:
        """What SIGHUP does to the process: re-read API_KEYS_FILE."""
        app, loop = self._app, self._loop
        assert app is not None and loop is not None
        asyncio.run_coroutine_threadsafe(_call(app.state.api_keys.reload), loop).result(10)

    def wait_exit(self, timeout: float) -> int:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired("in-process sidecar", timeout)
        assert self.exit_code is not None
        return self.exit_code

    def kill(self) -> None:
        """What SIGKILL does to the process: every task of the sidecar's loop cancelled at once
        (no drain); its ComfyUI children die with its thread (``PR_SET_PDEATHSIG``)."""
        loop, task = self._loop, getattr(self, "_task", None)
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def stop(self) -> None:
        """As :meth:`Sidecar.stop`: SIGTERM (a drain), and after 60 s SIGKILL."""
        if self.running:
            self.request_stop()
            assert self._thread is not None
            self._thread.join(60)
            if self._thread.is_alive():
                self.write_line("tests.inprocess: not stopped after 60 s; killed")
                self.kill()
                self._thread.join(30)
            if self._thread.is_alive():
                raise AssertionError(f"the sidecar could not be killed:\n{self.log()[-4000:]}")
        self.client.close()


async def _call(function: Any) -> None:
    function()


@contextlib.asynccontextmanager
async def running_container(
    env: Mapping[str, str], *, ready: bool = True, ready_within_s: float = 30
) -> AsyncIterator[Container]:
    """The services of a sidecar configured by ``env`` (see tests/conftest.py ``sidecar_env``),
    built and started in the running event loop: leftovers cleared, webhooks and storage
    started, the job backend started, every instance launched (its child is ``CMD``) and, with
    ``ready``, each one accepting jobs before this yields. At the end: drained and closed as on
    SIGTERM. Raises AssertionError when the runtime stops before it is ready."""
    settings = load_settings(env)
    container = build(settings, env=env)
    runtime = Runtime(container)
    life = asyncio.ensure_future(runtime.lifecycle())
    try:
        if ready:
            await async_wait_for(
                lambda: life.done() or all(i.accepting for i in container.instances),
                timeout=ready_within_s,
                what="every instance to accept jobs",
            )
            if life.done():
                raise AssertionError(
                    f"the runtime stopped ({life.result()}): {container.health.detail}"
                )
        yield container
    finally:
        try:
            await runtime.drain()
        finally:
            life.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await life
            await runtime.close()
