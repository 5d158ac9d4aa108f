"""PromQL text helpers for the monitoring tests: the shipped rules and dashboard as expressions a
Prometheus can evaluate, and the ``bool`` form of an alert's expression."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
PROMETHEUS_YML = ROOT / "docker" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "comfy-sidecar-dashboard.json"

_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")
_BOOL = re.compile(r"\s*bool\b")


def bool_form(expr: str) -> str:
    """``expr`` with every comparison operator given the ``bool`` modifier (``a > 0.8`` ->
    ``a > bool 0.8``): each comparison then yields 0 or 1 for every series it compares instead
    of dropping those that do not pass, so the result holds a series wherever the expression's
    selectors, functions and vector matches meet real series, whatever the thresholds say.
    Label matchers (``{a!="b"}``), ranges and strings are left alone."""
    out: list[str] = []
    braces = brackets = 0
    i = 0
    while i < len(expr):
        char = expr[i]
        if char in "\"'`":
            end = i + 1
            while end < len(expr) and expr[end] != char:
                end += 2 if expr[end] == "\\" and char != "`" else 1
            out.append(expr[i : end + 1])
            i = end + 1
            continue
        braces += {"{": 1, "}": -1}.get(char, 0)
        brackets += {"[": 1, "]": -1}.get(char, 0)
        match = _COMPARISON.match(expr, i) if braces == brackets == 0 else None
        if match is not None:
            out.append(match.group())
            i = match.end()
            if not _BOOL.match(expr, i):
                out.append(" bool")
            continue
        out.append(char)
        i += 1
    return "".join(out)


def rules() -> list[dict[str, Any]]:
    """Every rule of docker/prometheus/alerts.yml (``alert`` or ``record``, ``expr``, ...)."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def rule_name(rule: dict[str, Any]) -> str:
    return str(rule.get("alert") or rule["record"])


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_targets() -> list[tuple[str, str]]:
    """``("<panel title>/<refId>", expr)`` of every target of every dashboard panel."""
    return [
        (f"{panel['title']}/{target['refId']}", target["expr"])
        for panel in dashboard()["panels"]
        for target in panel["targets"]
    ]


def grafana_expr(expr: str, rate_interval: str) -> str:
    """``expr`` as Grafana sends it when every template variable is at its "All" value
    (``allValue``, else ``.*``) and ``$__rate_interval``/``$__interval`` is ``rate_interval``."""
    values = {"__rate_interval": rate_interval, "__interval": rate_interval}
    for variable in dashboard()["templating"]["list"]:
        values.setdefault(variable["name"], variable.get("allValue") or ".*")

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)
