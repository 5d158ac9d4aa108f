"""Real servers for the storage tests: moto's S3 server, Azurite, a small Hugging Face Hub,
and plain HTTP file servers. All bind 127.0.0.1 on free ports; started once per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfy_sidecar.config import Settings, load_settings
from comfy_sidecar.storage import Storage
from tests.conftest import free_port
from tests.storage.hf_hub_server import HubServer
from tests.storage.servers import FileServer

REPO = Path(__file__).resolve().parents[2]
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="session")
def model_bytes(tiny_model: Path) -> bytes:
    return tiny_model.read_bytes()


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def http_server() -> Iterator[FileServer]:
    server = FileServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def _azurite_bin() -> list[str]:
    local = REPO / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return [str(local)]
    found = shutil.which("azurite-blob")
    if found:
        return [found]
    return ["npx", "--no-install", "azurite-blob"]


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azurite's blob service; yields its connection string."""
    port = free_port()
    where = tmp_path_factory.mktemp("azurite")
    proc = subprocess.Popen(
        [
            *_azurite_bin(),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--location",
            str(where),
            "--silent",
            "--skipApiVersionCheck",
            "--loose",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        yield (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_KEY};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
        )
    finally:
        stop(proc)


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    import huggingface_hub.constants

    # Our hub speaks the LFS upload protocol, not Xet (that needs Hugging Face's CAS).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    server = HubServer()
    yield server
    server.stop()


#: ALLOWED_URL_HOSTS for tests whose servers listen on loopback.
LOOPBACK_ALLOWED = "127.0.0.0/8,::1,localhost"


def make_settings(tmp_path: Path, **env: str) -> Settings:
    base = {
        "HOME": str(tmp_path),
        "COMFY_HOME": str(tmp_path / "comfy"),
        "CACHE_DIR": str(tmp_path / "cache"),
        # The test servers run on loopback: allowed explicitly (test_netguard proves refusals).
        "ALLOWED_URL_HOSTS": LOOPBACK_ALLOWED,
    }
    base.update(env)
    return load_settings(base)


@pytest.fixture()
def events() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture()
def make_storage(tmp_path: Path, events: list[tuple[str, dict[str, Any]]]) -> Any:
    """``make_storage(env=..., **settings_env)`` -> a Storage (call ``await start()``)."""

    def make(env: dict[str, str] | None = None, **settings_env: str) -> Storage:
        settings = make_settings(tmp_path, **settings_env)
        sdk_env = {"HOME": str(tmp_path), **(env or {})}
        return Storage(settings, on_event=lambda n, d: events.append((n, d)), env=sdk_env)

    return make


@pytest.fixture()
def s3_env(moto_server: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_server,
    }


@pytest.fixture()
def s3_client(s3_env: dict[str, str]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


@pytest.fixture()
def blob_service(azurite: str) -> Any:
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(azurite)


os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
