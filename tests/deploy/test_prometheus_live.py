"""The shipped Grafana dashboard and rules, evaluated by a real Prometheus scraping real
sidecars.

A ``prometheus`` (Debian's package) on loopback scrapes, every second, a sidecar in front of
the ComfyUI double and, when ``redis-server`` is installed, a second one in queue mode
(``JOB_QUEUE_URL``); it loads docker/prometheus/alerts.yml. Two rounds of traffic then make
every series the dashboard and the rules read exist and move between two scrapes: jobs that
complete (``/prompt``, ``/jobs``, a webhook job, a job through Redis), a job that fails, URL
inputs (a download, then a cache hit), a 404. Then, through Prometheus's HTTP API:

* every target of every dashboard panel, with Grafana's variables at their "All" value and
  ``$__rate_interval`` at 5m, returns at least one series with a finite value: a panel that
  would stay empty (or all NaN) in Grafana fails its test;
* every recording rule's series exists, and every rule's health is ``ok`` with no evaluation
  error (vector-matching errors only show with real series);
* every alert's expression in its ``bool`` form returns at least one series. An alert is
  empty by design while nothing is wrong (``restarts > 3``); in ``bool`` form each comparison
  yields 0 or 1 instead of filtering, so the result is empty only when a metric name, a label
  matcher, a function or a vector match does not meet the real series — what a typo breaks.
  (Whether the thresholds fire at the right time is promtool's part, test_alerts.py.)
* every label name an expression names (in a matcher, ``by``, ``without``, ``on``, ...) is a
  label of the scraped series: a misspelt label in a negative matcher or a grouping filters
  nothing out, so it would not empty the result;
* no scraped series has an ``exported_*`` label: a label of ours clashing with a target label
  (``instance``, ``job``) would be renamed, and every expression using it would read the
  target's instead.

Skipped, with that reason, when ``prometheus`` is not installed; the queue-mode expressions
are skipped when ``redis-server`` is not.
"""

from __future__ import annotations

import contextlib
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Sidecar, basic_prompt, png_bytes, running_sidecar
from tests.deploy.promql import (
    ALERTS,
    PROMETHEUS_YML,
    bool_form,
    grafana_expr,
    panel_targets,
    rule_name,
    rules,
)
from tests.deploy.test_monitoring import QUEUE_MODE_ONLY, metric_names
from tests.prometheus_server import MISSING, PROMETHEUS, PrometheusServer
from tests.receiver import Receiver
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.storage.servers import FileServer
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason=MISSING)

#: What ``$__rate_interval`` stands for: long enough to hold both rounds of traffic.
RATE_INTERVAL = "5m"
#: How long a query may take to show the data (a scrape and a rule evaluation are 1 s apart).
SHOW_S = 30
NO_REDIS = "redis-server is not installed (apt-get install redis-server): no queue-mode sidecar"


@dataclass
class Live:
    prometheus: PrometheusServer
    sidecars: list[Sidecar]
    queue_mode: bool


