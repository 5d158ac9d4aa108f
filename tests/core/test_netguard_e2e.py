"""The SSRF guard and the download limits through a running sidecar (the double): refused URLs
answer 400 naming the field and are never fetched; a download honours PROMPT_TIMEOUT_S and
POST /interrupt. The allowed test server listens on 127.0.0.2 (allowed by CIDR), so the
default refusals of 127.0.0.1, localhost, ... are what the sidecar sees."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import Sidecar, png_bytes, running_sidecar
from tests.storage.slow_server import SlowServer
from tests.waiting import wait_for

PROMPT_TIMEOUT_S = 4


@pytest.fixture(scope="module")
def server() -> Iterator[SlowServer]:
    srv = SlowServer("127.0.0.2")
    srv.files["red.png"] = png_bytes((8, 6), (200, 30, 10))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    with running_sidecar(
        "double",
        tmp_path_factory.mktemp("netguard"),
        ALLOWED_URL_HOSTS="127.0.0.2/32",
        PROMPT_TIMEOUT_S=str(PROMPT_TIMEOUT_S),
    ) as sc:
        yield sc


def load(image: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "g"}},
    }


def assert_refused(response: httpx.Response, location: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["location"] == location
    assert "refused" in body["error"]


def test_allowed_server_is_fetched(sidecar: Sidecar, server: SlowServer) -> None:
    response = sidecar.post("/prompt", json={"prompt": load(server.url("/files/red.png"))})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "127.1", "2130706433", "0x7f.1"]
)
def test_loopback_forms_refused(sidecar: Sidecar, server: SlowServer, host: str) -> None:
    before = server.hits
    url = f"http://{host}:{server.port}/files/red.png"
    response = sidecar.post("/prompt", json={"prompt": load(url)})
    assert_refused(response, "prompt.1.inputs.image")
    assert server.hits == before


def test_metadata_service_refused(sidecar: Sidecar) -> None:
    target = "http://169.254.169.254/latest/meta-data/"
    response = sidecar.post("/prompt", json={"prompt": load(target)})
    assert_refused(response, "prompt.1.inputs.image")


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "gopher://127.0.0.2:70/_x",
        "ftp://127.0.0.2/x.png",
    ],
)
def test_redirects_to_refused_targets(sidecar: Sidecar, server: SlowServer, target: str) -> None:
    via = server.url(f"/redirect?to={quote(target, safe='')}")
    assert_refused(sidecar.post("/prompt", json={"prompt": load(via)}), "prompt.1.inputs.image")


def test_own_and_comfyui_ports_refused(sidecar: Sidecar) -> None:
    for url in (
        f"http://127.0.0.2:{sidecar.port}/ready",
        f"http://127.0.0.2:{sidecar.comfy_port}/system_stats",
    ):
        response = sidecar.post("/prompt", json={"prompt": load(url)})
        assert_refused(response, "prompt.1.inputs.image")


def test_download_route_refused(sidecar: Sidecar, server: SlowServer) -> None:
    url = f"http://localhost:{server.port}/files/red.png"
    body = {"url": url, "model_type": "checkpoints", "wait": True}
    assert_refused(sidecar.post("/download", json=body), "url")


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("webhook", "ftp://example.com/hook"),
        ("webhook", "not a url"),
        ("webhook_v2", "http://169.254.169.254/hook"),
        ("webhook_v2", "http://localhost:9/hook"),
    ],
)
def test_webhook_urls_checked_at_submission(sidecar: Sidecar, field: str, url: str) -> None:
    prompt = load("red.png")
    response = sidecar.post("/prompt", json={"prompt": prompt, field: url})
    assert response.status_code == 400, response.text
    assert response.json()["location"] == field


def test_upload_target_checked_at_submission(sidecar: Sidecar, server: SlowServer) -> None:
    body = {
        "prompt": load(server.url("/files/red.png")),
        "http_upload": {"url_prefix": "http://169.254.169.254/up"},
    }
    assert_refused(sidecar.post("/prompt", json=body), "http_upload.url_prefix")


def test_slow_download_honours_prompt_timeout(sidecar: Sidecar, server: SlowServer) -> None:
    url = server.url("/trickle?job=timeout")
    response = sidecar.post("/prompt", json={"prompt": load(url)}, timeout=PROMPT_TIMEOUT_S * 5)
    assert response.status_code == 504, response.text


def test_interrupt_releases_a_caller_mid_download(sidecar: Sidecar, server: SlowServer) -> None:
    url = server.url("/trickle?job=interrupt")
    answers: list[httpx.Response] = []
    body = {"id": "dl-interrupt", "prompt": load(url)}
    caller = threading.Thread(
        target=lambda: answers.append(sidecar.post("/prompt", json=body, timeout=60))
    )
    open_before = server.open_now
    caller.start()
    wait_for(lambda: server.open_now > open_before, what="the download to start")
    response = sidecar.post("/interrupt", json={"id": "dl-interrupt"})
    assert response.status_code == 200, response.text
    caller.join(timeout=PROMPT_TIMEOUT_S - 1)  # released before PROMPT_TIMEOUT_S would
    assert answers and answers[0].status_code == 499, answers
