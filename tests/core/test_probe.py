"""The outside probe's findings 5, 7, 8 and 9 (issue 13): undelivered async results hold no open
files and are bounded, ComfyUI dies with a SIGKILLed sidecar and a taken port is refused, a
frozen ComfyUI cannot stretch PROMPT_TIMEOUT_S, and /interrupt never claims a job that
completed — each against a sidecar process."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import Backend, Sidecar, slow_prompt


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@contextlib.contextmanager
def resumed_at_exit(pid: int) -> Iterator[None]:
    """SIGCONT ``pid`` at the end, so a test that froze it leaves nothing stopped."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# --- finding 8: every call to ComfyUI has its own timeout -------------------------------------


def test_frozen_comfy_answers_504_within_prompt_timeout(spawn: Any, backend: Backend) -> None:
    """With the hang check far away, a SIGSTOPped ComfyUI still gets the caller its 504 at
    PROMPT_TIMEOUT_S: interrupting the frozen child does not block the answer."""
    timeout_s = 4.0
    sidecar: Sidecar = spawn(backend, PROMPT_TIMEOUT_S=str(timeout_s), COMFYUI_HANG_TIMEOUT_S="600")
    sidecar.wait_ready()
    child = sidecar.child_pid()
    result: dict[str, Any] = {}

    def post() -> None:
        result["response"] = sidecar.post("/prompt", json={"prompt": slow_prompt(30)}, timeout=300)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=post)
    with resumed_at_exit(child):
        sent = time.monotonic()
        thread.start()
        sidecar.wait_comfy_running()
        os.kill(child, signal.SIGSTOP)
        thread.join(timeout=120)
        response = result["response"]
        assert response.status_code == 504, response.text
        took = result["at"] - sent
        assert took < timeout_s + 5, f"504 after {took:.1f} s with PROMPT_TIMEOUT_S={timeout_s}"
