"""Supervision: probes from the first moment, restarts, crash loops, drain on SIGTERM, warmup,
websocket loss — each with its own sidecar process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    Backend,
    Sidecar,
    basic_prompt,
    free_port,
    slow_prompt,
)
from tests.receiver import Receiver
from tests.waiting import wait_for


def test_probes_answer_503_starting_before_comfyui(spawn: Any, tmp_path: Path) -> None:
    backend = Backend("double", tmp_path / "comfy")
    sidecar: Sidecar = spawn(backend, CMD_EXTRA="--startup-delay 3")
    deadline = time.monotonic() + 5
    first: httpx.Response | None = None
    while time.monotonic() < deadline and first is None:
        try:
            first = sidecar.get("/health", timeout=1)
        except httpx.HTTPError:
            time.sleep(0.01)
    assert first is not None, "the port never answered"
    assert first.status_code == 503
    assert first.json()["status"] == "not healthy"
    ready = sidecar.get("/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "not ready"
    assert ready.json()["phase"] in ("starting", "provisioning", "launching")
    # /prompt is refused, not queued, while ComfyUI is starting.
    refused = sidecar.post("/prompt", json={"prompt": basic_prompt()})
    assert refused.status_code == 503
    sidecar.wait_ready()
    assert sidecar.get("/health").status_code == 200


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "MAX_QUEUE_DEPTH": "-1", "PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-m", "comfy_sidecar"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "MAX_QUEUE_DEPTH" in lines[0]


def test_cmd_not_found_exits_1_naming_cmd(spawn: Any, tmp_path: Path) -> None:
    sidecar: Sidecar = spawn(
        Backend("double", tmp_path / "comfy"), CMD="/nonexistent/comfy 'with quotes' --x"
    )
    assert sidecar.wait_exit(30) == 1
    assert "CMD: cannot run '/nonexistent/comfy'" in sidecar.log()


def test_startup_deadline_exits_1(spawn: Any, tmp_path: Path) -> None:
    sidecar: Sidecar = spawn(
        Backend("double", tmp_path / "comfy"),
        CMD="sleep 60",
        STARTUP_CHECK_INTERVAL_S="0.2",
        STARTUP_CHECK_MAX_TRIES="5",
    )
    assert sidecar.wait_exit(30) == 1
    assert "did not answer within 1 s" in sidecar.log()


def test_child_exit_without_restart_exits_1(spawn: Any, backend: Backend) -> None:
    sidecar: Sidecar = spawn(backend)
    sidecar.wait_ready()
    os.kill(sidecar.child_pid(), signal.SIGKILL)
    assert sidecar.wait_exit(30) == 1
    assert "ALWAYS_RESTART_COMFYUI is false" in sidecar.log()


def test_child_exit_code_0_is_an_exit_too(spawn: Any, tmp_path: Path) -> None:
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"))
    sidecar.wait_ready()
    crash = {"1": {"class_type": "DoubleExit", "inputs": {"code": 0}}}
    response = sidecar.post("/prompt", json={"prompt": crash})
    assert response.status_code == 503
    assert sidecar.wait_exit(30) == 1
    assert "exited with code 0" in sidecar.log()


def test_sigkill_mid_job_fails_fast_and_restarts(spawn: Any, backend: Backend) -> None:
    warmup = backend.base.parent / "warmup.json"
    warmup.write_text(json.dumps(basic_prompt(batch=1, size=8, prefix="warm")))
    sidecar: Sidecar = spawn(backend, ALWAYS_RESTART_COMFYUI="true", WARMUP_PROMPT_FILE=str(warmup))
    sidecar.wait_ready()
    first_child = sidecar.child_pid()
    result: dict[str, Any] = {}

    def run() -> None:
        result["response"] = sidecar.post("/prompt", json={"prompt": slow_prompt(8)})
        result["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    sidecar.wait_comfy_running()
    killed_at = time.monotonic()
    os.kill(first_child, signal.SIGKILL)
    thread.join(timeout=60)
    response = result["response"]
    assert response.status_code == 503, response.text
    assert "ComfyUI exited" in response.json()["error"]
    assert result["at"] - killed_at < 5, "the job must fail at once, not hang"
    # /health stays 200 while ComfyUI restarts; /ready comes back after a new warmup.
    assert sidecar.get("/health").status_code == 200
    sidecar.wait_ready()
    assert sidecar.child_pid() != first_child
    assert sidecar.log().count("warmup finished") == 2
    again = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)})
    assert again.status_code == 200


def test_crash_loop_gives_up(spawn: Any, tmp_path: Path) -> None:
    sidecar: Sidecar = spawn(
        Backend("double", tmp_path / "comfy"),
        ALWAYS_RESTART_COMFYUI="true",
        CMD=f"{sys.executable} -c 'import sys; sys.exit(3)'",
        RESTART_MAX="2",
    )
    assert sidecar.wait_exit(60) == 1
    assert "giving up" in sidecar.log()


@pytest.mark.sidecar_process
def test_sigterm_drains_job_in_flight(spawn: Any, backend: Backend) -> None:
    sidecar: Sidecar = spawn(backend)
    sidecar.wait_ready()
    child = sidecar.child_pid()
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            response=sidecar.post("/prompt", json={"prompt": slow_prompt(2)})
        )
    )
    thread.start()
    sidecar.wait_comfy_running()
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGTERM)
    # New work is refused while draining, and the probes say so.
    sidecar.wait_status("/ready", 503, 10)
    assert sidecar.post("/prompt", json={"prompt": basic_prompt()}).status_code == 503
    thread.join(timeout=90)
    assert result["response"].status_code == 200, result["response"].text
    assert sidecar.wait_exit(60) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


@pytest.mark.sidecar_process
def test_drain_delay_fails_ready_but_serves_new_requests_first(
    spawn: Any, backend: Backend
) -> None:
    sidecar: Sidecar = spawn(backend, DRAIN_DELAY_S="4")
    sidecar.wait_ready()
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    ready = sidecar.wait_status("/ready", 503, 10)
    assert "DRAIN_DELAY_S=4" in ready.json()["detail"]
    # Within the delay a new request is still served (a load balancer has not noticed yet)...
    served = sidecar.post("/prompt", json={"prompt": basic_prompt()})
    assert served.status_code == 200, served.text
    assert time.monotonic() - signalled < 4, "the request must land inside the delay"
    # ... and after it the drain refuses new work as without a delay.
    refused = wait_for(
        lambda: (
            (r := sidecar.post("/prompt", json={"prompt": basic_prompt()})).status_code == 503 and r
        ),
        timeout=20,
        what="new requests to be refused after DRAIN_DELAY_S",
    )
    assert time.monotonic() - signalled >= 4
    assert refused.json()["error"] == "the sidecar is shutting down"
    assert sidecar.wait_exit(60) == 0


@pytest.mark.sidecar_process
def test_sigterm_grace_expires(spawn: Any, tmp_path: Path) -> None:
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"), SHUTDOWN_GRACE_S="1")
    sidecar.wait_ready()
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            response=sidecar.post("/prompt", json={"prompt": slow_prompt(8)})
        )
    )
    thread.start()
    sidecar.wait_comfy_running()
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.wait_exit(30) == 0
    thread.join(timeout=30)
    assert result["response"].status_code == 503


@pytest.mark.sidecar_process
def test_sigterm_sends_every_webhook_of_jobs_ending_in_the_shutdown(
    spawn: Any, backend: Backend, receiver: Any
) -> None:
    """SIGTERM with asynchronous webhook_v2 jobs running and waiting, and a grace shorter than
    they need: each job gets exactly one webhook, a completed one ``prompt.complete``, the rest
    ``prompt.failed`` (the sidecar is shutting down); none of them ends after the webhook
    dispatcher closed (it used to, and its webhook raised ``RuntimeError: webhook dispatcher
    is not running``, lost)."""
    hook: Receiver = receiver()
    sidecar: Sidecar = spawn(backend, SHUTDOWN_GRACE_S="4", LOG_LEVEL="info")
    sidecar.wait_ready()
    ids = [f"term-{i}" for i in range(6)]
    for job_id in ids:
        response = sidecar.post(
            "/prompt",
            json={"prompt": slow_prompt(2), "id": job_id, "webhook_v2": hook.url + "/hook"},
        )
        assert response.status_code == 202, response.text
    sidecar.wait_comfy_running()
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.wait_exit(90) == 0
    bodies: dict[str, list[dict[str, Any]]] = {}
    for request in hook.snapshot():
        body = json.loads(request.body)
        bodies.setdefault(body["id"], []).append(body)
    log = sidecar.log()
    assert "not running" not in log and "Traceback" not in log, log[-4000:]
    assert sorted(bodies) == ids, (sorted(bodies), log[-4000:])
    for job_id, sent in bodies.items():
        assert len(sent) == 1, (job_id, sent)
        (body,) = sent
        if body["type"] == "prompt.failed":
            assert body["error"]["error"].endswith("the sidecar is shutting down"), body
        else:
            assert body["type"] == "prompt.complete" and body["images"], body
    assert any(b[0]["type"] == "prompt.failed" for b in bodies.values()), "the grace ran out"


def test_failing_warmup_is_fatal(spawn: Any, tmp_path: Path) -> None:
    warmup = tmp_path / "warmup.json"
    warmup.write_text(
        json.dumps(
            {
                "1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
                "2": {
                    "class_type": "SaveImage",
                    "inputs": {"images": ["1", 0], "filename_prefix": "w"},
                },
            }
        )
    )
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"), WARMUP_PROMPT_FILE=str(warmup))
    assert sidecar.wait_exit(30) == 1
    assert "the warmup prompt failed" in sidecar.log()


def test_unreadable_warmup_file_names_the_variable(spawn: Any, tmp_path: Path) -> None:
    sidecar: Sidecar = spawn(
        Backend("double", tmp_path / "comfy"), WARMUP_PROMPT_FILE=str(tmp_path / "nope.json")
    )
    assert sidecar.wait_exit(30) == 1
    assert "WARMUP_PROMPT_FILE: cannot read" in sidecar.log()


def test_max_queue_depth_turns_ready_503(spawn: Any, tmp_path: Path) -> None:
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"), MAX_QUEUE_DEPTH="1")
    sidecar.wait_ready()
    thread = threading.Thread(
        target=lambda: sidecar.post("/prompt", json={"prompt": slow_prompt(2)})
    )
    thread.start()
    busy = sidecar.wait_status("/ready", 503, 10)
    assert "queue depth" in busy.json()["detail"]
    # A job beyond MAX_QUEUE_DEPTH is refused at once with 429 and Retry-After, not queued.
    full = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)})
    assert full.status_code == 429, full.text
    assert full.headers["retry-after"]
    assert "MAX_QUEUE_DEPTH" in full.json()["error"]
    thread.join(timeout=60)
    sidecar.wait_ready(10)
    assert sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)}).status_code == 200


def test_lost_websocket_does_not_hang_a_job(spawn: Any, tmp_path: Path) -> None:
    """comfyui-api's issue #186: the socket drops mid-job; the job still completes."""
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"), COMFYUI_QUIET_RECONCILE_S="0.4")
    sidecar.wait_ready()
    comfy = f"http://127.0.0.1:{sidecar.comfy_port}"
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            response=sidecar.post("/prompt", json={"prompt": slow_prompt(2)})
        )
    )
    thread.start()
    sidecar.wait_comfy_running()
    # Mute the double (frames are lost) and drop the socket; the job ends while we are away.
    httpx.post(comfy + "/__double__/mute", json={"muted": True})
    httpx.post(comfy + "/__double__/drop_websockets")
    wait_for(lambda: not sidecar.comfy_running(), timeout=30, what="the job to end in ComfyUI")
    httpx.post(comfy + "/__double__/mute", json={"muted": False})
    thread.join(timeout=30)
    assert not thread.is_alive(), "the job hung"
    assert result["response"].status_code == 200, result["response"].text
    assert len(result["response"].json()["images"]) == 1
    assert "settled from /history" in sidecar.log()


def test_zombie_socket_is_reconciled(spawn: Any, tmp_path: Path) -> None:
    """The socket stays open but goes silent: the quiet-socket check settles the job."""
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"), COMFYUI_QUIET_RECONCILE_S="0.4")
    sidecar.wait_ready()
    comfy = f"http://127.0.0.1:{sidecar.comfy_port}"
    httpx.post(comfy + "/__double__/mute", json={"muted": True})
    started = time.monotonic()
    response = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)}, timeout=60)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 5  # the quiet interval is 0.4 s (COMFYUI_QUIET_RECONCILE_S)
