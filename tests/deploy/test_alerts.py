"""docker/prometheus/alerts.yml, checked and unit-tested by ``promtool`` (Debian's
``prometheus`` package), with unit tests that are shown to catch a broken rule.

``tests/deploy/prometheus/alerts_test.yml`` gives each alert input series that fire it and
series that must not (other replicas below the threshold, not for long enough, or excluded by
a label), and an earlier evaluation at which nothing fires. Two mutations of each rule prove
those cases bite: the rule replaced by an expression that never fires, and the alert's
expression in its ``bool`` form (every comparison passes every series: it fires for each
replica of the input, among them replica ``b``, which every case expects to stay quiet), each
make ``promtool test rules`` fail.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.promql import ALERTS, PROMETHEUS_YML, ROOT, bool_form, rule_name, rules
from tests.prometheus_server import MISSING, PROMTOOL

UNIT_TESTS = ROOT / "tests" / "deploy" / "prometheus" / "alerts_test.yml"

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=MISSING)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def test_bool_form_keeps_every_compared_series() -> None:
    assert bool_form("a > 0.8") == "a > bool 0.8"
    assert bool_form('a{b!="c", d=~"e|f"} != 0') == 'a{b!="c", d=~"e|f"} != bool 0'
    assert bool_form("x / (y > 0) >= 2 and z == 1") == (
        "x / (y > bool 0) >= bool 2 and z == bool 1"
    )
    assert bool_form("x > bool 1") == "x > bool 1"
    assert bool_form('rate(a{l=">"}[5m]) < 3') == 'rate(a{l=">"}[5m]) < bool 3'


def test_every_alert_has_a_unit_test_that_fires_and_one_that_does_not() -> None:
    doc = yaml.safe_load(UNIT_TESTS.read_text())
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts <= fired, alerts - fired
    assert alerts <= quiet, alerts - quiet
    recorded = {
        check["expr"] for case in doc["tests"] for check in case.get("promql_expr_test", [])
    }
    assert {rule["record"] for rule in rules() if "record" in rule} <= recorded


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    checked = promtool("check", "rules", ALERTS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


@needs_promtool
def test_prometheus_config_loads_the_rules(tmp_path: Path) -> None:
    """The shipped prometheus.yml with its rule file. Its pod-discovery job is left out: Debian
    builds Prometheus without Kubernetes service discovery (test_monitoring.py checks that job
    against the Deployment)."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["scrape_configs"] = [
        job for job in config["scrape_configs"] if "kubernetes_sd_configs" not in job
    ]
    assert config["rule_files"] == ["alerts.yml"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    checked = promtool("check", "config", tmp_path / "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    tested = promtool("test", "rules", UNIT_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _run_mutated(tmp_path: Path, name: str, expr: str) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` of the unit tests against alerts.yml with rule ``name``'s
    expression replaced by ``expr``."""
    doc: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule_name(rule) == name:
                rule["expr"] = expr
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    tests = copy.deepcopy(yaml.safe_load(UNIT_TESTS.read_text()))
    tests["rule_files"] = [str(tmp_path / "alerts.yml")]
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    return promtool("test", "rules", tmp_path / "alerts_test.yml")


@needs_promtool
@pytest.mark.parametrize("name", [rule_name(rule) for rule in rules()])
def test_unit_tests_catch_a_rule_that_gives_nothing(tmp_path: Path, name: str) -> None:
    tested = _run_mutated(tmp_path, name, "vector(0) > 1")
    assert tested.returncode != 0, tested.stdout
    assert name in tested.stdout + tested.stderr


@needs_promtool
@pytest.mark.parametrize("name", [rule["alert"] for rule in rules() if "alert" in rule])
def test_unit_tests_catch_an_alert_that_fires_for_every_replica(tmp_path: Path, name: str) -> None:
    (rule,) = [rule for rule in rules() if rule.get("alert") == name]
    tested = _run_mutated(tmp_path, name, bool_form(rule["expr"]))
    assert tested.returncode != 0, tested.stdout
    assert name in tested.stdout + tested.stderr
    # it fired for replica b, which every case of the unit tests expects to stay quiet
    assert 'instance="b:3000"' in tested.stderr, tested.stderr
