"""Helpers for the manifest tests: a hand-built wheel, local git repositories, a throwaway
virtual environment, and the storage suite's servers (FileServer, moto)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Sidecar
from tests.storage.conftest import moto_server, s3_client, s3_env  # noqa: F401 (fixtures)
from tests.storage.servers import FileServer

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def build_wheel(where: Path, name: str, version: str = "1.0", value: str = "1") -> Path:
    """A pure-Python wheel ``name`` with module ``name`` whose ``VALUE`` is ``value``."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {value!r}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = where / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def git(*args: str, cwd: Path) -> str:
    out = subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def make_repo(path: Path, versions: list[dict[str, str]]) -> list[str]:
    """A git repository with one commit per ``versions`` item (files to write), tagged
    ``v1``, ``v2``...; returns the commit shas."""
    path.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=path)
    shas = []
    for n, files in enumerate(versions, 1):
        for name, text in files.items():
            (path / name).write_text(text)
        git("add", "-A", cwd=path)
        git("commit", "-q", "-m", f"version {n}", cwd=path)
        git("tag", f"v{n}", cwd=path)
        shas.append(git("rev-parse", "HEAD", cwd=path))
    return shas


def make_venv(path: Path) -> Path:
    """A throwaway venv that sees the system site-packages (so ``python -m pip`` works
    without ensurepip); returns its python."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)],
        check=True,
    )
    return path / "bin" / "python"


def fatal_lines(sidecar: Sidecar) -> list[str]:
    return [line for line in sidecar.log().splitlines() if " fatal: " in line]


def watch_probes(sidecar: Sidecar, timeout: float) -> list[dict[str, Any]]:
    """Poll ``/health`` until ``/ready`` is 200; return every distinct 503 body seen."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert sidecar.proc is not None
        if sidecar.proc.poll() is not None:
            raise AssertionError(f"sidecar exited:\n{sidecar.log()[-4000:]}")
        try:
            health = sidecar.get("/health", timeout=5)
        except Exception:
            time.sleep(0.05)
            continue
        if health.status_code == 503:
            body = health.json()
            if body not in seen:
                seen.append(body)
        elif sidecar.get("/ready", timeout=5).status_code == 200:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"never ready:\n{sidecar.log()[-4000:]}")


@pytest.fixture()
def files() -> Any:
    server = FileServer()
    yield server
    server.stop()


def manifest_env(manifest: dict[str, Any]) -> dict[str, str]:
    return {"MANIFEST_JSON": json.dumps(manifest)}
