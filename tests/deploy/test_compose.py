"""docker/compose.yml and the CPU warmup prompt it runs.

The compose file is parsed (Docker is not available to run it): the service builds the CPU
image from the repository root, mounts the example manifest and the warmup prompt where its
environment points, keeps the cache in a volume, and gives SIGTERM a stop grace that covers the
sidecar's drain (SHUTDOWN_GRACE_S) plus ComfyUI's stop (10 s). The warmup prompt is also queued
on the ComfyUI double (and on a real ComfyUI when COMFY_HOME points at one), which validate it
the way ComfyUI does and must run it to completion.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from comfy_sidecar.config import load_settings
from tests.conftest import free_port
from tests.deploy._graph import check_prompt_graph

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
WARMUP = DOCKER / "warmup" / "cpu-warmup.json"
COMFY_STOP_S = 10  # the sidecar's SIGTERM -> SIGKILL wait for ComfyUI


def _service() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert list(services) == ["comfy-sidecar"]
    return dict(services["comfy-sidecar"])


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", value)
    assert match and value, f"not a compose duration: {value!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source for the service's short-syntax volumes."""
    out = {}
    for spec in service["volumes"]:
        source, target, *_ = spec.split(":")
        out[target] = source
    return out


def test_builds_the_cpu_image_from_the_repository_root() -> None:
    build = _service()["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()
    assert build["dockerfile"] == "docker/cpu.Dockerfile"


def test_environment_parses_and_points_at_the_mounted_files(tmp_path: Path) -> None:
    service = _service()
    env = {k: str(v) for k, v in service["environment"].items()}
    settings = load_settings({**env, "HOME": str(tmp_path)})
    mounts = _mounts(service)
    assert settings.manifest in mounts and settings.warmup_prompt_file in mounts
    manifest_source = (DOCKER / mounts[settings.manifest]).resolve()
    assert manifest_source == ROOT / "manifests" / "cpu-demo.yml"
    warmup_source = (DOCKER / mounts[settings.warmup_prompt_file]).resolve()
    assert warmup_source == WARMUP
    assert all(spec.endswith(":ro") for spec in service["volumes"][:2])
    assert mounts[settings.cache_dir] == "sidecar-cache"
    assert "sidecar-cache" in yaml.safe_load(COMPOSE.read_text())["volumes"]
    assert service["ports"] == [f"{settings.port}:{settings.port}"]


def test_example_manifest_exists_and_is_a_manifest() -> None:
    path = ROOT / "manifests" / "cpu-demo.yml"
    assert path.is_file(), "manifests/cpu-demo.yml (the compose example manifest) is missing"
    doc = yaml.safe_load(path.read_text()) or {}
    assert isinstance(doc, dict)
    assert set(doc) <= {"apt", "pip", "custom_nodes", "models"}, sorted(doc)
    assert not doc.get("apt"), "the CPU image runs as UID 1000: apt packages cannot install"


def test_stop_grace_covers_the_drain_and_comfyui_stop() -> None:
    service = _service()
    grace_s = float(service["environment"]["SHUTDOWN_GRACE_S"])
    assert service["stop_signal"] == "SIGTERM"
    assert _seconds(service["stop_grace_period"]) >= grace_s + COMFY_STOP_S


def test_healthcheck_probes_health_on_the_api_port() -> None:
    service = _service()
    check = service["healthcheck"]
    port = service["environment"]["PORT"]
    assert check["test"][0] == "CMD"
    assert f"http://127.0.0.1:{port}/health" in check["test"]
    assert _seconds(check["start_period"]) >= 30 * 60


def test_warmup_prompt_is_empty_image_invert_save() -> None:
    graph = json.loads(WARMUP.read_text())
    assert check_prompt_graph(graph) == []
    classes = sorted(node["class_type"] for node in graph.values())
    assert classes == ["EmptyImage", "ImageInvert", "SaveImage"]
    empty = next(n for n in graph.values() if n["class_type"] == "EmptyImage")
    assert (empty["inputs"]["width"], empty["inputs"]["height"]) == (64, 64)


REAL_HOME = os.environ.get("COMFY_HOME", "")
REAL_OK = bool(REAL_HOME) and (Path(REAL_HOME) / "main.py").is_file()


@pytest.mark.parametrize(
    "kind",
    [
        "double",
        pytest.param(
            "real",
            marks=[
                pytest.mark.real_comfyui,
                pytest.mark.skipif(not REAL_OK, reason="COMFY_HOME is not a real ComfyUI"),
            ],
        ),
    ],
)
def test_warmup_prompt_runs_on_comfyui(kind: str, tmp_path: Path) -> None:
    port = free_port()
    if kind == "double":
        argv = [sys.executable, str(ROOT / "tests" / "comfy_double.py")]
        extra = ["--base-directory", str(tmp_path)]
    else:
        argv = [str(Path(REAL_HOME) / ".venv/bin/python"), str(Path(REAL_HOME) / "main.py")]
        extra = [
            "--cpu",
            "--output-directory",
            str(tmp_path / "output"),
            "--temp-directory",
            str(tmp_path / "temp"),
        ]
    argv += ["--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch", *extra]
    log = (tmp_path / "comfy.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=10) as client:
            deadline = time.monotonic() + (120 if kind == "real" else 30)
            while True:
                assert proc.poll() is None, (tmp_path / "comfy.log").read_text()
                try:
                    if client.get(base + "/queue").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "ComfyUI did not start"
                time.sleep(0.1)
            prompt_id = str(uuid.uuid4())
            graph = json.loads(WARMUP.read_text())
            answer = client.post(
                base + "/prompt",
                json={"prompt": graph, "prompt_id": prompt_id, "client_id": "deploy-test"},
            )
            assert answer.status_code == 200, answer.text
            deadline = time.monotonic() + 60
            while True:
                history = client.get(f"{base}/history/{prompt_id}").json()
                if history:
                    break
                assert time.monotonic() < deadline, "warmup prompt never finished"
                time.sleep(0.1)
        entry = history[prompt_id]
        assert entry["status"]["status_str"] == "success", entry["status"]
        images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
        assert len(images) == 1 and images[0]["filename"].startswith("warmup")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_tmp_is_a_tmpfs_for_the_binarys_unpacking() -> None:
    assert any(entry.startswith("/tmp:") for entry in _service()["tmpfs"])


# --- docker/compose.queue.yml: two sidecars on one Redis queue behind HAProxy ----------------

QUEUE_COMPOSE = DOCKER / "compose.queue.yml"
HAPROXY_CFG = DOCKER / "haproxy.cfg"
SIDECARS = ["sidecar-1", "sidecar-2"]


def _queue_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(QUEUE_COMPOSE.read_text())["services"]
    assert sorted(services) == ["haproxy", "redis", *SIDECARS]
    return services


def _haproxy_lines() -> list[str]:
    return [
        line.split("#")[0].strip()
        for line in HAPROXY_CFG.read_text().splitlines()
        if line.split("#")[0].strip()
    ]


def test_queue_sidecars_share_one_redis_and_keep_their_own_cache(tmp_path: Path) -> None:
    services = _queue_services()
    caches = set()
    for name in SIDECARS:
        service = services[name]
        env = {k: str(v) for k, v in service["environment"].items()}
        settings = load_settings({**env, "HOME": str(tmp_path)})
        assert settings.job_queue_url == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        mounts = _mounts(service)
        assert settings.manifest in mounts and settings.warmup_prompt_file in mounts
        caches.add(mounts[settings.cache_dir])
        assert (DOCKER / service["build"]["context"]).resolve() == ROOT
        assert "ports" not in service, "only HAProxy is published"
    assert len(caches) == len(SIDECARS), "each sidecar has its own cache volume"
    assert caches <= set(yaml.safe_load(QUEUE_COMPOSE.read_text())["volumes"])


def test_queue_redis_keeps_an_append_only_file_in_a_volume() -> None:
    redis = _queue_services()["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert _mounts(redis)["/data"] in yaml.safe_load(QUEUE_COMPOSE.read_text())["volumes"]
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_queue_stop_grace_covers_drain_delay_drain_and_comfyui_stop() -> None:
    for name in SIDECARS:
        service = _queue_services()[name]
        env = service["environment"]
        needed = float(env["DRAIN_DELAY_S"]) + float(env["SHUTDOWN_GRACE_S"]) + COMFY_STOP_S
        assert service["stop_signal"] == "SIGTERM"
        assert _seconds(service["stop_grace_period"]) >= needed


def test_haproxy_health_checks_ready_on_every_sidecar() -> None:
    haproxy = _queue_services()["haproxy"]
    assert _mounts(haproxy)["/usr/local/etc/haproxy/haproxy.cfg"] == "./haproxy.cfg"
    lines = _haproxy_lines()
    assert "option httpchk GET /ready" in lines
    assert "http-check expect status 200" in lines
    servers = [line.split() for line in lines if line.startswith("server ")]
    ports = {str(_queue_services()[name]["environment"]["PORT"]) for name in SIDECARS}
    assert sorted(s[1] for s in servers) == SIDECARS
    assert all(s[2] == f"{s[1]}:{next(iter(ports))}" and "check" in s[3:] for s in servers)
    bind = next(line for line in lines if line.startswith("bind "))
    assert haproxy["ports"] == [f"{bind.split(':')[-1]}:{bind.split(':')[-1]}"]
    assert "retry-on conn-failure empty-response" in lines
    assert "option redispatch 1" in lines


def test_drain_delay_outlasts_haproxys_failed_checks() -> None:
    """A stopping sidecar must leave the rotation (fall x inter) before it refuses requests."""
    default = next(line for line in _haproxy_lines() if line.startswith("default-server "))
    words = default.split()
    inter_s = _seconds(words[words.index("inter") + 1])
    fall = int(words[words.index("fall") + 1])
    for name in SIDECARS:
        delay = float(_queue_services()[name]["environment"]["DRAIN_DELAY_S"])
        assert delay > inter_s * fall


def test_haproxy_cfg_is_valid_for_haproxy(tmp_path: Path) -> None:
    import shutil

    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).is_file():
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    check = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, cwd=tmp_path
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Configuration file is valid" in check.stdout + check.stderr
