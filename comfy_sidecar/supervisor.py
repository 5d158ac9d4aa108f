"""The ComfyUI child process: spawn, log capture, stop.

The child runs ``CMD`` (already split like a shell would) in its own process group, so stopping
it reaches whatever it started (``comfy launch`` wraps python, shell scripts wrap both). Its stdout
and stderr lines go to the sidecar's log under the ``comfyui`` logger, tagged with the child's
``instance`` (:data:`comfy_sidecar.logs.INSTANCE`), and into a ring buffer whose tail is attached
to execution errors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal

from comfy_sidecar.logs import INSTANCE

log = logging.getLogger("comfy_sidecar.supervisor")
child_log = logging.getLogger("comfyui")

GUI_MARKER = "To see the GUI go to:"


class LaunchError(Exception):
    """``CMD`` could not be started (not found, not executable)."""


class ComfyProcess:
    """One run of the ComfyUI child. ``ring`` keeps its last ``ring_size`` output lines;
    ``instance`` names the child in log records (``"0"`` for the first)."""

    def __init__(self, argv: list[str], ring_size: int = 500, instance: str = "0") -> None:
        self.argv = argv
        self.instance = instance
        self.ring: collections.deque[str] = collections.deque(maxlen=ring_size)
        self.process: asyncio.subprocess.Process | None = None
        self.listening = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self.process.pid if self.process else None

    async def start(self) -> None:
        """Spawn the child in a new session (process group). Raises :class:`LaunchError`."""
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
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
            child_log.info("[%s] %s", tag, line)
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

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)
