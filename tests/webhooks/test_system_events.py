"""System events: filtering, prompt-id rewrite, metadata, ordering, bounded queue under floods."""

from __future__ import annotations

import asyncio
import base64
import random
import uuid
from collections import defaultdict
from typing import Any

from standardwebhooks import Webhook

from comfy_sidecar.net.urls import scrub_url
from comfy_sidecar.webhooks import WebhookDispatcher, rewrite_prompt_ids

from .conftest import Receiver, make_settings

SECRET = base64.b64encode(b"system-secret").decode()


def progress(prompt_id: str, value: int, maximum: int = 20) -> dict[str, Any]:
    return {
        "type": "progress",
        "data": {"value": value, "max": maximum, "prompt_id": prompt_id, "node": "3"},
    }


def test_progress_state_nodes_are_rewritten_and_input_untouched() -> None:
    frame = {
        "type": "progress_state",
        "data": {
            "prompt_id": "comfy-1",
            "nodes": {
                "3": {
                    "value": 5,
                    "max": 20,
                    "state": "running",
                    "node_id": "3",
                    "prompt_id": "comfy-1",
                    "display_node_id": "3",
                },
                "4": {"value": 0, "max": 1, "state": "pending", "prompt_id": "other"},
            },
        },
    }
    ids = {"comfy-1": "api-1"}
    out, key = rewrite_prompt_ids(frame, ids.get)
    assert key == "api-1"
    assert out["type"] == "progress_state"
    assert out["data"]["prompt_id"] == "api-1"
    assert out["data"]["nodes"]["3"]["prompt_id"] == "api-1"
    assert out["data"]["nodes"]["3"]["value"] == 5
    assert out["data"]["nodes"]["4"]["prompt_id"] == "other"  # unknown ids are kept
    assert frame["data"]["prompt_id"] == "comfy-1"
    assert frame["data"]["nodes"]["3"]["prompt_id"] == "comfy-1"


def test_storage_event_urls_are_scrubbed() -> None:
    assert scrub_url("https://user:pw@host.example/a/b.safetensors?x=1") == (
        "https://host.example/a/b.safetensors?x=1"
    )
    stripped = scrub_url("https://acct.blob.core.windows.net/c/m.bin?sv=2022&sig=abc%2B")
    assert "abc" not in stripped and "sig=REDACTED" in stripped and "sv=2022" in stripped
    assert scrub_url("s3://bucket/key.png") == "s3://bucket/key.png"


def test_only_subscribed_events_are_sent_with_metadata(receiver: Any, tmp_path: Any) -> None:
    r: Receiver = receiver()
    settings = make_settings(
        WEBHOOK_SECRET=SECRET,
        SYSTEM_WEBHOOK_URL=r.url + "/system",
        SYSTEM_WEBHOOK_EVENTS="progress,executed,file_downloaded",
        SYSTEM_META_batch="abc",
        SYSTEM_META_Purpose="testing",
        SALAD_MACHINE_ID="m-1",
        SALAD_CONTAINER_GROUP_ID="cg-1",
    )
    ids = {"comfy-1": "api-1"}

    async def go() -> None:
        d = WebhookDispatcher(settings)
        await d.start()
        d.handle_comfy_frame(
            {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}}}, ids.get
        )
        d.handle_comfy_frame(
            {"type": "executing", "data": {"node": "3", "prompt_id": "comfy-1"}}, ids.get
        )
        d.handle_comfy_frame(progress("comfy-1", 1), ids.get)
        d.handle_comfy_frame(
            {"type": "executed", "data": {"node": "9", "output": {}, "prompt_id": "comfy-1"}},
            ids.get,
        )
        d.handle_comfy_frame({"type": "crystools.monitor", "data": {}}, ids.get)
        d.storage_event(
            "file_downloaded",
            {
                "url": "https://u:p@models.example/m.safetensors",
                "local_path": tmp_path / "m",
                "size": 10,
                "duration": 0.5,
                "bytes": b"never sent",
            },
        )
        d.storage_event("file_deleted", {"url": "x", "local_path": "/c/x", "size": 1})
        await d.close(5)

    asyncio.run(go())
    reqs = r.wait_for(3)
    assert len(reqs) == 3
    by_event = {q.json()["event"]: q for q in reqs}
    assert set(by_event) == {"comfy.progress", "comfy.executed", "storage.file_downloaded"}
    for q in reqs:
        assert q.path == "/system"
        body = Webhook(SECRET).verify(q.body, q.headers)
        assert body["metadata"] == {
            "batch": "abc",
            "Purpose": "testing",
            "salad_machine_id": "m-1",
            "salad_container_group_id": "cg-1",
        }
        uuid.UUID(q.headers["webhook-id"])
    assert len({q.headers["webhook-id"] for q in reqs}) == 3
    prog = by_event["comfy.progress"].json()["data"]
    assert prog == {
        "type": "progress",
        "data": {"value": 1, "max": 20, "prompt_id": "api-1", "node": "3"},
    }
    assert by_event["comfy.executed"].json()["data"]["data"]["prompt_id"] == "api-1"
    storage = by_event["storage.file_downloaded"].json()["data"]
    assert storage == {
        "url": "https://models.example/m.safetensors",
        "local_path": str(tmp_path / "m"),
        "size": 10,
        "duration": 0.5,
    }


