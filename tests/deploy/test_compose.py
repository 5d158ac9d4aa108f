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
import socket
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    port = _free_port()
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
