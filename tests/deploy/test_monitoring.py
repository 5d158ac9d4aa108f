"""docker/grafana, docker/prometheus and the k8s monitoring/autoscaling add-ons: valid, and
naming only metrics the sidecar's ``/metrics`` really exposes.

The HPA is a core resource (kubernetes-validate, strict, offline); the PodMonitor, the
PrometheusRule and the KEDA ScaledObject are CRDs, so their structure is checked against the
small schemas below (the fields the Prometheus Operator and KEDA require, no unknown ones where
we set them). The rules themselves are tested by promtool (test_alerts.py) and, with the
dashboard, evaluated by a real Prometheus (test_prometheus_live.py).
"""

from __future__ import annotations

import json
import re
import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import running_sidecar
from tests.deploy.promql import ALERTS, rules
from tests.deploy.test_k8s import K8S, K8S_VERSIONS, no_network  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "comfy-sidecar-dashboard.json"
PROMETHEUS = ROOT / "docker" / "prometheus" / "prometheus.yml"
WAITING_PLUS_RUNNING = "sum(comfyui_jobs_waiting + comfyui_jobs_running)"
#: Exposed only in queue mode (JOB_QUEUE_URL), which the ``exposed`` sidecar does not run in.
QUEUE_MODE_ONLY = {"comfyui_job_queue_up"}


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S / name).read_text())
    return doc


def _deployment() -> dict[str, Any]:
    return _load("deployment.yaml")


def _closed(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


METADATA = {"type": "object", "required": ["name"]}
POD_MONITOR = _closed(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": METADATA,
        "spec": _closed(
            {
                "selector": _closed(
                    {"matchLabels": {"type": "object", "minProperties": 1}}, ["matchLabels"]
                ),
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+s$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+s$"},
                        },
                        ["port", "path"],
                    ),
                },
            },
            ["selector", "podMetricsEndpoints"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)
DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
TEXT_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PROMETHEUS_RULE = _closed(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": _closed(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "oneOf": [
                                        _closed(
                                            {
                                                "alert": {
                                                    "type": "string",
                                                    "pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                                                },
                                                "expr": {"type": "string", "minLength": 1},
                                                "for": DURATION,
                                                "labels": TEXT_MAP,
                                                "annotations": TEXT_MAP,
                                            },
                                            ["alert", "expr"],
                                        ),
                                        _closed(
                                            {
                                                "record": {
                                                    "type": "string",
                                                    "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$",
                                                },
                                                "expr": {"type": "string", "minLength": 1},
                                                "labels": TEXT_MAP,
                                            },
                                            ["record", "expr"],
                                        ),
                                    ]
                                },
                            },
                        },
                        ["name", "rules"],
                    ),
                }
            },
            ["groups"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)
SCALE_TARGET = _closed(
    {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"}},
    ["name"],
)
SCALED_OBJECT = _closed(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": METADATA,
        "spec": _closed(
            {
                "scaleTargetRef": SCALE_TARGET,
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _closed(
                        {
                            "type": {"const": "prometheus"},
                            "metadata": _closed(
                                {
                                    "serverAddress": {"type": "string", "pattern": "^https?://"},
                                    "query": {"type": "string"},
                                    "threshold": {"type": "string", "pattern": r"^[0-9.]+$"},
                                    "activationThreshold": {"type": "string"},
                                },
                                ["serverAddress", "query", "threshold"],
                            ),
                        },
                        ["type", "metadata"],
                    ),
                },
            },
            ["scaleTargetRef", "triggers"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)


# --- what /metrics exposes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Every sample name a sidecar in front of the double exposes (each histogram's
    ``_bucket``/``_sum``/``_count``, each counter's ``_total``), from its ``# TYPE`` lines."""
    with running_sidecar("double", tmp_path_factory.mktemp("dashboard")) as sidecar:
        text = sidecar.get("/metrics").text
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count", ""),
        }.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    yield names


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_WORDS |= {"and", "or", "unless", "offset", "le", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (strings, label matchers, ranges, grouping
    clauses and function names taken out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(http_x_bucket{a="b{c}"}[5m]))) '
        "/ on (pod) group_left count(up) + comfyui_y"
    )
    assert metric_names(expr) == {"http_x_bucket", "up", "comfyui_y"}


# --- the Grafana dashboard --------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "panels", "schemaVersion", "templating", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "templating": {"type": "object", "required": ["list"]},
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos", "datasource", "targets"],
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"enum": ["timeseries", "stat", "gauge", "bargauge", "table"]},
                    "gridPos": {
                        "type": "object",
                        "required": ["x", "y", "w", "h"],
                        "properties": {
                            "x": {"type": "integer", "minimum": 0, "maximum": 23},
                            "w": {"type": "integer", "minimum": 1, "maximum": 24},
                        },
                    },
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "object", "required": ["refId", "expr"]},
                    },
                },
            },
        },
    },
}


def test_dashboard_passes_the_schema_check() -> None:
    dashboard = _dashboard()
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        used = set(re.findall(r"\$\{?(\w+)", json.dumps(panel)))
        assert used - {"__rate_interval", "__interval"} <= variables, panel["title"]


