"""Resilience (issue 13): a hung or stalled ComfyUI is noticed and replaced, a stale websocket is
reopened, instances recycle after RECYCLE_* limits, and out-of-memory errors are freed, retried
or answered 503 — each with its own sidecar process."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from comfy_sidecar.comfy.process import group_rss_bytes
from comfy_sidecar.comfy.watchdog import recycle_reason, vram_used_bytes
from comfy_sidecar.config import load_settings
from tests.conftest import Backend, Sidecar, basic_prompt, slow_prompt
from tests.receiver import Receiver
from tests.waiting import wait_for

HANG_S = 2.0


def post_in_thread(sidecar: Sidecar, prompt: dict[str, Any]) -> tuple[threading.Thread, dict]:
    """POST /prompt from a thread; the dict gets ``response`` and ``at`` (monotonic s)."""
    result: dict[str, Any] = {}

    def run() -> None:
        result["response"] = sidecar.post("/prompt", json={"prompt": prompt}, timeout=300)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def post_many(sidecar: Sidecar, count: int, prefix: str) -> list[httpx.Response]:
    """``count`` small prompts POSTed at once; their responses, in order."""
    with ThreadPoolExecutor(count) as pool:
        return list(
            pool.map(
                lambda i: sidecar.post(
                    "/prompt",
                    json={"prompt": basic_prompt(batch=1, prefix=f"{prefix}{i}")},
                    timeout=120,
                ),
                range(count),
            )
        )


def started_pids(sidecar: Sidecar) -> list[int]:
    """Pids of every ComfyUI child the sidecar started, in order (from its log)."""
    return [int(p) for p in re.findall(r"started ComfyUI \(pid (\d+)\)", sidecar.log())]


# --- no refusals on blips ---------------------------------------------------------------------


def test_jobs_sent_while_the_websocket_is_down_wait_and_run(spawn: Any, tmp_path: Path) -> None:
    """Jobs arriving while the instance's websocket reconnects wait in the sidecar queue (no
    503) and start as soon as the socket is back, without a polling delay."""
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"))
    sidecar.wait_ready()
    comfy = f"http://127.0.0.1:{sidecar.comfy_port}"
    httpx.post(comfy + "/__double__/refuse_websockets", json={"refused": True})
    httpx.post(comfy + "/__double__/drop_websockets")
    wait_for(
        lambda: not sidecar.get("/health").json()["instances"][0]["connected"],
        timeout=30,
        what="the sidecar to see its websocket down",
    )
    with ThreadPoolExecutor(5) as pool:
        futures = [
            pool.submit(
                sidecar.post,
                "/prompt",
                json={"prompt": basic_prompt(batch=1, prefix=f"blip{i}")},
                timeout=120,
            )
            for i in range(5)
        ]
        wait_for(
            lambda: sidecar.get("/health").json()["queue"]["waiting"] == 5,
            timeout=30,
            what="the 5 jobs to wait in the sidecar queue",
        )
        assert not any(f.done() for f in futures), [f.result().text for f in futures if f.done()]
        httpx.post(comfy + "/__double__/refuse_websockets", json={"refused": False})
        responses = [f.result(timeout=120) for f in futures]
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]


# --- hung child ------------------------------------------------------------------------------


def test_sigstop_mid_job_is_a_hang(spawn: Any, backend: Backend) -> None:
    """A frozen ComfyUI fails its running job 503 (reason comfyui_hung) long before
    PROMPT_TIMEOUT_S, re-queues the job behind it, and is replaced."""
    sidecar: Sidecar = spawn(
        backend,
        ALWAYS_RESTART_COMFYUI="true",
        COMFYUI_HANG_TIMEOUT_S=str(HANG_S),
        PROMPT_TIMEOUT_S="300",
    )
    sidecar.wait_ready()
    first_child = sidecar.child_pid()
    running, running_result = post_in_thread(sidecar, slow_prompt(12))
    sidecar.wait_comfy_running()
    queued, queued_result = post_in_thread(sidecar, basic_prompt(batch=1, prefix="behind"))
    wait_for(
        lambda: len(sidecar.comfy_queue()["queue_pending"]) == 1,
        timeout=30,
        what="the second job to be queued in ComfyUI",
    )
    stopped_at = time.monotonic()
    os.kill(first_child, signal.SIGSTOP)
    running.join(timeout=120)
    response = running_result["response"]
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["reason"] == "comfyui_hung"
    assert "comfyui_log_tail" in body
    took = running_result["at"] - stopped_at
    assert took < HANG_S + 8, f"the hang was noticed after {took:.1f} s"
    # The job behind it had not started: it waits in the sidecar and runs on the new child.
    queued.join(timeout=180)
    assert queued_result["response"].status_code == 200, queued_result["response"].text
    sidecar.wait_ready()
    assert sidecar.child_pid() != first_child
    assert "hung: ComfyUI has not answered" in sidecar.log()
    again = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)})
    assert again.status_code == 200, again.text


def test_a_job_sent_into_a_frozen_comfyui_waits_for_the_hang_verdict(
    spawn: Any, tmp_path: Path
) -> None:
    """A job POSTed to a ComfyUI that froze before it could take it is not failed by its own
    ``POST /prompt`` timeout (30 s) while the hang check (here 35 s) has not ruled yet: the hung
    child is killed, the job goes back to the sidecar's queue and runs on the new child."""
    sidecar: Sidecar = spawn(
        Backend("double", tmp_path / "comfy"),
        ALWAYS_RESTART_COMFYUI="true",
        COMFYUI_HANG_TIMEOUT_S="35",
        PROMPT_TIMEOUT_S="300",
    )
    sidecar.wait_ready()
    first_child = sidecar.child_pid()
    os.kill(first_child, signal.SIGSTOP)
    response = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)}, timeout=240)
    assert response.status_code == 200, response.text
    assert sidecar.child_pid() != first_child
    assert "hung: ComfyUI has not answered" in sidecar.log()