def _oom_prompt(key: str) -> dict[str, Any]:
    """A prompt the double fails with ComfyUI's out-of-memory error (503, job ``failed``)."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "DoubleOutOfMemory",
            "inputs": {"image": ["1", 0], "times": 9, "key": key},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "oom"}},
    }


def _traffic(plain: Sidecar, queued: Sidecar | None, files: FileServer, hook: Receiver) -> None:
    """One round: jobs that complete on every endpoint kind, one that fails, a download and a
    cache hit, a webhook delivery, a 404."""
    assert plain.post("/prompt", json={"prompt": basic_prompt(batch=1)}).status_code == 200
    job_id = f"live-{uuid.uuid4().hex}"
    accepted = plain.post("/jobs", json={"prompt": basic_prompt(batch=1), "id": job_id})
    assert accepted.status_code == 202, accepted.text
    done = plain.get(f"/jobs/{job_id}", params={"wait": 60}, timeout=70).json()
    assert done["status"] == "completed", done
    failed = plain.post("/prompt", json={"prompt": _oom_prompt(uuid.uuid4().hex)})
    assert failed.status_code == 503, failed.text
    url = files.url(f"/files/live.png?v={uuid.uuid4().hex}")  # new: a miss, then a hit
    load = {
        "1": {"class_type": "LoadImage", "inputs": {"image": url}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "l"}},
    }
    for _ in range(2):
        assert plain.post("/prompt", json={"prompt": load}).status_code == 200
    seen = len(hook.snapshot())
    hooked = plain.post(
        "/prompt", json={"prompt": basic_prompt(batch=1), "webhook_v2": hook.url + "/h"}
    )
    assert hooked.status_code == 202, hooked.text
    hook.wait_for(seen + 1, timeout=60)
    assert plain.get("/no/such/route").status_code == 404
    if queued is not None:
        job_id = f"live-q-{uuid.uuid4().hex}"
        accepted = queued.post("/jobs", json={"prompt": basic_prompt(batch=1), "id": job_id})
        assert accepted.status_code == 202, accepted.text
        done = queued.get(f"/jobs/{job_id}", params={"wait": 60}, timeout=70).json()
        assert done["status"] == "completed", done


def _jobs_ended(sidecar: Sidecar) -> float:
    """``sum(comfyui_jobs_total)`` as the sidecar's own /metrics says it now."""
    text = sidecar.get("/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "comfyui_jobs"
        for sample in family.samples
    )


def _wait_scraped(prometheus: PrometheusServer, sidecars: list[Sidecar]) -> None:
    """Wait until Prometheus has scraped each sidecar since its last job ended."""
    for sidecar in sidecars:
        ended = _jobs_ended(sidecar)
        expr = f'sum(comfyui_jobs_total{{instance="127.0.0.1:{sidecar.port}"}})'

        def caught_up(expr: str = expr, ended: float = ended) -> bool:
            result = prometheus.query(expr)
            return bool(result) and float(result[0]["value"][1]) >= ended

        wait_for(caught_up, timeout=SHOW_S, interval=0.2, what=f"a scrape showing {expr}")


def _pod_labels(pod: str) -> dict[str, str]:
    """The target labels the shipped pod-discovery job (docker/prometheus/prometheus.yml)
    gives a pod (``namespace``, ``pod``), with made-up values: the dashboard groups by them."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "comfy-sidecar-pods"]
    values = {
        "__meta_kubernetes_namespace": "comfy-test",
        "__meta_kubernetes_pod_name": pod,
    }
    return {
        relabel["target_label"]: values[relabel["source_labels"][0]]
        for relabel in job["relabel_configs"]
        if relabel.get("target_label")
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("live-prometheus")
    files = FileServer()
    files.files["live.png"] = png_bytes((9, 5), (30, 60, 90))
    hook = Receiver()
    redis = RedisServer(tmp / "redis") if REDIS_SERVER is not None else None
    with contextlib.ExitStack() as stack:
        stack.callback(files.stop)
        stack.callback(hook.stop)
        # LRU_CACHE_SIZE_GB set, so the dashboard's limit line has a series
        plain = stack.enter_context(running_sidecar("double", tmp / "plain", LRU_CACHE_SIZE_GB="1"))
        queued = None
        if redis is not None:
            redis.start()
            stack.callback(redis.stop)
            queued = stack.enter_context(
                running_sidecar("double", tmp / "queued", JOB_QUEUE_URL=redis.url)
            )
        sidecars = [plain] + ([queued] if queued is not None else [])
        prometheus = PrometheusServer(
            tmp / "prometheus",
            {
                f"127.0.0.1:{sidecar.port}": _pod_labels(f"comfy-sidecar-{n}")
                for n, sidecar in enumerate(sidecars)
            },
            [ALERTS],
        )
        prometheus.start()
        stack.callback(prometheus.stop)

        def scraped_twice() -> bool:
            counts = prometheus.query("count_over_time(up[1m]) >= 2 and up == 1")
            return len(counts) == len(sidecars)

        wait_for(scraped_twice, timeout=SHOW_S, interval=0.2, what="every target up, 2 scrapes")
        for _ in range(2):  # counters created in the first round move in the second
            _traffic(plain, queued, files, hook)
            _wait_scraped(prometheus, sidecars)
        yield Live(prometheus, sidecars, queue_mode=queued is not None)


def _needs_queue(live: Live, expr: str) -> None:
    if metric_names(expr) & QUEUE_MODE_ONLY and not live.queue_mode:
        pytest.skip(NO_REDIS)


def _labels_used(expr: str) -> set[str]:
    """Label names ``expr`` names: in matchers (``{reason!="x"}``) and in ``by``, ``without``,
    ``on``, ``ignoring``, ``group_left`` and ``group_right`` lists."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    names = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        names |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    lists = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for listed in re.findall(lists, text):
        names |= {name.strip() for name in listed.split(",") if name.strip()}
    return names


