"""The SSRF guard (comfy_sidecar.storage.netguard): what it refuses by default, what the operator's
settings open, and that storage fetches nothing it refused (redirect hops included)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from comfy_sidecar.config import load_settings
from comfy_sidecar.errors import InputError
from comfy_sidecar.schemas import HTTPUpload, PromptOptions
from comfy_sidecar.storage import Storage, URLRefused
from comfy_sidecar.storage.netguard import NetGuard, address_problem, proxy_for, trusted
from tests.storage.servers import FileServer

SIDECAR_PORT, COMFY_PORT = 3999, 8999


def guard(**env: str) -> NetGuard:
    base = {"HOME": "/tmp", "PORT": str(SIDECAR_PORT), "COMFYUI_PORT_HOST": str(COMFY_PORT)}
    return NetGuard(load_settings({**base, **env}))


def refused(g: NetGuard, url: str) -> str:
    with pytest.raises(URLRefused) as info:
        asyncio.run(g.check_url(url))
    return str(info.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[::1]:8080/", "loopback"),
        ("http://0.0.0.0:8080/", "unspecified"),
        ("http://localhost:8080/", "loopback"),
        ("http://127.1:8080/", "loopback"),
        ("http://2130706433:8080/", "loopback"),
        ("http://0x7f.1:8080/", "loopback"),
        ("http://10.1.2.3/", "private"),
        ("http://192.168.0.1/", "private"),
        ("http://[fd00::1]/", "private"),
        ("http://100.64.0.1/", "shared address space"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://[2002:a9fe:a9fe::1]/", "link-local"),  # 6to4 of 169.254.169.254
        ("http://[64:ff9b::7f00:1]/", "loopback"),  # NAT64 of 127.0.0.1
    ],
)
def test_refused_by_default(url: str, reason: str) -> None:
    assert reason in refused(guard(), url)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1:70/_x", "ftp://h/x"])
def test_only_http_https_s3_schemes(url: str) -> None:
    assert "scheme" in refused(guard(), url)


def test_public_addresses_and_s3_pass() -> None:
    g = guard()
    asyncio.run(g.check_url("http://93.184.216.34/x.png"))
    asyncio.run(g.check_url("https://[2606:4700::1111]/x"))
    asyncio.run(g.check_url("s3://bucket/key.png"))
    assert address_problem(ipaddress.ip_address("8.8.8.8")) is None


def test_operator_allow_list_and_allow_private() -> None:
    by_cidr = guard(ALLOWED_URL_HOSTS="10.0.0.0/8")
    asyncio.run(by_cidr.check_url("http://10.9.9.9/x"))
    assert "private" in refused(by_cidr, "http://192.168.1.1/x")
    by_name = guard(ALLOWED_URL_HOSTS="local*")
    asyncio.run(by_name.check_url("http://localhost:8080/x"))
    everything = guard(ALLOW_PRIVATE_URLS="true")
    asyncio.run(everything.check_url("http://127.0.0.1:8080/x"))
    asyncio.run(everything.check_url("http://169.254.169.254/x"))


def test_own_and_comfyui_ports_refused_even_when_allowed() -> None:
    g = guard(ALLOW_PRIVATE_URLS="true", ALLOWED_URL_HOSTS="127.0.0.0/8,localhost")
    assert "sidecar's own port" in refused(g, f"http://127.0.0.1:{SIDECAR_PORT}/ready")
    assert "sidecar's own port" in refused(g, f"http://localhost:{SIDECAR_PORT}/ready")
    assert "ComfyUI's port" in refused(g, f"http://127.1:{COMFY_PORT}/system_stats")
    assert "ComfyUI's port" in refused(g, f"http://[::ffff:127.0.0.1]:{COMFY_PORT}/")
    assert "ComfyUI's port" in refused(g, f"http://0.0.0.0:{COMFY_PORT}/")


def test_trusted_operator_urls_bypass() -> None:
    g = guard()

    async def main() -> None:
        with trusted():
            await g.check_url("http://127.0.0.1:8080/manifest-model.bin")

    asyncio.run(main())


def test_proxy_for_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    assert proxy_for("http", "example.com") is None
    monkeypatch.setenv("HTTP_PROXY", "proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "internal.corp,10.1.2.3")
    assert proxy_for("http", "example.com") == "http://proxy.corp:3128"
    assert proxy_for("https", "example.com") is None
    assert proxy_for("http", "files.internal.corp") is None
    assert proxy_for("http", "10.1.2.3") is None
    monkeypatch.setenv("ALL_PROXY", "http://all.corp:8080")
    assert proxy_for("https", "example.com") == "http://all.corp:8080"


def test_through_a_proxy_a_name_that_does_not_resolve_here_needs_the_allow_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "direct.invalid")
    g = guard(ALLOWED_URL_HOSTS="*.proxy-only.invalid")
    reason = refused(g, "http://metadata.invalid/latest/meta-data/")
    assert "does not resolve here" in reason and "ALLOWED_URL_HOSTS" in reason
    asyncio.run(g.check_url("http://files.proxy-only.invalid/x.png"))  # the proxy resolves it
    asyncio.run(g.check_url("http://direct.invalid/x.png"))  # no proxy: nothing to reach
    # What does resolve here is checked by its addresses, through the proxy too.
    assert "loopback" in refused(g, "http://localhost:8080/x")
    assert "link-local" in refused(g, "http://169.254.169.254/x")
    assert "loopback" in refused(g, "http://0x7f.1:8080/x")
    asyncio.run(g.check_url("http://93.184.216.34/x.png"))


def test_request_fields_name_their_location() -> None:
    storage = Storage(load_settings({"HOME": "/tmp"}))

    def location(**fields: object) -> str:
        with pytest.raises(InputError) as info:
            asyncio.run(storage.check_request(PromptOptions(**fields)))  # type: ignore[arg-type]
        return info.value.location

    assert location(webhook="ftp://example.com/hook") == "webhook"
    assert location(webhook_v2="not a url") == "webhook_v2"
    assert location(webhook_v2="http://169.254.169.254/hook") == "webhook_v2"
    assert location(http_upload=HTTPUpload(url_prefix="http://[::1]:9/up")) == (
        "http_upload.url_prefix"
    )


# --- through the storage facade, against a loopback file server ------------------------


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    server = FileServer()
    server.files["x.bin"] = b"secret"
    yield server
    server.stop()


def storage_for(tmp_path: Path, **env: str) -> Storage:
    return Storage(load_settings({"HOME": str(tmp_path), "CACHE_DIR": str(tmp_path / "c"), **env}))


def fetch_refused(storage: Storage, url: str) -> str:
    async def main() -> str:
        await storage.start()
        try:
            with pytest.raises(URLRefused) as info:
                await storage.fetch(url, None)
            return str(info.value)
        finally:
            await storage.close()

    return asyncio.run(main())


def test_loopback_file_server_not_fetched(files: FileServer, tmp_path: Path) -> None:
    before = files.count("GET", "/files/x.bin")
    for host in ("127.0.0.1", "localhost", "[::1]", "127.1", "2130706433"):
        url = f"http://{host}:{files.port}/files/x.bin"
        assert "URL refused" in fetch_refused(storage_for(tmp_path), url), host
    assert files.count("GET", "/files/x.bin") == before


@pytest.mark.parametrize(
    "target",
    ["http://169.254.169.254/latest/meta-data/", "gopher://127.0.0.1:70/_x", "ftp://h/x"],
)
def test_redirect_hops_are_checked(files: FileServer, tmp_path: Path, target: str) -> None:
    storage = storage_for(tmp_path, ALLOWED_URL_HOSTS="127.0.0.1")
    url = files.url(f"/redirect?to={quote(target, safe='')}")
    assert "URL refused" in fetch_refused(storage, url)


def test_allowed_loopback_server_is_fetched(files: FileServer, tmp_path: Path) -> None:
    storage = storage_for(tmp_path, ALLOWED_URL_HOSTS="127.0.0.1")

    async def main() -> bytes:
        await storage.start()
        try:
            return (await storage.fetch(files.url("/files/x.bin"), None)).read_bytes()
        finally:
            await storage.close()

    assert asyncio.run(main()) == b"secret"
