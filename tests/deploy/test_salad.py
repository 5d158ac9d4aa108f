"""docker/salad/container-group.json: a SaladCloud container-group create request.

Checked against the shape and limits of SaladCloud's container group API (as its public SDKs
model it): required fields, resource bounds, probe shape; and against the sidecar: HOST `::`
(Salad routes over IPv6), the probes and the networking port hit the sidecar's PORT, /health for
start-up and liveness, /ready for readiness, and the environment parses with load_settings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from comfy_sidecar.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
GROUP = ROOT / "docker" / "salad" / "container-group.json"
PROBE_KEYS = {
    "initial_delay_seconds",
    "period_seconds",
    "timeout_seconds",
    "success_threshold",
    "failure_threshold",
}


@pytest.fixture(scope="module")
def group() -> dict[str, Any]:
    data = json.loads(GROUP.read_text())
    assert isinstance(data, dict)
    return data


def test_required_fields_and_limits(group: dict[str, Any]) -> None:
    assert re.fullmatch(r"[a-z][a-z0-9-]{0,61}[a-z0-9]", group["name"])
    assert re.fullmatch(r"[ ,\-.0-9A-Za-z]{2,63}", group["display_name"])
    assert group["restart_policy"] in {"always", "on_failure", "never"}
    assert isinstance(group["autostart_policy"], bool)
    assert 0 <= group["replicas"] <= 500
    container = group["container"]
    assert container["image"]
    resources = container["resources"]
    assert 1 <= resources["cpu"] <= 16
    assert 1024 <= resources["memory"] <= 30720  # MB
    assert 1 << 30 <= resources["storage_amount"] <= 50 << 30  # bytes
    assert resources["gpu_classes"] and all(isinstance(g, str) for g in resources["gpu_classes"])
    assert all(isinstance(v, str) for v in container["environment_variables"].values())
    assert group["networking"]["protocol"] == "http"


def test_environment_parses_and_listens_on_ipv6(group: dict[str, Any]) -> None:
    env = group["container"]["environment_variables"]
    assert env["HOST"] == "::"
    settings = load_settings({**env, "HOME": "/home/comfy"})
    assert settings.port == group["networking"]["port"]
    manifest = json.loads(settings.manifest_json or "null")
    assert manifest["models"]["before_start"][0]["local_path"].startswith("/opt/ComfyUI/models/")


@pytest.mark.parametrize(
    ("probe", "path"),
    [("startup_probe", "/health"), ("liveness_probe", "/health"), ("readiness_probe", "/ready")],
)
def test_probes_point_at_the_sidecar(group: dict[str, Any], probe: str, path: str) -> None:
    spec = group[probe]
    assert set(spec) == PROBE_KEYS | {"http"}
    assert spec["http"]["path"] == path
    assert spec["http"]["port"] == int(group["container"]["environment_variables"]["PORT"])
    assert spec["http"]["scheme"] == "http"
    assert spec["period_seconds"] >= 1 and spec["timeout_seconds"] >= 1
    assert spec["success_threshold"] >= 1 and spec["failure_threshold"] >= 1
    assert spec["timeout_seconds"] < spec["period_seconds"]


def test_startup_probe_allows_for_manifest_installs(group: dict[str, Any]) -> None:
    startup = group["startup_probe"]
    assert startup["failure_threshold"] * startup["period_seconds"] >= 30 * 60
