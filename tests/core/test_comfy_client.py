"""The HTTP client to ComfyUI: its errors, its own timeouts, and no proxy on the loopback
connection (issue #13 finding 6), for HTTP and for the websocket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from comfy_sidecar.comfy.client import ComfyClient, ComfyUnavailable, PromptRejected
from tests.conftest import Backend, Sidecar, basic_prompt, free_port

Answer = Callable[[bytes], Awaitable[bytes | None]]


async def serve(answer: Answer) -> tuple[asyncio.Server, str]:
    """A one-request-per-connection HTTP server on loopback whose reply to each request
    (head and body bytes) is ``answer(request)``; ``None`` never replies."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        reply = await answer(request)
        if reply is None:
            await asyncio.sleep(3600)
            return
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def reply(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def with_server(answer: Answer, check: Callable[[ComfyClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        server, url = await serve(answer)
        client = ComfyClient(url, timeout_s=0.5)
        try:
            return await check(client)
        finally:
            await client.aclose()
            server.close()

    return asyncio.run(main())


def test_refused_connection_is_comfy_unavailable() -> None:
    async def main() -> None:
        client = ComfyClient(f"http://127.0.0.1:{free_port()}")
        try:
            assert await client.ping() is False
            with pytest.raises(ComfyUnavailable, match="POST /prompt"):
                await client.queue_prompt(basic_prompt(), "p", "c")
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_silent_comfyui_times_out_as_unavailable() -> None:
    async def silent(request: bytes) -> None:
        return None

    async def check(client: ComfyClient) -> float:
        started = time.monotonic()
        with pytest.raises(ComfyUnavailable, match="GET /queue"):
            await client.queue()
        return time.monotonic() - started

    assert with_server(silent, check) < 5


def test_control_calls_have_a_short_timeout_of_their_own() -> None:
    """A frozen ComfyUI holds /interrupt, /queue and the lookups for call_timeout_s, not for
    the long POST /prompt timeout (issue 13, finding 8)."""

    async def silent(request: bytes) -> None:
        return None

    async def main() -> list[float]:
        server, url = await serve(silent)
        client = ComfyClient(url, timeout_s=60, call_timeout_s=0.5)
        took: list[float] = []
        try:
            for call in (
                lambda: client.interrupt("p"),
                lambda: client.delete_pending(["p"]),
                lambda: client.history("p"),
                client.free,
                client.system_stats,
            ):
                started = time.monotonic()
                with pytest.raises(ComfyUnavailable):
                    await call()
                took.append(time.monotonic() - started)
        finally:
            await client.aclose()
            server.close()
        return took

    assert max(asyncio.run(main())) < 10


def test_a_5xx_is_unavailable_and_a_400_is_rejected_with_the_body() -> None:
    async def answer(request: bytes) -> bytes:
        if request.startswith(b"GET"):
            return reply("502 Bad Gateway", b"")
        assert b'"prompt_id":"p1"' in request and b'"client_id":"c1"' in request
        return reply("400 Bad Request", b'{"error": {"type": "x"}, "node_errors": {}}')

    async def check(client: ComfyClient) -> None:
        with pytest.raises(ComfyUnavailable, match="HTTP 502"):
            await client.get_json("/models")
        with pytest.raises(PromptRejected) as rejected:
            await client.queue_prompt(basic_prompt(), "p1", "c1")
        assert rejected.value.body == {"error": {"type": "x"}, "node_errors": {}}

    with_server(answer, check)


def test_a_400_that_is_not_json_keeps_its_text_and_404_is_none() -> None:
    async def answer(request: bytes) -> bytes:
        if request.startswith(b"GET"):
            return reply("404 Not Found", b"")
        return reply("400 Bad Request", b"not json \xff")

    async def check(client: ComfyClient) -> None:
        assert await client.get_json("/models/nope") is None
        with pytest.raises(PromptRejected) as rejected:
            await client.queue_prompt(basic_prompt(), "p", "c")
        assert rejected.value.body["error"]["message"].startswith("not json")

    with_server(answer, check)


def test_a_200_with_node_errors_is_rejected() -> None:
    async def answer(request: bytes) -> bytes:
        body = b'{"prompt_id": "p", "number": 1, "node_errors": {"3": {"errors": []}}}'
        return reply("200 OK", body)

    async def check(client: ComfyClient) -> None:
        with pytest.raises(PromptRejected) as rejected:
            await client.queue_prompt(basic_prompt(), "p", "c")
        assert rejected.value.body["node_errors"] == {"3": {"errors": []}}

    with_server(answer, check)


def test_a_dead_proxy_in_the_environment_does_not_touch_comfyui(spawn: Any, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proxies = {name: dead for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    proxies |= {name.lower(): dead for name in proxies}
    sidecar: Sidecar = spawn(
        Backend("double", tmp_path / "comfy"), NO_PROXY="", no_proxy="", **proxies
    )
    sidecar.wait_ready()
    answer = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 1
