"""Several ComfyUIs per sidecar: jobs spread over instances, one instance dying alone, CMD
templating (two doubles in CI; two real ComfyUIs when COMFY_HOME is set)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    BACKENDS,
    Backend,
    Sidecar,
    basic_prompt,
    make_sidecar,
    slow_prompt,
)
from tests.waiting import wait_for


@pytest.fixture(params=BACKENDS)
def two(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sidecar]:
    """A ready sidecar running two ComfyUI instances of the backend (CMD with {port})."""
    backend = Backend(request.param, tmp_path / "comfy")
    sidecar = make_sidecar(
        backend,
        tmp_path,
        CMD=backend.cmd("{port}"),  # type: ignore[arg-type]  # the template, not a number
        COMFYUI_INSTANCES="2",
        ALWAYS_RESTART_COMFYUI="true",
    )
    sidecar.start()
    try:
        sidecar.wait_ready(120)
        wait_for(
            lambda: all(i["phase"] == "ready" for i in sidecar.get("/ready").json()["instances"]),
            timeout=240,
            what="both instances ready",
        )
        yield sidecar
    finally:
        sidecar.stop()


def job_of(sidecar: Sidecar, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = sidecar.get(f"/jobs/{job_id}").json()
    return body


def submit(sidecar: Sidecar, prompt: dict[str, Any]) -> str:
    response = sidecar.post("/jobs", json={"prompt": prompt})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def test_jobs_spread_over_both_instances(two: Sidecar) -> None:
    probe = two.get("/ready").json()
    assert [i["name"] for i in probe["instances"]] == ["0", "1"]
    assert probe["instances"][1]["port"] == probe["instances"][0]["port"] + 1
    ids = [submit(two, basic_prompt(batch=1, size=64)) for _ in range(20)]
    for job_id in ids:
        wait_for(
            lambda job_id=job_id: job_of(two, job_id)["status"] == "completed",
            timeout=120,
            what=f"job {job_id}",
        )
    used = {job_of(two, job_id)["instance"] for job_id in ids}
    assert used == {"0", "1"}


@pytest.mark.timeout(600)  # two real ComfyUIs on a 2-core machine: restarts take a while
def test_one_instance_killed_mid_run_fails_its_running_job_only(two: Sidecar) -> None:
    ids = [submit(two, slow_prompt(blurs=4)) for _ in range(4)]  # two per instance

    def running_on(name: str) -> list[str]:
        return [
            j
            for j in ids
            if job_of(two, j)["status"] == "in_progress" and job_of(two, j)["instance"] == name
        ]

    wait_for(lambda: running_on("0") and running_on("1"), timeout=120, what="both running")
    (victim,) = running_on("0")
    queued_there = [
        j for j in ids if job_of(two, j)["instance"] == "0" and j != victim
    ]  # sent to instance 0 behind the running job, not started yet
    instance0 = two.get("/ready").json()["instances"][0]
    os.killpg(instance0["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    seen_ready = []
    while time.monotonic() - killed_at < 3:  # the other instance keeps the sidecar ready
        seen_ready.append(two.get("/ready").status_code)
    assert set(seen_ready) == {200}
    wait_for(lambda: job_of(two, victim)["status"] == "failed", timeout=30, what="victim fails")
    failed = job_of(two, victim)
    assert "went away" in failed["error"]["error"]
    assert isinstance(failed["error"]["comfyui_log_tail"], list)
    for job_id in ids:
        if job_id != victim:
            wait_for(
                lambda job_id=job_id: job_of(two, job_id)["status"] == "completed",
                timeout=240,
                what=f"job {job_id}",
            )
    for job_id in queued_there:
        assert job_of(two, job_id)["instance"] in (
            "0",
            "1",
        )  # ran: here after the restart, or there
    wait_for(
        lambda: (
            two.get("/ready").json()["instances"][0]["phase"] == "ready"
            and two.get("/ready").json()["instances"][0]["pid"] != instance0["pid"]
        ),
        timeout=240,
        what="instance 0 back",
    )


def test_two_instances_without_port_in_cmd_exit_2(tmp_path: Path) -> None:
    backend = Backend("double", tmp_path / "comfy")
    sidecar = make_sidecar(backend, tmp_path, COMFYUI_INSTANCES="2")  # CMD has a fixed --port
    sidecar.start()
    try:
        assert sidecar.wait_exit(60) == 2
        assert "CMD: must hold {port}" in sidecar.log()
    finally:
        sidecar.stop()