def test_long_node_does_not_trip_the_hang_check(spawn: Any, backend: Backend) -> None:
    """A prompt running 3x COMFYUI_HANG_TIMEOUT_S while ComfyUI keeps answering completes."""
    sidecar: Sidecar = spawn(backend, COMFYUI_HANG_TIMEOUT_S=str(HANG_S))
    sidecar.wait_ready()
    child = sidecar.child_pid()
    blurs = 5 if backend.kind == "double" else 3
    started = time.monotonic()
    response = sidecar.post("/prompt", json={"prompt": slow_prompt(blurs)}, timeout=300)
    took = time.monotonic() - started
    assert response.status_code == 200, response.text
    if took < 3 * HANG_S:
        pytest.fail(f"the prompt ran {took:.1f} s, under 3x the hang timeout: test is too weak")
    assert sidecar.child_pid() == child
    assert "hung" not in sidecar.log()


# --- stalled prompt worker -------------------------------------------------------------------


def test_stalled_worker_is_restarted_and_jobs_requeued(spawn: Any, tmp_path: Path) -> None:
    sidecar: Sidecar = spawn(
        Backend("double", tmp_path / "comfy"),
        ALWAYS_RESTART_COMFYUI="true",
        COMFYUI_STALL_TIMEOUT_S="1.5",
    )
    sidecar.wait_ready()
    first_child = sidecar.child_pid()
    comfy = f"http://127.0.0.1:{sidecar.comfy_port}"
    httpx.post(comfy + "/__double__/stall", json={"stalled": True})
    started = time.monotonic()
    responses = post_many(sidecar, 2, "st")
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert time.monotonic() - started < 20
    assert "stalled: ComfyUI holds queued jobs" in sidecar.log()
    assert sidecar.child_pid() != first_child


# --- stale websocket -------------------------------------------------------------------------


def test_stale_websocket_is_reopened(spawn: Any, tmp_path: Path) -> None:
    """The socket stays open but stops delivering frames while the job runs: it is closed and
    reopened, and the job completes over the new one."""
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"), COMFYUI_QUIET_RECONCILE_S="0.4")
    sidecar.wait_ready()
    comfy = f"http://127.0.0.1:{sidecar.comfy_port}"
    thread, result = post_in_thread(sidecar, slow_prompt(3))
    sidecar.wait_comfy_running()
    assert httpx.post(comfy + "/__double__/stale_websockets").json()["stale"] == 1
    thread.join(timeout=60)
    assert result["response"].status_code == 200, result["response"].text
    assert "websocket silent" in sidecar.log()
    # Frames flow on the new socket: the next job ends from them, not from a reconcile.
    settled = sidecar.log().count("settled from /history")
    again = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)})
    assert again.status_code == 200, again.text
    assert sidecar.log().count("settled from /history") == settled


# --- recycling -------------------------------------------------------------------------------


