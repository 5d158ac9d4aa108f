"""Prompt webhooks go through the SSRF guard at delivery (a refused address is given up at
once, never retried; behind a forward proxy, a real tinyproxy, it is never handed to the proxy)
and their URLs are logged scrubbed: no user:password, no ?token=."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from comfy_sidecar.webhooks import WebhookDispatcher, v2_failed_body
from tests.forward_proxy import ForwardProxy, forward_proxy
from tests.receiver import Receiver

from .conftest import make_settings

__all__ = ["forward_proxy"]  # the fixture, used by name


def deliver(url: str, **env: str) -> tuple[bool, dict[str, int]]:
    settings = make_settings(PROMPT_WEBHOOK_RETRIES="2", **env)

    async def go() -> tuple[bool, dict[str, int]]:
        d = WebhookDispatcher(settings, backoff_base_s=0.05)
        await d.start()
        fut = await d.send_prompt(url, v2_failed_body(id="j", prompt={}, error="x"), "j")
        ok = await asyncio.wait_for(fut, 10)
        await d.close(1)
        return ok, d.counters

    return asyncio.run(go())


def test_refused_address_is_not_contacted_nor_retried(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="comfy_sidecar.webhooks"):
        ok, counters = deliver("http://169.254.169.254/hook", ALLOWED_URL_HOSTS="")
    assert not ok
    assert counters["attempts"] == 1
    assert "link-local" in caplog.text


def test_webhook_urls_are_logged_scrubbed(
    refused_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = refused_url.replace("http://", "http://alice:hunter2@") + "/hook?token=s3cr3t&x=1"
    with caplog.at_level(logging.WARNING, logger="comfy_sidecar.webhooks"):
        ok, _ = deliver(url)
    assert not ok
    assert "attempt 1/2 failed" in caplog.text
    assert "hunter2" not in caplog.text and "alice" not in caplog.text
    assert "s3cr3t" not in caplog.text
    assert "token=REDACTED&x=1" in caplog.text


def test_behind_a_proxy_a_refused_webhook_is_never_posted(
    forward_proxy: ForwardProxy,
    receiver: Callable[..., Receiver],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name, value in forward_proxy.env().items():
        monkeypatch.setenv(name, value)
    metadata = receiver()  # 127.0.0.1: stands in for the metadata service
    allowed = receiver(host="127.0.0.2")
    port = metadata.server.server_address[1]
    for url in (metadata.url + "/latest/meta-data/", f"http://localhost:{port}/x"):
        with caplog.at_level(logging.ERROR, logger="comfy_sidecar.webhooks"):
            ok, counters = deliver(url, ALLOWED_URL_HOSTS="127.0.0.2/32")
        assert not ok and counters["attempts"] == 1
        assert "loopback" in caplog.text
    assert metadata.snapshot() == []
    assert [r for r in forward_proxy.requests() if r[0] == "POST"] == []

    ok, _ = deliver(allowed.url + "/hook", ALLOWED_URL_HOSTS="127.0.0.2/32")
    assert ok
    assert forward_proxy.asked_for(allowed.url) == [("POST", allowed.url + "/hook")]


def test_behind_a_proxy_the_system_webhook_stays_trusted(
    forward_proxy: ForwardProxy, receiver: Callable[..., Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in forward_proxy.env().items():
        monkeypatch.setenv(name, value)
    system = receiver()  # loopback: refused for a caller, but SYSTEM_WEBHOOK_URL is the operator's
    settings = make_settings(ALLOWED_URL_HOSTS="", SYSTEM_WEBHOOK_URL=system.url + "/events")

    async def go() -> None:
        d = WebhookDispatcher(settings)
        await d.start()
        assert d.emit_system("storage.file_deleted", {"url": "x"})
        await d.close(10)

    asyncio.run(go())
    [event] = system.wait_for(1)
    assert event.json()["event"] == "storage.file_deleted"
    assert forward_proxy.asked_for(system.url) == [("POST", system.url + "/events")]
