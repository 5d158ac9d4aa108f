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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.conftest import Backend, Sidecar, basic_prompt, slow_prompt


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


# --- finding 9: /interrupt and the job's end are decided once ---------------------------------


def test_interrupt_race_answers_consistently(spawn: Any, backend: Backend) -> None:
    """An /interrupt sent while a prompt ends, at 40 points spread over the prompt's life:
    either the interrupt wins (200 "success", the prompt 499) or the job had ended
    (404 "failed", the prompt 200). Never 200 "success" with the prompt's outputs."""
    sidecar: Sidecar = spawn(backend)
    sidecar.wait_ready()
    prompt = basic_prompt(batch=1, size=256, prefix="race")
    started = time.monotonic()
    assert sidecar.post("/prompt", json={"prompt": prompt}).status_code == 200
    lifetime = time.monotonic() - started
    seen: set[tuple[int, int]] = set()
    with ThreadPoolExecutor(1) as pool:
        for i in range(40):
            job_id = f"race-{i}"
            answer = pool.submit(
                sidecar.post, "/prompt", json={"prompt": prompt, "id": job_id}, timeout=120
            )
            # The race itself: the interrupt goes out 0 to 1.2x a prompt's lifetime after the
            # prompt (early, mid-run, as it ends, after), not a wait for a condition.
            time.sleep(lifetime * 1.2 * i / 39)
            stop = sidecar.post("/interrupt", json={"id": job_id}, timeout=60)
            done = answer.result(timeout=120)
            pair = (stop.status_code, done.status_code)
            seen.add(pair)
            if stop.status_code == 200:
                assert stop.json() == {"id": job_id, "interrupted": "success"}
                assert done.status_code == 499, f"race {i}: /interrupt won but {done.text[:300]}"
            else:
                assert stop.status_code == 404, stop.text
                assert stop.json() == {"id": job_id, "interrupted": "failed"}
                assert done.status_code == 200, f"race {i}: {done.text[:300]}"
    leftovers = [p.name for p in backend.output_dir.rglob("*") if p.is_file()]
    assert not leftovers, f"files of interrupted jobs left in OUTPUT_DIR: {leftovers}"
    assert seen, "no race ran"