def test_dashboard_has_the_panels_operators_need() -> None:
    exprs = " ".join(t["expr"] for p in _dashboard()["panels"] for t in p["targets"])
    for metric in (
        "comfyui_jobs_waiting",
        "comfyui_jobs_running",
        "comfyui_jobs_total",
        "comfyui_job_duration_seconds_bucket",
        "comfyui_instance_up",
        "comfyui_instance_ready",
        "comfyui_process_restarts_total",
        "comfyui_gpu_memory_used_bytes",
        "http_server_request_duration_seconds_bucket",
    ):
        assert metric in metric_names(exprs), metric


def test_dashboard_names_only_exposed_metrics(exposed: set[str]) -> None:
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            unknown = metric_names(target["expr"]) - exposed - QUEUE_MODE_ONLY
            assert not unknown, (panel["title"], target["expr"], unknown)


def test_rules_name_only_exposed_or_recorded_metrics(exposed: set[str]) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        unknown = metric_names(rule["expr"]) - exposed - recorded - QUEUE_MODE_ONLY
        assert not unknown, (rule.get("alert") or rule["record"], unknown)


# --- Prometheus, PodMonitor, KEDA, HPA --------------------------------------------------------


def test_prometheus_scrapes_metrics_of_the_sidecar_pods() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {job["metrics_path"] for job in jobs.values()} == {"/metrics"}
    pods = jobs["comfy-sidecar-pods"]["relabel_configs"]
    keep = {r["source_labels"][0]: r["regex"] for r in pods if r.get("action") == "keep"}
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert (
        keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
        == (labels["app.kubernetes.io/name"])
    )
    ports = _deployment()["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert keep["__meta_kubernetes_pod_container_port_name"] in {p["name"] for p in ports}


def test_pod_monitor_selects_the_pods_metrics_port() -> None:
    monitor = _load("podmonitor.yaml")
    jsonschema.validate(monitor, POD_MONITOR)
    template = _deployment()["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        template["metadata"]["labels"].items()
    )
    ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


def test_prometheus_rule_is_alerts_yml_in_the_operators_shape() -> None:
    """docker/k8s/prometheusrule.yaml is what scripts/prometheus_rule.py writes from
    alerts.yml: the same groups, valid against the operator's fields."""
    script = ROOT / "scripts" / "prometheus_rule.py"
    prometheus_rule = runpy.run_path(str(script))["prometheus_rule"]
    path = K8S / "prometheusrule.yaml"
    assert path.read_text() == prometheus_rule(ALERTS.read_text()), (
        "docker/k8s/prometheusrule.yaml is stale: run scripts/prometheus_rule.py"
    )
    rule = _load("prometheusrule.yaml")
    jsonschema.validate(rule, PROMETHEUS_RULE)
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    labels = _load("podmonitor.yaml")["metadata"]["labels"]
    assert rule["metadata"]["labels"]["release"] == labels["release"]


def test_prometheus_rule_schema_refuses_a_misspelt_field() -> None:
    bad = _load("prometheusrule.yaml")
    bad["spec"]["groups"][1]["rules"][0]["annotation"] = {"summary": "x"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, PROMETHEUS_RULE)
    bad = _load("prometheusrule.yaml")
    bad["spec"]["groups"][1]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, PROMETHEUS_RULE)


def test_pod_monitor_schema_refuses_a_misspelt_field() -> None:
    bad = _load("podmonitor.yaml")
    bad["spec"]["podMetricsEndpoint"] = bad["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, POD_MONITOR)


def test_keda_scales_the_deployment_on_waiting_plus_running(exposed: set[str]) -> None:
    scaled = _load("keda-scaledobject.yaml")
    jsonschema.validate(scaled, SCALED_OBJECT)
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == (
        "Deployment",
        _deployment()["metadata"]["name"],
    )
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["query"] == WAITING_PLUS_RUNNING
    assert metric_names(trigger["metadata"]["query"]) <= exposed
    bad = json.loads(json.dumps(scaled))
    bad["spec"]["triggers"][0]["metadata"]["treshold"] = "2"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT)


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_hpa_validates_offline_and_targets_the_deployment(version: str) -> None:
    hpa = _load("hpa.yaml")
    kubernetes_validate.validate(hpa, version, strict=True)
    assert hpa["spec"]["scaleTargetRef"]["name"] == _deployment()["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    name = metric["external"]["metric"]["name"]
    # the adapter rule in the file's comment defines that metric as waiting + running
    comment = (K8S / "hpa.yaml").read_text()
    assert f"as: {name}" in comment
    assert "comfyui_jobs_waiting{<<.LabelMatchers>>} + comfyui_jobs_running" in comment


def test_addons_stay_out_of_the_kustomization() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    addons = {"podmonitor.yaml", "prometheusrule.yaml", "keda-scaledobject.yaml", "hpa.yaml"}
    addons |= {"redis.yaml", "keda-redis-streams.yaml"}
    assert not addons & set(kustomization["resources"])
