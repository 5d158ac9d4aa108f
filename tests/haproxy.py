"""A real HAProxy (the Debian package) in front of sidecar replicas, with a generated config:
round robin over the replicas, each health-checked on ``GET /ready`` (200 = in rotation) every
:data:`CHECK_INTER_MS` ms, one failed check takes a replica out and one good one puts it back.
A request whose connection to a replica fails (a replica restarting) is retried on another
(``retry-on conn-failure empty-response`` with ``option redispatch``); no status is retried, so
a replica that answers 503 shows up as a failed request. ``docker/haproxy.cfg`` is the same
setup for docker/compose.queue.yml.

HAProxy's stats page (CSV) on a second port tells which replicas it has in rotation
(:meth:`HAProxy.up`).
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.waiting import wait_for

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None
)
#: Milliseconds between health checks of each replica.
CHECK_INTER_MS = 200


def config(port: int, stats_port: int, servers: dict[str, int]) -> str:
    """haproxy.cfg text: listen on ``port``, stats on ``stats_port``, ``servers`` (name ->
    loopback port) in round robin."""
    lines = [
        "global",
        "    maxconn 512",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 300s",
        "    timeout server 300s",
        "    timeout check 2s",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        "listen sidecars",
        f"    bind 127.0.0.1:{port}",
        "    balance roundrobin",
        "    option httpchk GET /ready",
        "    http-check expect status 200",
        f"    default-server inter {CHECK_INTER_MS}ms fastinter {CHECK_INTER_MS}ms "
        f"downinter {CHECK_INTER_MS}ms fall 1 rise 1",
    ]
    lines += [f"    server {name} 127.0.0.1:{p} check" for name, p in servers.items()]
    lines += [
        "listen stats",
        f"    bind 127.0.0.1:{stats_port}",
        "    stats enable",
        "    stats uri /stats",
        "",
    ]
    return "\n".join(lines)


class HAProxy:
    """One ``haproxy`` process; ``url`` is its front end."""

    def __init__(self, directory: Path, servers: dict[str, int]) -> None:
        self.dir = directory
        self.port = free_port()
        self.stats_port = free_port()
        self.servers = servers
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Write the config, start haproxy in the foreground and wait for its stats page."""
        assert HAPROXY is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "haproxy.cfg"
        path.write_text(config(self.port, self.stats_port, self.servers))
        check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with (self.dir / "haproxy.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(self._stats, timeout=20, what="haproxy's stats page")

    def _stats(self) -> list[dict[str, str]] | None:
        try:
            response = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return list(csv.DictReader(io.StringIO(response.text.lstrip("# "))))

    def up(self) -> set[str]:
        """Names of the replicas in rotation now (their last checks passed)."""
        rows = self._stats() or []
        return {
            row["svname"]
            for row in rows
            if row["pxname"] == "sidecars"
            and row["svname"] in self.servers
            and row["status"].startswith("UP")
        }

    def wait_up(self, names: set[str], timeout: float = 30) -> None:
        """Wait until exactly ``names`` are in rotation."""
        wait_for(
            lambda: self.up() == names,
            timeout=timeout,
            interval=0.05,
            what=f"haproxy to have {sorted(names)} in rotation (has {sorted(self.up())})",
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[dict[str, int]], HAProxy]]:
    """``haproxy({name: port, ...})`` -> a started HAProxy over those loopback replicas, stopped
    at teardown (skipped when haproxy is not installed)."""
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    started: list[HAProxy] = []

    def start(servers: dict[str, int]) -> HAProxy:
        proxy = HAProxy(tmp_path / f"haproxy{len(started)}", servers)
        started.append(proxy)
        proxy.start()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
