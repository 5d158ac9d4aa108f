"""A real ``prometheus`` (the Debian package) for the monitoring tests: on a free loopback port,
with its own TSDB directory and a generated configuration scraping the given targets every
second and loading the given rule files; queried through its HTTP API (``/api/v1``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import free_port
from tests.waiting import wait_for

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
#: Why the tests that need them are skipped (scripts/test.sh installs the package as root).
MISSING = "prometheus/promtool are not installed (apt-get install prometheus)"


class PrometheusServer:
    """One ``prometheus`` process scraping ``targets`` (``host:port`` -> the target labels to
    add) at ``/metrics`` every second (job ``comfy-sidecar``) and evaluating ``rule_files``
    every second; ``url`` is its base URL."""

    def __init__(
        self, directory: Path, targets: dict[str, dict[str, str]], rule_files: list[Path]
    ) -> None:
        self.dir = directory
        self.port = free_port()
        self.config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {
                    "job_name": "comfy-sidecar",
                    "metrics_path": "/metrics",
                    "scrape_timeout": "1s",
                    "static_configs": [
                        {"targets": [target], "labels": labels}
                        for target, labels in targets.items()
                    ],
                }
            ],
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and wait until it is ready (its rules loaded)."""
        assert PROMETHEUS is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config))
        argv = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'tsdb'}"]
        argv += [f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        with (self.dir / "prometheus.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout=60, interval=0.1, what="prometheus /-/ready")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
        try:
            return self.client.get(self.url + "/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> Any:
        """``data`` of ``GET /api/v1/<path>``; AssertionError with Prometheus's error when its
        status is not ``success`` (a PromQL parse or evaluation error)."""
        body = self.client.get(f"{self.url}/api/v1/{path}", params=params).json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` gives now: ``[{"metric": {...}, "value": [t, "v"]}]``."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        result: list[dict[str, Any]] = data["result"]
        return result

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, as ``/api/v1/rules`` reports it (``health``, ``lastError``,
        ``lastEvaluation``, ``query``, ``name``, ``type``)."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self.client.close()
