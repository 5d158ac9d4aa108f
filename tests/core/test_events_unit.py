"""EventStream against a small real websocket server on loopback that replays the frames a real
ComfyUI sent (tests/transcripts): order, reconnects, and the disconnect/reconnect callbacks the
job registry relies on to reconcile jobs whose frames may have been lost."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
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


class FrozenServer:
    """Accepts websocket handshakes, then never sends or answers anything (a ComfyUI stopped
    with SIGSTOP after the upgrade: no frame, no pong)."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + self.GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        await writer.drain()
        while await reader.read(65536):  # pings and the close frame go unanswered
            pass
        writer.close()


def test_a_socket_whose_pongs_stop_is_dropped_and_the_drop_is_no_sign_of_life() -> None:
    """The keepalive drops a socket that stopped answering pings; the drop itself does not
    move ``last_frame_at``, which the hang check reads as ComfyUI's last sign of life."""

    async def scenario() -> None:
        frozen = FrozenServer()
        server = await asyncio.start_server(frozen.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        stream = rec.stream(f"ws://127.0.0.1:{port}/ws", ping_interval_s=0.2, backoff_s=30)

        async def body() -> None:
            assert await stream.wait_connected(5)
            connected_at = stream.last_frame_at
            started = time.monotonic()
            await async_wait_for(lambda: rec.disconnects == 1, timeout=5, what="the drop")
            assert time.monotonic() - started < 2  # ping after 0.2 s, pong awaited 0.1 s
            assert not stream.connected
            assert stream.last_frame_at == connected_at
            assert rec.frames == []

        try:
            await with_stream(stream, body)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
