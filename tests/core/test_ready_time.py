"""The ready-time path (issue 16): the sidecar pings ComfyUI with a short backoff and at once
when ComfyUI prints that it listens, then opens its websocket without waiting for the next
``STARTUP_CHECK_INTERVAL_S`` tick (``instance.py`` ``_wait_answering``, ``comfy/events.py``
``connect_now``).

The double binds its port only after ``--startup-delay`` seconds, so the sidecar's first ping
fails. With the old fixed poll the next one came ``STARTUP_CHECK_INTERVAL_S`` (5 s) later, so
``/ready`` could not answer 200 before 5 s after exec; the test asserts it does.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import Backend, make_sidecar

INTERVAL_S = 5.0


def test_ready_before_the_next_startup_tick(tmp_path: Path) -> None:
    sidecar = make_sidecar(
        Backend("double", tmp_path / "comfy"),
        tmp_path,
        STARTUP_CHECK_INTERVAL_S=str(INTERVAL_S),
        STARTUP_CHECK_MAX_TRIES="20",
        CMD_EXTRA="--startup-delay 1",
        LOG_LEVEL="info",
    )
    started = time.monotonic()
    sidecar.start()
    try:
        ready_after = None
        while time.monotonic() - started < 4 * INTERVAL_S:
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
        assert ready_after < INTERVAL_S, (
            f"ready {ready_after:.2f} s after exec: not before the next "
            f"{INTERVAL_S:g} s startup tick\n{log[-3000:]}"
        )
        # The websocket is open (the job path works at once).
        job = sidecar.post(
            "/prompt",
            json={
                "prompt": {
                    "1": {
                        "class_type": "EmptyImage",
                        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1},
                    },
                    "2": {
                        "class_type": "SaveImage",
                        "inputs": {"images": ["1", 0], "filename_prefix": "rt"},
                    },
                }
            },
        )
        assert job.status_code == 200, job.text
        assert len(job.json()["images"]) == 1
    finally:
        sidecar.stop()
