"""docker/k8s/: schema-valid offline, and wired to the sidecar's probes, drain and files.

Validation uses kubernetes-validate's bundled JSON schemas (strict: unknown fields are errors)
with the network blocked, for the oldest and newest Kubernetes versions checked here.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from comfy_sidecar.config import load_settings
from tests.deploy._graph import check_prompt_graph

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
#: Monitoring and autoscaling add-ons, applied on their own (tests/deploy/test_monitoring.py).
#: Queue mode (JOB_QUEUE_URL), applied on its own too (tests below).
ADDON_FILES = {
    "podmonitor.yaml",
    "prometheusrule.yaml",
    "keda-scaledobject.yaml",
    "hpa.yaml",
    "redis.yaml",
    "keda-redis-streams.yaml",
}
RESOURCE_FILES = sorted(
    p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml" and p.name not in ADDON_FILES
)
# 1.30: the oldest minor here with the preStop `sleep` action on by default (beta); 1.33: a
# current one. Both are bundled with kubernetes-validate, so no schema is fetched.
K8S_VERSIONS = ["1.30.0", "1.33.0"]
COMFY_STOP_S = 10


def _docs() -> list[dict[str, Any]]:
    out = []
    for path in RESOURCE_FILES:
        out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return dict(pod["containers"][0])


def _env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container()["env"]}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", RESOURCE_FILES, ids=lambda p: p.name)
def test_resources_validate_offline(path: Path, version: str) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.usefixtures("no_network")
def test_validation_rejects_a_misspelt_field() -> None:
    deployment = _one("Deployment")
    bad = json.loads(json.dumps(deployment))
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["startupProbes"] = container.pop("startupProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_resource_file() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in RESOURCE_FILES)


def test_environment_parses_with_the_sidecar_settings() -> None:
    settings = load_settings({**_env(), "HOME": "/home/comfy"})
    port = _container()["ports"][0]
    assert port["name"] == "http" and port["containerPort"] == settings.port
    assert settings.host == "::"


def _probe(name: str) -> dict[str, Any]:
    probe = dict(_container()[name])
    assert probe["httpGet"]["port"] == "http"
    return probe


def test_probes_follow_the_sidecar_contract() -> None:
    startup = _probe("startupProbe")
    assert startup["httpGet"]["path"] == "/health"
    # Manifest installs and model downloads: at least 30 minutes before the kubelet gives up.
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 30 * 60
    assert _probe("readinessProbe")["httpGet"]["path"] == "/ready"
    assert _probe("livenessProbe")["httpGet"]["path"] == "/health"
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = _probe(name)
        assert probe["timeoutSeconds"] < probe["periodSeconds"]


def test_termination_grace_covers_prestop_drain_and_comfyui_stop() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    grace_s = float(_env()["SHUTDOWN_GRACE_S"])
    pre_stop = _container().get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    pre_stop_s = pre_stop.get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + grace_s + COMFY_STOP_S


def test_gpu_requested_and_limited() -> None:
    resources = _container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


def test_cache_volume_is_the_claim_mounted_at_cache_dir() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    cache_volume = volumes[mounts[_env()["CACHE_DIR"]]]
    claim = _one("PersistentVolumeClaim")
    assert cache_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_manifest_and_warmup_come_from_the_configmap() -> None:
    env = _env()
    pod = _one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = _one("ConfigMap")
    for variable in ("MANIFEST", "WARMUP_PROMPT_FILE"):
        path = Path(env[variable])
        mount = next(m for m in _container()["volumeMounts"] if m["mountPath"] == str(path.parent))
        assert mount.get("readOnly") is True
        source = volumes[mount["name"]]["configMap"]["name"]
        assert source == config_map["metadata"]["name"]
        assert path.name in config_map["data"], f"{variable}: key {path.name} not in ConfigMap"
    manifest = yaml.safe_load(config_map["data"][Path(env["MANIFEST"]).name])
    assert set(manifest) <= {"apt", "pip", "custom_nodes", "models"}
    assert not manifest.get("apt"), "the image runs as UID 1000: apt packages cannot install"
    for model in manifest["models"]["before_start"]:
        assert model["url"].startswith("https://") and model["local_path"].startswith("/opt/")
    warmup = json.loads(config_map["data"][Path(env["WARMUP_PROMPT_FILE"]).name])
    assert check_prompt_graph(warmup) == []
    checkpoints = [
        n["inputs"]["ckpt_name"]
        for n in warmup.values()
        if n["class_type"] == "CheckpointLoaderSimple"
    ]
    installed = [Path(m["local_path"]).name for m in manifest["models"]["before_start"]]
    assert checkpoints and set(checkpoints) <= set(installed)


def test_service_routes_to_the_pods_http_port() -> None:
    service = _one("Service")
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    selector = _one("Deployment")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()


def test_runs_as_the_images_non_root_user() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 1000 and security["fsGroup"] == 1000


def test_tmp_is_memory_backed_for_the_binarys_unpacking() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    assert volumes[mounts["/tmp"]]["emptyDir"]["medium"] == "Memory"


# --- queue mode: redis.yaml and keda-redis-streams.yaml ----------------------------------------


def _redis_docs() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / "redis.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert sorted(by_kind) == ["Service", "StatefulSet"] and len(docs) == 2
    return by_kind


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_redis_validates_offline(version: str) -> None:
    for doc in _redis_docs().values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_redis_keeps_an_append_only_file_on_its_own_volume() -> None:
    redis = _redis_docs()["StatefulSet"]
    pod = redis["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[0] == "redis-server"
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    assert mounts[data_dir] in claims
    assert redis["spec"]["replicas"] == 1


def test_the_queue_url_in_the_instructions_reaches_the_redis_service() -> None:
    from urllib.parse import urlsplit

    service = _redis_docs()["Service"]
    text = (K8S / "redis.yaml").read_text()
    url = text.split("JOB_QUEUE_URL=", 1)[1].split()[0]
    settings = load_settings({**_env(), "HOME": "/home/comfy", "JOB_QUEUE_URL": url})
    parts = urlsplit(settings.job_queue_url or "")
    assert parts.hostname == service["metadata"]["name"]
    assert parts.port == service["spec"]["ports"][0]["port"]
    labels = _redis_docs()["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


REDIS_STREAMS_TRIGGER = {
    "type": "object",
    "properties": {
        "type": {"const": "redis-streams"},
        "metadata": {
            "type": "object",
            "properties": {
                "address": {"type": "string", "pattern": "^[a-z0-9.-]+:[0-9]+$"},
                "databaseIndex": {"type": "string", "pattern": "^[0-9]+$"},
                "stream": {"type": "string"},
                "consumerGroup": {"type": "string"},
                "pendingEntriesCount": {"type": "string", "pattern": "^[0-9]+$"},
                "lagCount": {"type": "string", "pattern": "^[0-9]+$"},
                "activationLagCount": {"type": "string", "pattern": "^[0-9]+$"},
            },
            "required": ["address", "stream", "consumerGroup"],
            "additionalProperties": False,
        },
    },
    "required": ["type", "metadata"],
    "additionalProperties": False,
}


def test_keda_scales_on_the_job_streams_pending_entries_and_lag() -> None:
    import jsonschema

    from comfy_sidecar.jobs.redis.store import GROUP, WORK

    scaled = yaml.safe_load((K8S / "keda-redis-streams.yaml").read_text())
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == _one("Deployment")["metadata"]["name"]
    triggers = scaled["spec"]["triggers"]
    for trigger in triggers:
        jsonschema.validate(trigger, REDIS_STREAMS_TRIGGER)
        meta = trigger["metadata"]
        assert (meta["stream"], meta["consumerGroup"]) == (WORK, GROUP)
        service = _redis_docs()["Service"]
        port = service["spec"]["ports"][0]["port"]
        assert meta["address"] == f"{service['metadata']['name']}:{port}"
    kinds = sorted("lagCount" if "lagCount" in t["metadata"] else "pending" for t in triggers)
    assert kinds == ["lagCount", "pending"]
    pending = next(t for t in triggers if "pendingEntriesCount" in t["metadata"])
    slots = load_settings({**_env(), "HOME": "/home/comfy"}).max_jobs_per_instance
    assert int(pending["metadata"]["pendingEntriesCount"]) == slots
    bad = json.loads(json.dumps(triggers[0]))
    bad["metadata"]["consumergroup"] = bad["metadata"].pop("consumerGroup")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, REDIS_STREAMS_TRIGGER)
