"""``GET /metrics``: parsed with prometheus_client's own parser from a sidecar in front of the
double (and a real ComfyUI with COMFY_HOME), the values move after jobs, downloads and
requests; the label sets stay bounded (route templates, never raw ids)."""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from comfy_sidecar.observability import metrics
from tests.conftest import BACKENDS, Sidecar, basic_prompt, png_bytes, running_sidecar
from tests.redis_server import RedisServer, redis_server
from tests.storage.servers import FileServer
from tests.waiting import wait_for

__all__ = ["redis_server"]  # the fixture, used by name

#: Every metric family the issue's table names (as the parser names them: counters and
#: info as a gauge named ``..._info``).
FAMILIES = {
    "comfyui_jobs_waiting": "gauge",
    "comfyui_jobs_running": "gauge",
    "comfyui_jobs_waiting_oldest_seconds": "gauge",
    "comfyui_pending_deliveries": "gauge",
    "comfyui_pending_deliveries_max": "gauge",
    "comfyui_jobs": "counter",
    "comfyui_job_duration_seconds": "histogram",
    "comfyui_instance_up": "gauge",
    "comfyui_instance_ready": "gauge",
    "comfyui_process_restarts": "counter",
    "comfyui_startup_duration_seconds": "gauge",
    "comfyui_download_bytes": "counter",
    "comfyui_download_duration_seconds": "histogram",
    "comfyui_cache_requests": "counter",
    "comfyui_cache_size_bytes": "gauge",
    "comfyui_cache_max_bytes": "gauge",
    "comfyui_cache_filesystem_size_bytes": "gauge",
    "comfyui_cache_filesystem_avail_bytes": "gauge",
    "comfyui_webhook_deliveries": "counter",
    "comfyui_system_events_dropped": "counter",
    "comfyui_gpu_memory_used_bytes": "gauge",
    "comfyui_gpu_memory_total_bytes": "gauge",
    "comfyui_sidecar_info": "gauge",
    "http_server_request_duration_seconds": "histogram",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One parsed scrape: ``types`` by family name and every sample's value by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: Samples = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name`` with exactly ``labels``; 0 when absent."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def labelled(self, name: str) -> list[dict[str, str]]:
        """The label sets of every ``name`` sample."""
        return [dict(labels) for sample, labels in self.samples if sample == name]


def scrape(sidecar: Sidecar) -> Scrape:
    response = sidecar.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.text)


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    server = FileServer()
    server.files["metrics.png"] = png_bytes((11, 7), (10, 200, 30))
    yield server
    server.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def sidecar(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_sidecar(request.param, tmp_path_factory.mktemp(f"m-{request.param}")) as sc:
        yield sc


# --- units ----------------------------------------------------------------------------------


def test_job_phases_from_stats_in_seconds() -> None:
    stats = {
        "comfy_execution": {"start": 1, "end": 2, "duration": 1500, "nodes": {}},
        "preprocess_time": 20,
        "comfy_round_trip_time": 1800,
        "postprocess_time": 0,
        "upload_time": 300,
        "total_time": 2200,
    }
    assert metrics.job_phases(stats) == {
        "queue": 0.3,
        "preprocess": 0.02,
        "execute": 1.5,
        "upload": 0.3,
        "total": 2.2,
    }
    # a missing execution leaves queue and execute out; negative waits are clamped
    assert set(metrics.job_phases({"total_time": 5, "preprocess_time": None})) == {"total"}
    odd = {"comfy_execution": {"duration": 900}, "comfy_round_trip_time": 800}
    assert metrics.job_phases(odd)["queue"] == 0.0


def test_route_of_is_the_template_or_other() -> None:
    assert metrics.route_of({"route_handler": object(), "path_template": "/jobs/{job_id}"}) == (
        "/jobs/{job_id}"
    )
    assert metrics.route_of({"path": "/nope/123"}) == "other"


# --- a sidecar in front of ComfyUI ----------------------------------------------------------


def test_every_family_is_exposed_with_its_type(sidecar: Sidecar) -> None:
    found = scrape(sidecar)
    missing = {name: kind for name, kind in FAMILIES.items() if found.types.get(name) != kind}
    assert not missing, f"missing or mistyped: {missing}\n{found.text}"
    assert found.value("comfyui_instance_up", comfyui_instance="0") == 1
    assert found.value("comfyui_instance_ready", comfyui_instance="0") == 1
    assert found.value("comfyui_jobs_waiting") == 0
    assert found.value("comfyui_startup_duration_seconds", phase="launch") > 0
    assert found.value("comfyui_startup_duration_seconds", phase="provision") >= 0
    assert "_created" not in found.text
    # defaults: MAX_PENDING_DELIVERIES 500, LRU_CACHE_SIZE_GB 0 (no limit); no JOB_QUEUE_URL
    assert found.value("comfyui_pending_deliveries_max") == 500
    assert found.value("comfyui_pending_deliveries") == 0
    assert found.value("comfyui_cache_max_bytes") == 0
    assert found.value("comfyui_jobs_waiting_oldest_seconds") == 0
    assert "comfyui_job_queue_up" not in found.types
    disk = shutil.disk_usage(sidecar.env["CACHE_DIR"])
    assert found.value("comfyui_cache_filesystem_size_bytes") == disk.total
    assert 0 < found.value("comfyui_cache_filesystem_avail_bytes") <= disk.total
    # every restart reason of the instance is there at 0 before any restart happened
    restarts = found.labelled("comfyui_process_restarts_total")
    assert sorted(r["reason"] for r in restarts) == ["exit", "hang", "recycle", "stall"]


def test_info_names_comfyui_version_and_gpu_gauges_per_instance(sidecar: Sidecar) -> None:
    def info() -> dict[str, str] | None:
        found = scrape(sidecar)
        labels = found.labelled("comfyui_sidecar_info")
        if (
            labels
            and labels[0]["comfyui_version"]
            and found.labelled("comfyui_gpu_memory_total_bytes")
        ):
            return labels[0]
        return None

    labels = wait_for(info, timeout=30, interval=0.2, what="comfyui_version in the info metric")
    from comfy_sidecar import __version__

    assert labels["version"] == __version__
    if sidecar.backend.kind == "double":
        assert labels["comfyui_version"] == "0.8.0-double"
    found = scrape(sidecar)
    # On CPU (the double, and the real ComfyUI with --cpu) there is no VRAM: 0, not missing.
    assert found.value("comfyui_gpu_memory_total_bytes", comfyui_instance="0") >= 0
    assert found.value("comfyui_gpu_memory_used_bytes", comfyui_instance="0") >= 0
    assert found.labelled("comfyui_gpu_memory_used_bytes") == [{"comfyui_instance": "0"}]


def test_prompt_moves_jobs_total_and_durations(sidecar: Sidecar) -> None:
    before = scrape(sidecar)
    completed = {"status": "completed", "endpoint": "prompt"}
    response = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)})
    assert response.status_code == 200, response.text
    after = scrape(sidecar)
    assert after.value("comfyui_jobs_total", **completed) == (
        before.value("comfyui_jobs_total", **completed) + 1
    )
    for phase in ("queue", "preprocess", "execute", "upload", "total"):
        name = "comfyui_job_duration_seconds_count"
        assert after.value(name, phase=phase) == before.value(name, phase=phase) + 1, phase
    total = after.value("comfyui_job_duration_seconds_sum", phase="total") - before.value(
        "comfyui_job_duration_seconds_sum", phase="total"
    )
    assert 0 < total < 120


