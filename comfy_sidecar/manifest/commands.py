"""Running install commands (apt, pip, git, comfy) and finding the Python pip installs into."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("comfy_sidecar.manifest")

#: Longest any one install command may run, in seconds, before it is killed.
COMMAND_TIMEOUT_S = 3600.0
#: Lines of a failed command's output quoted in the start-up error.
TAIL_LINES = 12


class CommandFailed(Exception):
    """A command exited non-zero (or could not start, or timed out)."""


async def run_command(
    argv: Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = COMMAND_TIMEOUT_S,
) -> None:
    """Run ``argv`` (no shell) as an asyncio subprocess, streaming its merged stdout/stderr to
    the log line by line. Raises :class:`CommandFailed` with the command, its exit code and
    the last :data:`TAIL_LINES` lines of output (one line, `` | ``-joined)."""
    shown = " ".join(argv)
    log.info("running: %s", shown)
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise CommandFailed(f"`{shown}` could not start: {exc.strerror or exc}") from None
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    assert proc.stdout is not None

    async def pump() -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                tail.append(text)
                log.info("  %s: %s", argv[0].rsplit("/", 1)[-1], text)

    try:
        await asyncio.wait_for(pump(), timeout_s)
        code = await asyncio.wait_for(proc.wait(), 30)
    except (TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise CommandFailed(f"`{shown}` timed out after {timeout_s:g} s") from None
    if code != 0:
        output = " | ".join(tail) or "(no output)"
        raise CommandFailed(f"`{shown}` exited with code {code}: {output}")
    log.info("finished in %.1f s: %s", time.monotonic() - started, shown)


@dataclass(frozen=True)
class PythonTarget:
    """The Python environment pip installs go to: ComfyUI's, not the sidecar's.

    ``VIRTUAL_ENV`` when set, else ``COMFY_HOME/.venv`` or ``COMFY_HOME/venv`` when they hold
    a Python, else ``python3``/``python`` on PATH (the system environment)."""

    python: str
    venv: bool

    @classmethod
    def find(
        cls, env: Mapping[str, str], comfy_home: str, which: Callable[[str], str | None]
    ) -> PythonTarget:
        candidates = []
        if env.get("VIRTUAL_ENV"):
            candidates.append(Path(env["VIRTUAL_ENV"]))
        candidates += [Path(comfy_home) / ".venv", Path(comfy_home) / "venv"]
        for venv in candidates:
            for exe in ("python", "python3"):
                if (venv / "bin" / exe).is_file():
                    return cls(str(venv / "bin" / exe), True)
        return cls(which("python3") or which("python") or "python3", False)

    def install_argv(self, args: Sequence[str], uv: str | None) -> list[str]:
        """``uv pip install`` (``--system`` outside a venv) when uv exists, else
        ``python -m pip install`` (never ``--system``: pip has no such flag)."""
        if uv:
            scope = ["--python", self.python] + ([] if self.venv else ["--system"])
            return [uv, "pip", "install", *scope, *args]
        return [
            self.python,
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            *args,
        ]

    def install_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """Outside a venv, allow installing into an "externally managed" (PEP 668) system
        Python, as a container image does; older pips ignore the variable."""
        out = dict(env)
        if not self.venv:
            out.setdefault("PIP_BREAK_SYSTEM_PACKAGES", "1")
            out.setdefault("UV_BREAK_SYSTEM_PACKAGES", "1")
        return out
