"""The ComfyUI child process (mechanism: spawn, log capture, stop) and its restart policy.

The child runs ``CMD`` (already split like a shell would) in its own process group, so stopping
it reaches whatever it started (``comfy launch`` wraps python, shell scripts wrap both). On Linux
it also dies with the sidecar: it is started with ``PR_SET_PDEATHSIG`` = SIGKILL, so a SIGKILLed
sidecar (OOM killer, ``kill -9``) leaves no ComfyUI behind for the next one to adopt. That
reaches the direct child only (the kernel clears it in the child's own children): a wrapper
script should ``exec`` ComfyUI, and :func:`port_taken` catches what is left. Its stdout
and stderr lines go to the sidecar's log under the ``comfyui`` logger, tagged with the child's
``instance`` (:data:`comfy_sidecar.observability.logs.INSTANCE`), and into a ring buffer whose
tail is attached to execution errors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from comfy_sidecar.net.backoff import backoff_delay
from comfy_sidecar.observability.logs import INSTANCE

log = logging.getLogger("comfy_sidecar.supervisor")
child_log = logging.getLogger("comfyui")

GUI_MARKER = "To see the GUI go to:"


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGKILL the child when the sidecar dies (None on
    other systems, or when libc's ``prctl`` cannot be found).

    ``prctl`` is looked up here, in the parent, so the child only makes one call between fork
    and exec. The signal is sent when the thread that forked the child exits: the sidecar
    starts children from its event loop's thread, which lives as long as the sidecar. If the
    sidecar died before the call took effect, the child is already orphaned and exits at once.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class LaunchError(Exception):
    """``CMD`` could not be started (not found, not executable)."""


class ComfyProcess:
    """One run of the ComfyUI child. ``ring`` keeps its last ``ring_size`` output lines;
    ``instance`` names the child in log records (``"0"`` for the first)."""

    def __init__(
        self,
        argv: list[str],
        ring_size: int = 500,
        env: dict[str, str] | None = None,
        instance: str = "0",
        label: str = "",
    ) -> None:
        self.argv = argv
        self.env = env
        self.instance = instance
        self.label = label  # shown before each line in text logs when several instances run
        self.ring: collections.deque[str] = collections.deque(maxlen=ring_size)
        self.process: asyncio.subprocess.Process | None = None
        self.listening = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self.process.pid if self.process else None

    async def start(self) -> None:
        """Spawn the child in a new session (process group), set to die with the sidecar
        (``PR_SET_PDEATHSIG``, Linux). Raises :class:`LaunchError`."""
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=None if self.env is None else {**os.environ, **self.env},
                preexec_fn=_die_with_parent(),  # one prctl call between fork and exec
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise LaunchError(f"cannot run {self.argv[0]!r}: {exc.strerror}") from None
        log.info(
            "started ComfyUI (pid %d): %s",
            self.process.pid,
            " ".join(self.argv),
            extra={"instance": self.instance},
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            asyncio.create_task(self._pump(self.process.stdout, "out")),
            asyncio.create_task(self._pump(self.process.stderr, "err")),
        ]

    async def _pump(self, stream: asyncio.StreamReader, tag: str) -> None:
        INSTANCE.set(self.instance)  # this reader task's records name the child
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the reader's limit
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            self.ring.append(line)
            child_log.info("[%s] %s", f"{self.label} {tag}" if self.label else tag, line)
            if GUI_MARKER in line:
                self.listening.set()

    def tail(self, lines: int) -> list[str]:
        """The last ``lines`` lines the child printed."""
        return list(self.ring)[-lines:]

    async def wait(self) -> int:
        """Wait for the child to exit; returns its exit code (negative: killed by a signal)."""
        assert self.process is not None
        code = await self.process.wait()
        for reader in self._readers:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(reader, 1.0)
        return code

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the child's process group, SIGKILL it after ``timeout_s`` seconds.

        Returns the exit code, or None if it was never started.
        """
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                log.warning("ComfyUI did not stop within %.0f s; killing it", timeout_s)
                self._signal(signal.SIGKILL)
                await process.wait()
        # Anything left in the group (grandchildren) goes too.
        self._signal(signal.SIGKILL)
        for reader in self._readers:
            reader.cancel()
        return process.returncode

    def kill(self) -> None:
        """SIGKILL the child's whole process group now (a hung child: SIGKILL also ends a
        stopped process); :meth:`wait` then returns."""
        self._signal(signal.SIGKILL)

    def rss_bytes(self) -> int:
        """Resident memory of the child's process group, in bytes: the sum of ``VmRSS`` of
        every process in it (Linux ``/proc``; 0 elsewhere or when it is not running)."""
        if self.process is None or self.process.returncode is not None:
            return 0
        return group_rss_bytes(self.process.pid)

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


async def port_taken(host: str, port: int, wait_s: float = 3.0) -> bool:
    """True when something still accepts TCP connections on ``host:port`` after ``wait_s``
    seconds (polled every 0.1 s: a child killed a moment ago, or a predecessor's child that
    ``PR_SET_PDEATHSIG`` is killing, lets go of it meanwhile). A refused or failed connection
    means free; each attempt is limited to 1 s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while True:
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        if loop.time() >= end:
            return True
        await asyncio.sleep(0.1)


def group_rss_bytes(pgid: int, proc: str = "/proc") -> int:
    """Sum of ``VmRSS`` (bytes) of the processes in process group ``pgid``, read from
    ``proc``; processes that vanish while being read are skipped."""
    total = 0
    try:
        entries = os.listdir(proc)
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ")".
            if int(stat.rpartition(")")[2].split()[2]) != pgid:
                continue
            with open(f"{proc}/{entry}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024  # kB
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total


class CrashLoop(Exception):
    """ComfyUI exited more than RESTART_MAX times within RESTART_WINDOW_S."""


class RestartPolicy:
    """When to restart a ComfyUI child (the policy half, as uvicorn's ``Multiprocess`` is to its
    ``Process``): exponential backoff with jitter, and a crash-loop cap of ``max_restarts``
    restarts within ``window_s`` seconds."""

    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.restarts: collections.deque[float] = collections.deque()

    def next_delay(self, now: float | None = None) -> float:
        """Seconds to wait before the next restart: 0.5 s doubling to 30 s, times a factor in
        [0.8, 1.2]. Raises :class:`CrashLoop` past the cap."""
        now = time.monotonic() if now is None else now
        while self.restarts and now - self.restarts[0] > self.window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            raise CrashLoop(
                f"ComfyUI exited {len(self.restarts) + 1} times within {self.window_s:g} s "
                f"(RESTART_MAX={self.max_restarts}); giving up"
            )
        self.restarts.append(now)
        return backoff_delay(len(self.restarts), 0.5 * 1.2, 30.0 * 1.2, jitter=1 - 0.8 / 1.2)