def test_jobs_api_and_http_routes_are_templates(sidecar: Sidecar) -> None:
    completed = {"status": "completed", "endpoint": "jobs"}
    before = scrape(sidecar)
    job_id = f"metrics-{uuid.uuid4()}"
    accepted = sidecar.post("/jobs", json={"prompt": basic_prompt(batch=1), "id": job_id})
    assert accepted.status_code == 202, accepted.text
    done = sidecar.get(f"/jobs/{job_id}", params={"wait": 60}, timeout=70)
    assert done.json()["status"] == "completed", done.text
    assert sidecar.get("/no/such/route/12345").status_code == 404
    after = scrape(sidecar)
    assert after.value("comfyui_jobs_total", **completed) == (
        before.value("comfyui_jobs_total", **completed) + 1
    )
    routes = after.labelled("http_server_request_duration_seconds_count")
    seen = {(r["method"], r["route"], r["status_code"]) for r in routes}
    assert ("POST", "/jobs", "202") in seen
    assert ("GET", "/jobs/{job_id}", "200") in seen
    assert ("POST", "/prompt", "200") in seen
    assert ("GET", "other", "404") in seen
    assert job_id not in after.text and "12345" not in after.text
    assert all(r["route"].startswith("/") or r["route"] == "other" for r in routes)


