"""The ready-time path (issue 16): the sidecar pings ComfyUI with a short backoff and at once
when ComfyUI prints that it listens, then opens its websocket without waiting for the next
``STARTUP_CHECK_INTERVAL_S`` tick (``instance.py`` ``_wait_answering``, ``comfy/events.py``
``connect_now``).

The double binds its port only after ``--startup-delay`` seconds, so the sidecar's first ping
(right after it logs ``phase launching: waiting up to``) fails. With the old fixed poll the next
one came ``STARTUP_CHECK_INTERVAL_S`` later, so the sidecar could not log ``phase ready`` within
that interval of ``phase launching``; the test asserts it does, and that it is ready soon after
ComfyUI prints that it listens. The interval is 60 s, not 5: on a loaded 2-core machine the
double's own Python start-up alone has taken over 10 s, and the assertion must hold whatever
the load (with the new path the test still takes only as long as the double's start).
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.conftest import Backend, basic_prompt, make_sidecar

INTERVAL_S = 60.0


def logged_at(log: str, mark: str) -> float:
    """Wall-clock time (s) of the first sidecar log line holding ``mark``."""
    line = next(line for line in log.splitlines() if mark in line)
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.sidecar_process
def test_ready_before_the_next_startup_tick(tmp_path: Path) -> None:
    sidecar = make_sidecar(
        Backend("double", tmp_path / "comfy"),
        tmp_path,
        STARTUP_CHECK_INTERVAL_S=str(INTERVAL_S),
        STARTUP_CHECK_MAX_TRIES="5",
        CMD_EXTRA="--startup-delay 1",
        LOG_LEVEL="info",
    )
    started = time.monotonic()
    sidecar.start()
    try:
        ready_after = None
        while time.monotonic() - started < 2 * INTERVAL_S:
            assert sidecar.proc is not None and sidecar.proc.poll() is None, sidecar.log()
            try:
                if httpx.get(sidecar.url + "/ready", timeout=2).status_code == 200:
                    ready_after = time.monotonic() - started
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        assert ready_after is not None, f"never ready:\n{sidecar.log()[-3000:]}"
        log = sidecar.log()
        # The double really was late: it printed its pre-listen line, then listened.
        assert "Total VRAM" in log and "To see the GUI go to:" in log
        assert "ComfyUI answered after" in log
        launching = logged_at(log, "phase launching: waiting up to")
        listening = logged_at(log, "To see the GUI go to:")
        ready = logged_at(log, "phase ready")
        assert ready - launching < INTERVAL_S, (
            f"ready {ready - launching:.2f} s after the first ping: not before the next "
            f"{INTERVAL_S:g} s startup tick\n{log[-3000:]}"
        )
        assert ready - listening < 5, f"ready {ready - listening:.2f} s after listening\n{log}"
        # The websocket is open (the job path works at once).
        job = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1, size=8)})
        assert job.status_code == 200, job.text
        assert len(job.json()["images"]) == 1
    finally:
        sidecar.stop()