def test_all_expands_and_no_url_means_nothing_is_sent(receiver: Any) -> None:
    r: Receiver = receiver()
    on = make_settings(SYSTEM_WEBHOOK_URL=r.url, SYSTEM_WEBHOOK_EVENTS="all")
    off = make_settings(SYSTEM_WEBHOOK_EVENTS="all")

    async def go() -> None:
        for settings in (on, off):
            d = WebhookDispatcher(settings)
            await d.start()
            d.handle_comfy_frame(
                {"type": "execution_start", "data": {"prompt_id": "p"}}, lambda _: None
            )
            d.storage_event(
                "file_uploaded",
                {"url": "s3://b/k.png", "local_path": "/o/k.png", "size": 3, "duration": 0.1},
            )
            await d.close(5)

    asyncio.run(go())
    events = sorted(q.json()["event"] for q in r.wait_for(2))
    assert events == ["comfy.execution_start", "storage.file_uploaded"]
    assert len(r.snapshot()) == 2


def test_events_of_one_prompt_arrive_in_order(receiver: Any) -> None:
    rng = random.Random(1)
    r: Receiver = receiver(delay_s=lambda: rng.random() * 0.01)
    settings = make_settings(SYSTEM_WEBHOOK_URL=r.url, SYSTEM_WEBHOOK_EVENTS="all")
    ids = {f"c{i}": f"api{i}" for i in range(4)}

    async def go() -> None:
        d = WebhookDispatcher(settings, system_workers=4)
        await d.start()
        for step in range(15):
            for i in range(4):
                d.handle_comfy_frame(progress(f"c{i}", step), ids.get)
        for i in range(4):
            d.handle_comfy_frame(
                {"type": "execution_success", "data": {"prompt_id": f"c{i}"}}, ids.get
            )
        await d.close(20)
        assert d.dropped == 0

    asyncio.run(go())
    seen: dict[str, list[Any]] = defaultdict(list)
    for q in sorted(r.wait_for(64), key=lambda q: q.t):
        frame = q.json()["data"]
        seen[frame["data"]["prompt_id"]].append(frame["data"].get("value", "done"))
    assert seen == {f"api{i}": [*range(15), "done"] for i in range(4)}


def test_progress_flood_to_slow_receiver_is_bounded(receiver: Any) -> None:
    r: Receiver = receiver(delay_s=0.02)
    settings = make_settings(SYSTEM_WEBHOOK_URL=r.url, SYSTEM_WEBHOOK_EVENTS="all")
    capacity = 50

    async def go() -> tuple[WebhookDispatcher, int, int, int]:
        d = WebhookDispatcher(settings, system_workers=2, system_queue_size=capacity)
        await d.start()
        tasks_at_start = len(asyncio.all_tasks())
        peak = extra_tasks = 0
        for p in range(200):  # 200 prompts x 20 progress ticks
            for step in range(20):
                d.handle_comfy_frame(progress(f"c{p}", step), lambda cid: "api-" + cid)
                peak = max(peak, d.pending["system"])
            extra_tasks = max(extra_tasks, len(asyncio.all_tasks()) - tasks_at_start)
            await asyncio.sleep(0)  # one loop turn per prompt, as frames arrive from a socket
        # the queue is full of progress ticks: a terminal event still gets in
        d.handle_comfy_frame(
            {"type": "execution_success", "data": {"prompt_id": "c199"}}, lambda cid: "api-" + cid
        )
        peak = max(peak, d.pending["system"])
        await d.close(0.3)
        return d, peak, extra_tasks, len(asyncio.all_tasks())

    d, peak, extra_tasks, tasks_after = asyncio.run(go())
    assert peak <= capacity
    assert extra_tasks <= 2  # at most the transient per-request tasks of httpx; no growth
    assert d.dropped >= 4000 - capacity - 200
    assert (
        d.counters["dropped"]
        + d.counters["delivered"]
        + d.counters["abandoned"]
        + d.counters["failed"]
        == 4001
    )
    assert tasks_after == 1  # only the running test coroutine
    assert d.counters["abandoned"] >= 1  # the slow receiver could not drain within grace
