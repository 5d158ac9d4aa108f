"""Delivery: retries with growing delays, timeouts, refused connections, bounds, shutdown."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest
from standardwebhooks import Webhook

from comfy_sidecar.config import ConfigError
from comfy_sidecar.webhooks import WebhookDispatcher, v2_complete_body, v2_failed_body

from .conftest import Receiver, make_settings

SECRET = base64.b64encode(b"0123456789abcdef0123").decode()
RESULT = {"id": "job", "prompt": {}, "images": [], "filenames": [], "stats": {}}


def test_fails_twice_then_succeeds_with_growing_delays(receiver: Any) -> None:
    r: Receiver = receiver(statuses=[500, 503])
    settings = make_settings(WEBHOOK_SECRET=SECRET, PROMPT_WEBHOOK_RETRIES="3")

    async def go() -> tuple[bool, dict[str, int]]:
        d = WebhookDispatcher(settings, backoff_base_s=0.3)
        await d.start()
        fut = await d.send_prompt(r.url, v2_complete_body(RESULT), "job")
        ok = await asyncio.wait_for(fut, 10)
        await d.close(1)
        return ok, d.counters

    ok, counters = asyncio.run(go())
    assert ok
    reqs = r.wait_for(3)
    assert len(reqs) == 3
    assert {q.headers["webhook-id"] for q in reqs} == {"job"}
    assert len({q.body for q in reqs}) == 1  # same body bytes on every attempt
    for q in reqs:
        Webhook(SECRET).verify(q.body, q.headers)  # each attempt is signed (fresh timestamp)
    gap1, gap2 = reqs[1].t - reqs[0].t, reqs[2].t - reqs[1].t
    assert 0.225 <= gap1 < gap2  # base 0.3 s x [0.75, 1], then 0.6 s x [0.75, 1]
    assert counters["delivered"] == 1 and counters["attempts"] == 3 and counters["failed"] == 0


def test_receiver_that_never_answers_times_out_with_bounded_attempts(receiver: Any) -> None:
    r: Receiver = receiver(hang=True)
    settings = make_settings(PROMPT_WEBHOOK_RETRIES="2", WEBHOOK_TIMEOUT_S="0.3")

    async def go() -> tuple[bool, float, dict[str, int]]:
        d = WebhookDispatcher(settings, backoff_base_s=0.05)
        await d.start()
        t0 = time.monotonic()
        fut = await d.send_prompt(r.url, v2_complete_body(RESULT), "job")
        assert time.monotonic() - t0 < 0.1  # queuing never waits for the receiver
        ok = await asyncio.wait_for(fut, 5)
        elapsed = time.monotonic() - t0
        await d.close(1)
        return ok, elapsed, d.counters

    ok, elapsed, counters = asyncio.run(go())
    assert not ok
    assert len(r.snapshot()) == 2
    assert 0.6 <= elapsed < 2.0
    assert counters["failed"] == 1 and counters["attempts"] == 2


def test_close_returns_within_grace_when_receiver_hangs(receiver: Any) -> None:
    r: Receiver = receiver(hang=True)
    settings = make_settings(PROMPT_WEBHOOK_RETRIES="5", WEBHOOK_TIMEOUT_S="30")

    async def go() -> tuple[float, list[bool], dict[str, int], int]:
        tasks_before = len(asyncio.all_tasks())
        d = WebhookDispatcher(settings, prompt_workers=2)
        await d.start()
        futs = [await d.send_prompt(r.url, v2_complete_body(RESULT), f"j{i}") for i in range(5)]
        await asyncio.to_thread(r.wait_for, 2)
        t0 = time.monotonic()
        await d.close(0.5)
        took = time.monotonic() - t0
        results = [f.result() for f in futs]  # all resolved by close()
        return took, results, d.counters, len(asyncio.all_tasks()) - tasks_before

    took, results, counters, extra_tasks = asyncio.run(go())
    assert 0.5 <= took < 1.5
    assert results == [False] * 5
    assert counters["abandoned"] == 5
    assert extra_tasks == 0


def test_connection_refused_is_retried_then_given_up(refused_url: str) -> None:
    settings = make_settings(PROMPT_WEBHOOK_RETRIES="3")

    async def go() -> tuple[bool, dict[str, int]]:
        d = WebhookDispatcher(settings, backoff_base_s=0.05)
        await d.start()
        fut = await d.send_prompt(refused_url, v2_failed_body(id="j", prompt={}, error="x"), "j")
        ok = await asyncio.wait_for(fut, 5)
        await d.close(1)
        return ok, d.counters

    ok, counters = asyncio.run(go())
    assert not ok
    assert counters["attempts"] == 3 and counters["failed"] == 1


def test_prompt_webhooks_are_never_dropped(receiver: Any) -> None:
    r: Receiver = receiver(delay_s=0.03)
    settings = make_settings()

    async def go() -> tuple[list[bool], int, WebhookDispatcher]:
        d = WebhookDispatcher(settings, prompt_workers=1, prompt_queue_size=2)
        await d.start()
        peak = 0

        async def one(i: int) -> bool:
            nonlocal peak
            fut = await d.send_prompt(r.url, {"id": f"j{i}"}, f"j{i}")
            peak = max(peak, d.pending["prompt"])
            return await fut

        results = await asyncio.gather(*(one(i) for i in range(12)))
        await d.close(1)
        return list(results), peak, d

    results, peak, d = asyncio.run(go())
    assert results == [True] * 12
    assert peak <= 2
    assert sorted(q.json()["id"] for q in r.snapshot()) == sorted(f"j{i}" for i in range(12))
    assert d.dropped == 0 and d.counters["delivered"] == 12


def test_close_flushes_queued_prompt_webhooks(receiver: Any) -> None:
    r: Receiver = receiver(delay_s=0.02)

    async def go() -> list[bool]:
        d = WebhookDispatcher(make_settings(), prompt_workers=1)
        await d.start()
        futs = [await d.send_prompt(r.url, {"n": i}, f"j{i}") for i in range(10)]
        await d.close(5)
        return [f.result() for f in futs]

    assert asyncio.run(go()) == [True] * 10
    assert len(r.snapshot()) == 10


def test_non_http_url_is_not_sent() -> None:
    async def go() -> bool:
        d = WebhookDispatcher(make_settings())
        await d.start()
        fut = await d.send_prompt("ftp://example.com/x", {"a": 1}, "j")
        await d.close(1)
        return fut.result()

    assert asyncio.run(go()) is False


def test_send_before_start_raises_and_after_close_is_abandoned() -> None:
    """Before start() it is a programming error; after close() (a job that ended after the
    shutdown's flush) the delivery is abandoned like one still queued at close: its future
    says False, the counter says so, and the caller is not made to fail."""

    async def go() -> tuple[bool, int]:
        d = WebhookDispatcher(make_settings())
        with pytest.raises(RuntimeError):
            await d.send_prompt("http://127.0.0.1:9/x", {"a": 1}, "j")
        await d.start()
        await d.close(0)
        future = await d.send_prompt("http://127.0.0.1:9/x", {"a": 1}, "j")
        return future.result(), d.counters["abandoned"]

    assert asyncio.run(go()) == (False, 1)


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="PROMPT_WEBHOOK_RETRIES"):
        make_settings(PROMPT_WEBHOOK_RETRIES="0")
    with pytest.raises(ConfigError, match=r"SYSTEM_WEBHOOK_EVENTS.*'progres'"):
        make_settings(SYSTEM_WEBHOOK_EVENTS="progress,progres")
    with pytest.raises(ConfigError, match="SYSTEM_WEBHOOK_URL"):
        make_settings(SYSTEM_WEBHOOK_URL="ftp://x/y")
    assert make_settings(SYSTEM_WEBHOOK_EVENTS=" progress , executed ").system_webhook_events == [
        "progress",
        "executed",
    ]


def test_outputs_of_one_job_keep_their_order(receiver: Any) -> None:
    import random

    rng = random.Random(3)
    r: Receiver = receiver(delay_s=lambda: rng.random() * 0.02)

    async def go() -> None:
        d = WebhookDispatcher(make_settings(), prompt_workers=4)
        await d.start()
        for job in ("a", "b"):
            for n in range(6):
                await d.send_prompt(r.url, {"job": job, "n": n}, f"{job}:{n}", order_key=job)
        await d.close(10)

    asyncio.run(go())
    reqs = sorted(r.wait_for(12), key=lambda q: q.t)
    for job in ("a", "b"):
        got = [(q.headers["webhook-id"], q.json()["n"]) for q in reqs if q.json()["job"] == job]
        assert got == [(f"{job}:{n}", n) for n in range(6)]
