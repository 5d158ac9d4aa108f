"""Prompt webhooks go through the SSRF guard at delivery (a refused address is given up at
once, never retried) and their URLs are logged scrubbed: no user:password, no ?token=."""

from __future__ import annotations

import asyncio
import logging

import pytest

from comfy_sidecar.webhooks import WebhookDispatcher, v2_failed_body

from .conftest import make_settings


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
