"""build.spec's EXCLUDES are safe: the sidecar works with exactly those packages unimportable.

The frozen binary leaves out the packages in EXCLUDES (to stay small). Here the unfrozen sidecar
runs with the same packages blocked (tests/deploy/_blocked_run.py), in front of the ComfyUI
double, with the CPU image's warmup prompt; then the probes, a prompt, /docs and the OpenAPI
document must work and SIGTERM must exit 0. A new import of an excluded package fails this test
instead of a user's frozen binary.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("_blocked_run.py")


def _excludes() -> list[str]:
    tree = ast.parse((ROOT / "build.spec").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "EXCLUDES" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert isinstance(value, list)
            return [str(v) for v in value]
    raise AssertionError("EXCLUDES not found in build.spec")


def test_excludes_list_is_what_the_test_blocks() -> None:
    excludes = _excludes()
    assert "tkinter" in excludes and "numpy" in excludes
    # uvicorn imports click; Litestar's OpenAPI generation imports polyfactory and faker.
    assert not {"click", "polyfactory", "faker", "uvicorn", "litestar"} & set(excludes)


def test_sidecar_works_with_excluded_packages_blocked(tmp_path: Path) -> None:
    port, comfy_port = free_port(), free_port()
    blocked_log = tmp_path / "blocked.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SALAD_", "SYSTEM_"))}
    env.update(
        {
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "HOME": str(tmp_path),
            "COMFY_HOME": str(tmp_path),
            "INPUT_DIR": str(tmp_path / "input"),
            "OUTPUT_DIR": str(tmp_path / "output"),
            "COMFYUI_PORT_HOST": str(comfy_port),
            "CMD": (
                f"{sys.executable} {ROOT / 'tests' / 'comfy_double.py'} --listen 127.0.0.1 "
                f"--port {comfy_port} --base-directory {tmp_path}"
            ),
            "STARTUP_CHECK_INTERVAL_S": "0.1",
            "STARTUP_CHECK_MAX_TRIES": "300",
            "WARMUP_PROMPT_FILE": str(ROOT / "docker" / "warmup" / "cpu-warmup.json"),
            "CACHE_DIR": str(tmp_path / "cache"),
            "BLOCKED_LOG": str(blocked_log),
            "PYTHONPATH": str(ROOT),
        }
    )
    log_path = tmp_path / "sidecar.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(RUNNER), ",".join(_excludes())],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log_path.read_text()[-4000:]
                try:
                    if client.get(base + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.05)
            assert client.get(base + "/ready").status_code == 200
            for path in ("/docs", "/docs/openapi.json", "/metrics"):
                answer = client.get(base + path)
                assert answer.status_code == 200, (path, log_path.read_text()[-4000:])
            spec = client.get(base + "/docs/openapi.json").json()
            assert "/prompt" in spec["paths"]
            graph = json.loads((ROOT / "docker" / "warmup" / "cpu-warmup.json").read_text())
            answer = client.post(base + "/prompt", json={"prompt": graph})
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["images"]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:  # a failed assertion: let the sidecar stop ComfyUI itself
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-4000:]
