"""EventStream against a small real websocket server on loopback that replays the frames a real
ComfyUI sent (tests/transcripts): order, reconnects, and the disconnect/reconnect callbacks the
job registry relies on to reconcile jobs whose frames may have been lost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve

from comfy_sidecar.comfy.events import EventStream
from tests.transcripts import ws_frames
from tests.waiting import async_wait_for


class ReplayServer:
    """Serves ``/ws``: connection N replays ``scripts[N]`` (frames as JSON text, with a binary
    preview and a non-JSON line mixed in, which the stream must skip), then closes it (a drop)
    unless it is the last script, which stays open."""

    def __init__(self, scripts: list[list[dict[str, Any]]]) -> None:
        self.scripts = scripts
        self.paths: list[str] = []
        self.server: Server | None = None
        self.port = 0

    async def handler(self, conn: ServerConnection) -> None:
        index = len(self.paths)
        assert conn.request is not None
        self.paths.append(conn.request.path)
        frames = self.scripts[min(index, len(self.scripts) - 1)]
        await conn.send(b"\x00\x00\x00\x01binary preview")
        await conn.send("not json")
        for frame in frames:
            await conn.send(json.dumps(frame))
        if index < len(self.scripts) - 1:
            await conn.close()  # the drop
        else:
            await conn.wait_closed()

    async def start(self, port: int = 0) -> str:
        self.server = await serve(self.handler, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1] if port == 0 else port
        return f"ws://127.0.0.1:{self.port}/ws"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


class Recorder:
    """The three callbacks, recorded."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.connects: list[bool] = []
        self.disconnects = 0

    def on_frame(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)

    async def on_connect(self, reconnected: bool) -> None:
        self.connects.append(reconnected)

    def on_disconnect(self) -> None:
        self.disconnects += 1

    def stream(self, url: str, **kw: Any) -> EventStream:
        return EventStream(
            url, "client-1", self.on_frame, self.on_connect, self.on_disconnect, **kw
        )


async def with_stream(stream: EventStream, body: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(stream.run())
    try:
        await body()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_frames_arrive_in_order_with_the_client_id() -> None:
    frames = ws_frames("success_basic")

    async def scenario() -> None:
        server = ReplayServer([frames])
        url = await server.start()
        rec = Recorder()
        stream = rec.stream(url)

        async def body() -> None:
            assert await stream.wait_connected(5)
            await async_wait_for(
                lambda: len(rec.frames) >= len(frames), timeout=5, what="every frame"
            )
            assert rec.frames == frames  # binary and non-JSON frames skipped
            assert server.paths == ["/ws?clientId=client-1"]
            assert rec.connects == [False] and rec.disconnects == 0
            last_status = [f for f in frames if f["type"] == "status"][-1]
            expected = last_status["data"]["status"]["exec_info"]["queue_remaining"]
            assert stream.queue_remaining == expected

        try:
            await with_stream(stream, body)
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_a_dropped_socket_reports_the_loss_and_reconnects() -> None:
    first, second = ws_frames("success_basic"), ws_frames("interrupt_running")

    async def scenario() -> None:
        server = ReplayServer([first, second])
        url = await server.start()
        rec = Recorder()
        stream = rec.stream(url)

        async def body() -> None:
            await async_wait_for(
                lambda: len(rec.frames) >= len(first) + len(second),
                timeout=5,
                what="the frames of both connections",
            )
            assert rec.frames == first + second
            # The loss is reported (jobs may have missed frames), then the reconnect, so the
            # jobs in flight get reconciled.
            assert rec.disconnects == 1
            assert rec.connects == [False, True]
            assert stream.connections == 2 and stream.connected

        try:
            await with_stream(stream, body)
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_reconnects_when_comfyui_comes_back() -> None:
    frames = ws_frames("success_basic")

    async def scenario() -> None:
        server = ReplayServer([frames])
        url = await server.start()
        rec = Recorder()
        stream = rec.stream(url, backoff_s=0.01, max_backoff_s=0.05)

        async def body() -> None:
            assert await stream.wait_connected(5)
            await server.stop()  # ComfyUI goes away: connection refused for a while
            await async_wait_for(lambda: not stream.connected, timeout=5, what="the loss")
            assert rec.disconnects == 1
            assert not await stream.wait_connected(0.2)
            again = ReplayServer([frames])
            await again.start(server.port)
            try:
                assert await stream.wait_connected(5)
                assert rec.connects == [False, True]
            finally:
                await again.stop()

        await with_stream(stream, body)

    asyncio.run(scenario())


def test_a_failing_frame_handler_does_not_stop_the_stream() -> None:
    frames = ws_frames("success_basic")

    async def scenario() -> None:
        server = ReplayServer([frames])
        url = await server.start()
        seen: list[str] = []

        def on_frame(frame: dict[str, Any]) -> None:
            seen.append(frame["type"])
            raise RuntimeError("a broken listener")

        async def on_connect(reconnected: bool) -> None:
            return None

        stream = EventStream(url, "c", on_frame, on_connect, lambda: None)

        async def body() -> None:
            await async_wait_for(lambda: len(seen) >= len(frames), timeout=5, what="frames")
            assert seen == [f["type"] for f in frames]
            assert stream.connections == 1

        try:
            await with_stream(stream, body)
        finally:
            await server.stop()

    asyncio.run(scenario())
