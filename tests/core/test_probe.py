"""The outside probe's findings 5, 7, 8 and 9 (issue 13): undelivered async results hold no open
files and are bounded, ComfyUI dies with a SIGKILLed sidecar and a taken port is refused, a
frozen ComfyUI cannot stretch PROMPT_TIMEOUT_S, and /interrupt never claims a job that
completed — each against a sidecar process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Backend, Sidecar, basic_prompt, slow_prompt
from tests.receiver import Receiver
from tests.waiting import wait_for


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def port_answers(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


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


def test_comfy_frozen_before_the_post_answers_504_within_prompt_timeout(
    spawn: Any, tmp_path: Path
) -> None:
    """A ComfyUI frozen before it took the job: ``POST /prompt`` to it outlasts the hang check,
    but PROMPT_TIMEOUT_S counts from the POST, so the caller still gets its 504 in time."""
    timeout_s = 4.0
    sidecar: Sidecar = spawn(
        Backend("double", tmp_path / "comfy"),
        PROMPT_TIMEOUT_S=str(timeout_s),
        COMFYUI_HANG_TIMEOUT_S="600",
    )
    sidecar.wait_ready()
    child = sidecar.child_pid()
    with resumed_at_exit(child):
        os.kill(child, signal.SIGSTOP)
        sent = time.monotonic()
        response = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)}, timeout=300)
        took = time.monotonic() - sent
    assert response.status_code == 504, response.text
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
    assert seen, "no race ran"


# --- finding 7: ComfyUI dies with the sidecar; a taken port is refused -------------------------


@pytest.mark.sidecar_process
def test_sigkilled_sidecar_takes_comfy_with_it(spawn: Any, backend: Backend) -> None:
    """``kill -9`` of the sidecar ends its ComfyUI too (PR_SET_PDEATHSIG), so nothing is left
    on the port for the next sidecar to adopt."""
    sidecar: Sidecar = spawn(backend)
    sidecar.wait_ready()
    child = sidecar.child_pid()
    assert sidecar.proc is not None
    try:
        sidecar.proc.kill()
        sidecar.proc.wait(timeout=30)
        wait_for(lambda: not pid_alive(child), timeout=30, what=f"ComfyUI (pid {child}) to end")
        # Its last threads let go of the socket a moment after the process shows as ended.
        wait_for(
            lambda: not port_answers(sidecar.comfy_port),
            timeout=30,
            interval=0.1,
            what=f"port {sidecar.comfy_port} to stop answering",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child, signal.SIGKILL)  # the orphan, if the test failed


def test_taken_comfy_port_is_refused(spawn: Any, tmp_path: Path) -> None:
    """A port that already answers before the sidecar started ComfyUI (a leftover ComfyUI, or
    another program) stops the sidecar with one line naming the variable and the port, instead
    of adopting whatever answers there."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(64)
        port = squatter.getsockname()[1]
        backend = Backend("double", tmp_path / "comfy")
        sidecar: Sidecar = spawn(backend, COMFYUI_PORT_HOST=str(port), CMD=backend.cmd(port))
        assert sidecar.wait_exit(timeout=60) == 1
    lines = [line for line in sidecar.log().splitlines() if "fatal:" in line]
    assert len(lines) == 1, sidecar.log()[-3000:]
    assert "COMFYUI_PORT_HOST" in lines[0] and f"port {port}" in lines[0], lines[0]
    assert "started ComfyUI" not in sidecar.log()


# --- finding 5: undelivered results hold no open files, and are bounded ----------------------


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.sidecar_process
def test_undelivered_results_hold_no_files_and_are_bounded(
    spawn: Any, receiver: Any, backend: Backend
) -> None:
    """40 async jobs whose receiver never answers: once all have run, the sidecar's open
    files have not grown with them (the probe saw one per job, and EMFILE at ~1000), and the
    41st async job gets 429 with Retry-After while sync jobs and /health still work."""
    jobs = 40
    sidecar: Sidecar = spawn(
        backend,
        MAX_PENDING_DELIVERIES=str(jobs),
        WEBHOOK_TIMEOUT_S="300",
        PROMPT_WEBHOOK_RETRIES="1",
        SHUTDOWN_GRACE_S="1",
    )
    hook: Receiver = receiver(hang=True)
    sidecar.wait_ready()
    assert sidecar.proc is not None
    pid = sidecar.proc.pid
    warm = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)})
    assert warm.status_code == 200, warm.text
    before = open_fds(pid)
    ids = [f"undelivered-{i}" for i in range(jobs)]
    for job_id in ids:
        body = {"prompt": basic_prompt(batch=1, prefix="held"), "id": job_id}
        accepted = sidecar.post("/prompt", json={**body, "webhook_v2": hook.url + "/hook"})
        assert accepted.status_code == 202, accepted.text

    def all_ran() -> bool:
        states = [sidecar.get(f"/jobs/{job_id}").json().get("status") for job_id in ids]
        return all(state == "completed" for state in states)

    wait_for(all_ran, timeout=120, interval=0.2, what=f"the {jobs} async jobs to run")
    hook.wait_for(1, timeout=30)  # deliveries are under way, and none is answered
    grown = open_fds(pid) - before
    assert grown < jobs // 4, f"{grown} more open files with {jobs} undelivered results"
    refused = sidecar.post(
        "/prompt", json={"prompt": basic_prompt(batch=1), "webhook_v2": hook.url + "/hook"}
    )
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert "MAX_PENDING_DELIVERIES" in refused.json()["error"]
    assert sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)}).status_code == 200
    assert sidecar.get("/health").status_code == 200
    # Once the receiver is gone the deliveries fail, and their places are free again.
    hook.stop()
    late = {"prompt": basic_prompt(batch=1), "webhook_v2": hook.url + "/hook"}
    wait_for(
        lambda: sidecar.post("/prompt", json=late).status_code == 202,
        timeout=120,
        interval=0.5,
        what="an async job to be admitted after the deliveries gave up",
    )