def test_url_input_moves_cache_and_download_counters(sidecar: Sidecar, files: FileServer) -> None:
    before = scrape(sidecar)
    url = files.url(f"/files/metrics.png?v={uuid.uuid4().hex}")  # a new URL: a miss
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": url}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "m"}},
    }
    for _ in range(2):  # the second time the cache serves it
        response = sidecar.post("/prompt", json={"prompt": prompt})
        assert response.status_code == 200, response.text
    after = scrape(sidecar)

    def grew(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert grew("comfyui_cache_requests_total", result="miss") == 1
    assert grew("comfyui_cache_requests_total", result="hit") >= 1
    size = len(files.files["metrics.png"])
    assert grew("comfyui_download_bytes_total", provider="http") == size
    assert grew("comfyui_download_duration_seconds_count", provider="http") == 1
    assert after.value("comfyui_cache_size_bytes") >= size


# --- own sidecars ---------------------------------------------------------------------------


def test_metrics_need_a_key_only_when_required(spawn: Any, tmp_path: Path) -> None:
    from tests.conftest import Backend

    open_ = spawn(Backend("double", tmp_path / "a"), API_KEYS="k1")
    closed = spawn(Backend("double", tmp_path / "b"), API_KEYS="k1", METRICS_REQUIRE_AUTH="true")
    for sc in (open_, closed):
        sc.wait_ready()
    assert open_.get("/metrics").status_code == 200
    assert open_.get("/jobs").status_code == 401
    assert closed.get("/metrics").status_code == 401
    keyed = closed.get("/metrics", headers={"Authorization": "Bearer k1"})
    assert keyed.status_code == 200
    assert Scrape(keyed.text).value("comfyui_instance_up", comfyui_instance="0") == 1


@pytest.mark.sidecar_process
def test_restart_counts_and_instance_up_follows_the_child(spawn: Any, tmp_path: Path) -> None:
    import os
    import signal

    from tests.conftest import Backend

    sc = spawn(Backend("double", tmp_path / "r"), ALWAYS_RESTART_COMFYUI="true")
    sc.wait_ready()
    exits = {"comfyui_instance": "0", "reason": "exit"}
    assert scrape(sc).value("comfyui_process_restarts_total", **exits) == 0
    os.kill(sc.child_pid(), signal.SIGKILL)
    wait_for(
        lambda: scrape(sc).value("comfyui_process_restarts_total", **exits),
        timeout=30,
        interval=0.05,
        what="a restart counted",
    )
    sc.wait_ready()
    found = scrape(sc)
    assert found.value("comfyui_instance_up", comfyui_instance="0") == 1
    assert found.value("comfyui_instance_ready", comfyui_instance="0") == 1


def test_oldest_wait_pending_deliveries_and_cache_limit(
    spawn: Any, tmp_path: Path, receiver: Any
) -> None:
    """A job waiting for the only slot makes ``comfyui_jobs_waiting_oldest_seconds`` grow; a
    webhook job whose receiver hangs is a pending delivery until it is delivered; the limits
    are the configured ones."""
    from tests.conftest import Backend, slow_prompt

    sc = spawn(
        Backend("double", tmp_path / "w"),
        MAX_JOBS_PER_INSTANCE="1",
        MAX_PENDING_DELIVERIES="3",
        LRU_CACHE_SIZE_GB="0.5",
    )
    sc.wait_ready()
    found = scrape(sc)
    assert found.value("comfyui_pending_deliveries_max") == 3
    assert found.value("comfyui_cache_max_bytes") == 0.5 * 1024**3

    hook = receiver(hang=True)
    accepted = sc.post(
        "/prompt", json={"prompt": basic_prompt(batch=1), "webhook_v2": hook.url + "/h"}
    )
    assert accepted.status_code == 202, accepted.text
    hook.wait_for(1, timeout=30)
    assert scrape(sc).value("comfyui_pending_deliveries") == 1

    results: list[int] = []

    def run(prompt: dict[str, Any]) -> None:
        results.append(sc.post("/prompt", json={"prompt": prompt}).status_code)

    threads = [threading.Thread(target=run, args=(slow_prompt(blurs=3),)) for _ in range(2)]
    threads[0].start()
    sc.wait_comfy_running()
    threads[1].start()  # waits in the sidecar for the only slot
    first = wait_for(
        lambda: scrape(sc).value("comfyui_jobs_waiting_oldest_seconds"),
        timeout=30,
        interval=0.05,
        what="a job waiting for a slot",
    )
    wait_for(
        lambda: scrape(sc).value("comfyui_jobs_waiting_oldest_seconds") >= first + 0.5,
        timeout=30,
        interval=0.05,
        what="the oldest wait to grow",
    )
    for thread in threads:
        thread.join(120)
    assert results == [200, 200]
    assert scrape(sc).value("comfyui_jobs_waiting_oldest_seconds") == 0

    hook.hang = False
    hook.release.set()  # the hung attempt fails; the retry is answered 200
    wait_for(
        lambda: scrape(sc).value("comfyui_pending_deliveries") == 0,
        timeout=60,
        interval=0.1,
        what="the webhook delivered",
    )
    assert scrape(sc).value("comfyui_webhook_deliveries_total", kind="prompt", result="delivered")


def test_job_queue_up_follows_redis(spawn: Any, tmp_path: Path, redis_server: RedisServer) -> None:
    """Queue mode: ``comfyui_job_queue_up`` is 1 while Redis answers, 0 while it is down."""
    from tests.conftest import Backend

    sc = spawn(Backend("double", tmp_path / "q"), JOB_QUEUE_URL=redis_server.url)
    sc.wait_ready()

    def queue_up() -> float | None:
        found = scrape(sc)
        return (
            found.value("comfyui_job_queue_up") if "comfyui_job_queue_up" in found.types else None
        )

    assert queue_up() == 1
    redis_server.kill()
    wait_for(lambda: queue_up() == 0, timeout=30, interval=0.1, what="the queue seen down")
    redis_server.start()
    wait_for(lambda: queue_up() == 1, timeout=30, interval=0.1, what="the queue up again")
