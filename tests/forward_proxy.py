"""A real forward proxy (Debian's ``tinyproxy``) on a free loopback port, with its own config
and log in a test directory: what ``HTTP_PROXY``/``HTTPS_PROXY`` point the sidecar at in the
SSRF guard's proxy tests. tinyproxy forwards to any address, loopback included (it has no
guard of its own), so a loopback server can stand in for a metadata service behind it.
:meth:`ForwardProxy.requests` reads what it was asked to fetch from its log."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.waiting import wait_for

TINYPROXY = shutil.which("tinyproxy") or (
    "/usr/bin/tinyproxy" if Path("/usr/bin/tinyproxy").is_file() else None
)
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class ForwardProxy:
    """One ``tinyproxy -d`` process; ``url`` is its ``http://`` URL."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.log_path = directory / "tinyproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment that sends every http(s) URL through this proxy (both spellings:
        the lower-case ones win in urllib and httpx; NO_PROXY emptied)."""
        env: dict[str, str] = {}
        for name in ("http_proxy", "https_proxy"):
            env[name] = env[name.upper()] = self.url
        env["no_proxy"] = env["NO_PROXY"] = ""
        return env

    def start(self) -> None:
        assert TINYPROXY is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "tinyproxy.conf"
        conf.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "Listen 127.0.0.1",
                    "Timeout 30",
                    "MaxClients 64",
                    "Allow 127.0.0.1",
                    f'LogFile "{self.log_path}"',
                    "LogLevel Connect",  # one "Request ..." line per request it forwards
                    "",
                ]
            )
        )
        with (self.dir / "tinyproxy.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [TINYPROXY, "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
            )
        wait_for(lambda: _accepts(self.port), timeout=20, what="tinyproxy to listen")

    def requests(self) -> list[tuple[str, str]]:
        """``(method, url)`` of every request it was asked to forward, in order (absolute
        URLs; ``CONNECT host:port`` for a tunnel)."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text(errors="replace")
        return [(m.group(1), m.group(2)) for m in _REQUEST.finditer(text)]

    def asked_for(self, fragment: str) -> list[tuple[str, str]]:
        """The requests whose URL contains ``fragment``."""
        return [(method, url) for method, url in self.requests() if fragment in url]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def forward_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    """A started tinyproxy for one test module (skipped when the package is not installed)."""
    if TINYPROXY is None:
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy)")
    proxy = ForwardProxy(tmp_path_factory.mktemp("tinyproxy"))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
