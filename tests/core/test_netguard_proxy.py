"""The SSRF guard behind a forward proxy (a real tinyproxy, ``HTTP_PROXY``/``HTTPS_PROXY`` set,
``NO_PROXY`` empty) through a running sidecar (the double): every caller URL and every redirect
hop is checked before the proxy is asked for it, a name the sidecar cannot resolve goes through
the proxy only when ``ALLOWED_URL_HOSTS`` names it, and the job adapters' webhook URLs get the
same check as ``/jobs``' ``webhook_v2`` (400 at the field).

The allowed "public" servers listen on 127.0.0.2 (allowed by CIDR); a recording server on
127.0.0.1 stands in for the metadata service at 169.254.169.254 (refused: loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import Sidecar, basic_prompt, png_bytes, running_sidecar
from tests.forward_proxy import ForwardProxy, forward_proxy
from tests.receiver import Receiver
from tests.storage.slow_server import SlowServer

# Subprocess sidecars: their proxy comes from the process environment (HTTP(S)_PROXY).
pytestmark = pytest.mark.sidecar_process

__all__ = ["forward_proxy"]  # the fixture, used by name

#: A name only the proxy could know (none resolves .invalid), allowed by ALLOWED_URL_HOSTS.
PROXY_ONLY = "files.proxy-only.invalid"


@pytest.fixture(scope="module")
def files() -> Iterator[SlowServer]:
    srv = SlowServer("127.0.0.2")
    srv.files["red.png"] = png_bytes((8, 6), (200, 30, 10))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def metadata() -> Iterator[Receiver]:
    """The metadata service's stand-in: records whatever reaches it."""
    server = Receiver()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hook() -> Iterator[Receiver]:
    """An allowed webhook receiver."""
    server = Receiver(host="127.0.0.2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar(
    tmp_path_factory: pytest.TempPathFactory, forward_proxy: ForwardProxy
) -> Iterator[Sidecar]:
    with running_sidecar(
        "double",
        tmp_path_factory.mktemp("netguard-proxy"),
        ALLOWED_URL_HOSTS=f"127.0.0.2/32,{PROXY_ONLY}",
        **forward_proxy.env(),
    ) as sc:
        yield sc


def load(image: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}},
    }


def assert_refused(response: httpx.Response, location: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["location"] == location, body
    assert "refused" in body["error"], body


def test_an_allowed_download_goes_through_the_proxy(
    sidecar: Sidecar, files: SlowServer, forward_proxy: ForwardProxy
) -> None:
    url = files.url("/files/red.png")
    response = sidecar.post("/prompt", json={"prompt": load(url)})
    assert response.status_code == 200, response.text
    assert forward_proxy.asked_for(url) == [("GET", url)]


@pytest.mark.parametrize(
    "target",
    ["http://127.0.0.1:{port}/latest/meta-data/iam", "http://localhost:{port}/latest/meta-data/"],
)
def test_a_redirect_to_a_refused_address_is_not_fetched_through_the_proxy(
    sidecar: Sidecar,
    files: SlowServer,
    metadata: Receiver,
    forward_proxy: ForwardProxy,
    target: str,
) -> None:
    target = target.format(port=metadata.server.server_address[1])
    via = files.url(f"/redirect?to={quote(target, safe='')}")
    response = sidecar.post("/prompt", json={"prompt": load(via)})
    assert_refused(response, "prompt.1.inputs.image")
    assert metadata.snapshot() == []
    assert forward_proxy.asked_for(via), "the first hop went through the proxy"
    assert forward_proxy.asked_for("/latest/meta-data") == []


def test_a_name_the_sidecar_cannot_resolve_is_refused_unless_allowed(
    sidecar: Sidecar, files: SlowServer, forward_proxy: ForwardProxy
) -> None:
    direct = "http://metadata.invalid/latest/meta-data/"
    response = sidecar.post("/prompt", json={"prompt": load(direct)})
    assert_refused(response, "prompt.1.inputs.image")
    assert "ALLOWED_URL_HOSTS" in response.json()["error"]
    via = files.url(f"/redirect?to={quote(direct, safe='')}")
    assert_refused(sidecar.post("/prompt", json={"prompt": load(via)}), "prompt.1.inputs.image")
    assert forward_proxy.asked_for("//metadata.invalid") == []

    # An allowed name goes to the proxy unresolved (this one it cannot resolve either: the
    # download fails there, not at the guard).
    allowed = f"http://{PROXY_ONLY}/red.png"
    response = sidecar.post("/prompt", json={"prompt": load(allowed)})
    assert response.status_code == 400, response.text
    assert "refused" not in response.json()["error"]
    assert forward_proxy.asked_for(PROXY_ONLY) == [("GET", allowed)]


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("webhook_v2", "http://hooks.invalid/hook"),
        ("webhook", "http://hooks.invalid/hook"),
        ("http_upload.url_prefix", "http://uploads.invalid/up"),
    ],
)
def test_request_urls_the_sidecar_cannot_resolve_are_refused_at_submission(
    sidecar: Sidecar, files: SlowServer, forward_proxy: ForwardProxy, field: str, url: str
) -> None:
    body: dict[str, Any] = {"prompt": load(files.url("/files/red.png"))}
    if field == "http_upload.url_prefix":
        body["http_upload"] = {"url_prefix": url}
    else:
        body[field] = url
    assert_refused(sidecar.post("/prompt", json=body), field)
    assert forward_proxy.asked_for(url.split("/")[2]) == []


REFUSED_HOOKS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:{port}/hook",
    "http://localhost:{port}/hook",
    "http://hooks.invalid/hook",
]


def modal_job(url: str) -> tuple[str, dict[str, Any], str]:
    return "/v1/jobs", {"workflow": basic_prompt(1), "webhook_url": url}, "webhook_url"


def aidock_job(url: str) -> tuple[str, dict[str, Any], str]:
    body = {"input": {"workflow_json": basic_prompt(1), "webhook": {"url": url}}}
    return "/generate", body, "input.webhook.url"


@pytest.mark.parametrize("hook_url", REFUSED_HOOKS)
@pytest.mark.parametrize("adapter", [modal_job, aidock_job])
def test_adapter_webhooks_to_refused_urls_are_a_400_at_the_field(
    sidecar: Sidecar,
    metadata: Receiver,
    forward_proxy: ForwardProxy,
    adapter: Any,
    hook_url: str,
) -> None:
    path, body, location = adapter(hook_url.format(port=metadata.server.server_address[1]))
    before = sidecar.get("/jobs", params={"limit": 1000}).json()["jobs"]
    assert_refused(sidecar.post(path, json=body), location)
    assert sidecar.get("/jobs", params={"limit": 1000}).json()["jobs"] == before
    assert metadata.snapshot() == []
    assert [method for method, _ in forward_proxy.requests() if method == "POST"] == []


def test_an_allowed_adapter_webhook_is_posted_through_the_proxy(
    sidecar: Sidecar, hook: Receiver, forward_proxy: ForwardProxy
) -> None:
    path, body, _ = modal_job(hook.url + "/modal")
    accepted = sidecar.post(path, json=body)
    assert accepted.status_code == 200, accepted.text
    [delivered] = hook.wait_for(1, timeout=60)
    assert delivered.json()["job_id"] == accepted.json()["job_id"]
    assert forward_proxy.asked_for(hook.url + "/modal") == [("POST", hook.url + "/modal")]