def _check(live: Live, expr: str, finite: bool, timeout: float = SHOW_S) -> None:
    """``expr`` names only label names the scraped series have, and returns a series (with a
    finite value, if ``finite``) within ``timeout`` seconds; AssertionError otherwise. (A
    misspelt label in a negative matcher or a grouping list filters nothing out, so it is
    caught by its name, not by an empty result.)"""
    unknown = _labels_used(expr) - set(live.prometheus.api("labels"))
    assert not unknown, f"{expr}: no scraped series has the label(s) {sorted(unknown)}"

    def result() -> list[dict[str, Any]]:
        found = live.prometheus.query(expr)
        if finite:
            return [s for s in found if math.isfinite(float(s["value"][1]))]
        return found

    wait_for(result, timeout=timeout, interval=0.2, what=f"series from {expr}")


def test_no_scraped_label_clashes_with_a_target_label(live: Live) -> None:
    labels = live.prometheus.api("labels")
    assert not [name for name in labels if name.startswith("exported_")], labels
    assert "comfyui_instance" in labels


@pytest.mark.parametrize(("panel", "expr"), panel_targets(), ids=[p for p, _ in panel_targets()])
def test_dashboard_panel_shows_data(live: Live, panel: str, expr: str) -> None:
    _needs_queue(live, expr)
    _check(live, grafana_expr(expr, RATE_INTERVAL), finite=True)


@pytest.mark.parametrize("rule", rules(), ids=[rule_name(rule) for rule in rules()])
def test_rule_evaluates_to_series(live: Live, rule: dict[str, Any]) -> None:
    name = rule_name(rule)
    _needs_queue(live, rule["expr"])
    _check(live, rule["record"] if "record" in rule else bool_form(rule["expr"]), finite=False)

    def evaluated() -> dict[str, Any] | None:
        (loaded,) = [r for r in live.prometheus.rules() if r["name"] == name]
        return loaded if loaded["health"] != "unknown" else None

    loaded = wait_for(evaluated, timeout=SHOW_S, interval=0.2, what=f"{name} evaluated")
    assert loaded["health"] == "ok" and not loaded.get("lastError"), loaded


def test_the_live_check_catches_a_misspelt_name(live: Live) -> None:
    """The criterion is not vacuous: a wrong metric name, label value, label name or grouping
    label in a real expression fails it."""
    (restarts,) = [r for r in rules() if r.get("alert") == "ComfyUIRestartingRepeatedly"]
    good = bool_form(restarts["expr"])
    _check(live, good, finite=False)
    for broken in (
        good.replace("comfyui_process_restarts_total", "comfyui_process_restart_total"),
        good.replace('reason!="recycle"', 'reason="recylce"'),
        good.replace('reason!="recycle"', 'reasons!="recycle"'),
        good.replace("without (reason)", "without (reasons)"),
    ):
        assert broken != good
        with pytest.raises(AssertionError):
            _check(live, broken, finite=False, timeout=0)