def test_recycle_after_jobs(spawn: Any, tmp_path: Path, receiver: Any) -> None:
    """RECYCLE_AFTER_JOBS=3, 7 jobs at once: all complete, the child is replaced twice, nothing
    is refused, and each recycle is sent as a system event."""
    events: Receiver = receiver()
    sidecar: Sidecar = spawn(
        Backend("double", tmp_path / "comfy"),
        RECYCLE_AFTER_JOBS="3",
        SYSTEM_WEBHOOK_URL=events.url,
        SYSTEM_WEBHOOK_EVENTS="recycle",
    )
    sidecar.wait_ready()
    responses = post_many(sidecar, 7, "r")
    assert [r.status_code for r in responses] == [200] * 7, [r.text for r in responses]
    wait_for(lambda: len(started_pids(sidecar)) == 3, timeout=30, what="two recycles")
    assert len(set(started_pids(sidecar))) == 3
    sidecar.wait_ready()
    recycles = [r.json() for r in events.wait_for(2, timeout=30)]
    assert [e["event"] for e in recycles] == ["sidecar.recycle"] * 2
    assert recycles[0]["data"]["reason"].startswith("RECYCLE_AFTER_JOBS")
    assert recycles[0]["data"]["instance"] == "0"
    metrics = sidecar.get("/metrics").text
    assert 'comfyui_process_restarts_total{comfyui_instance="0",reason="recycle"} 2.0' in metrics


def test_recycle_rss_limit(spawn: Any, tmp_path: Path) -> None:
    """RECYCLE_RSS_GB below the child's resident memory recycles it after each job."""
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"), RECYCLE_RSS_GB="0.001")
    sidecar.wait_ready()
    first_child = sidecar.child_pid()
    response = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)})
    assert response.status_code == 200, response.text
    wait_for(lambda: len(started_pids(sidecar)) == 2, timeout=30, what="a recycle")
    sidecar.wait_ready()
    assert sidecar.child_pid() != first_child
    assert "RECYCLE_RSS_GB: resident memory" in sidecar.log()


def test_recycle_reason_limits() -> None:
    gb = 1024**3
    off = load_settings({})
    assert recycle_reason(off, 10_000, 100 * gb, 100 * gb) is None
    settings = load_settings({"RECYCLE_AFTER_JOBS": "3", "RECYCLE_VRAM_GB": "4"})
    assert recycle_reason(settings, 2, 0, 3 * gb) is None
    assert (recycle_reason(settings, 3, 0, 0) or "").startswith("RECYCLE_AFTER_JOBS")
    assert (recycle_reason(settings, 1, 0, 5 * gb) or "").startswith("RECYCLE_VRAM_GB")
    rss = load_settings({"RECYCLE_RSS_GB": "1.5"})
    assert recycle_reason(rss, 1, gb, 0) is None
    assert (recycle_reason(rss, 1, 2 * gb, 0) or "").startswith("RECYCLE_RSS_GB")


def test_vram_used_from_system_stats() -> None:
    stats = {"devices": [{"name": "cuda:0", "vram_total": 24 * 2**30, "vram_free": 2**30}]}
    assert vram_used_bytes(stats) == 23 * 2**30
    assert vram_used_bytes({"devices": [{"name": "cpu", "type": "cpu"}]}) == 0
    assert vram_used_bytes({}) == 0


def test_group_rss_sums_the_process_group() -> None:
    own = group_rss_bytes(os.getpgrp())
    assert own > 1024 * 1024  # this Python, at least
    assert group_rss_bytes(2**22 + 12345) == 0  # no such group


# --- out of memory ---------------------------------------------------------------------------


def oom_prompt(times: int) -> dict[str, Any]:
    """EmptyImage -> DoubleOutOfMemory (raises torch.OutOfMemoryError ``times`` times) ->
    SaveImage."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "DoubleOutOfMemory",
            "inputs": {"image": ["1", 0], "times": times, "key": str(uuid.uuid4())},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "oom"}},
    }


def test_out_of_memory_answers_503(spawn: Any, tmp_path: Path) -> None:
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"))
    sidecar.wait_ready()
    response = sidecar.post("/prompt", json={"prompt": oom_prompt(1)})
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["reason"] == "out_of_memory"
    assert body["exception_type"] == "torch.OutOfMemoryError"
    assert body["node_id"] == "2"
    assert "ran out of memory; POST /free" in sidecar.log()
    frees = httpx.get(f"http://127.0.0.1:{sidecar.comfy_port}/__double__/frees").json()
    assert frees == [{"unload_models": True, "free_memory": True}]


def test_out_of_memory_retried_once(spawn: Any, tmp_path: Path) -> None:
    sidecar: Sidecar = spawn(Backend("double", tmp_path / "comfy"), OOM_RETRY="true")
    sidecar.wait_ready()
    once = sidecar.post("/prompt", json={"prompt": oom_prompt(1)})
    assert once.status_code == 200, once.text
    assert len(once.json()["images"]) == 1
    twice = sidecar.post("/prompt", json={"prompt": oom_prompt(2)})
    assert twice.status_code == 503, twice.text
    assert twice.json()["reason"] == "out_of_memory"
    assert sidecar.log().count("running it once more") == 2
