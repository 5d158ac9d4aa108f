"""The one websocket to ComfyUI: connect, read frames, reconnect with backoff.

One connection per sidecar, opened with the sidecar's ``client_id`` before anything is queued, so
every per-prompt frame of our prompts reaches it (ComfyUI routes them by ``client_id``). Text frames
are decoded and handed to ``on_frame`` in order; binary frames (previews) are ignored. After a
reconnect ``on_connect`` runs so in-flight prompts can be reconciled through ``/history``. The
connection never goes through a proxy, whatever HTTP(S)_PROXY says (ComfyUI is on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from comfy_sidecar.net.backoff import backoff_delay

log = logging.getLogger("comfy_sidecar.events")

FrameHandler = Callable[[dict[str, Any]], None]

#: Sent first on every connection: ComfyUI then sends previews as type 4 frames, which carry
#: the prompt_id and node id (``PREVIEW_IMAGE_WITH_METADATA``).
FEATURE_FLAGS = msgspec.json.encode(
    {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
).decode()

IMAGE_TYPES = {1: "image/jpeg", 2: "image/png"}


@dataclass(frozen=True, slots=True)
class Preview:
    """A decoded preview frame: the image bytes, its MIME type, and (type 4 frames) the
    prompt_id and node id it belongs to."""

    image: bytes
    mime_type: str
    prompt_id: str | None = None
    node_id: str | None = None


PreviewHandler = Callable[[Preview], None]


def decode_preview(frame: bytes) -> Preview | None:
    """A ComfyUI binary frame as a :class:`Preview`, or None for other binary events.

    Type 1 (``PREVIEW_IMAGE``): a 4-byte big-endian format (1 JPEG, 2 PNG), then the image.
    Type 4 (``PREVIEW_IMAGE_WITH_METADATA``): a 4-byte JSON length, the JSON (``prompt_id``,
    ``node_id``, ``display_node_id``, ``image_type``), then the image. Malformed frames give
    None."""
    if len(frame) < 8:
        return None
    kind = int.from_bytes(frame[:4], "big")
    if kind == 1:
        mime = IMAGE_TYPES.get(int.from_bytes(frame[4:8], "big"), "application/octet-stream")
        return Preview(frame[8:], mime)
    if kind == 4:
        length = int.from_bytes(frame[4:8], "big")
        try:
            meta = msgspec.json.decode(frame[8 : 8 + length])
        except msgspec.DecodeError:
            return None
        if not isinstance(meta, dict):
            return None
        node = meta.get("display_node_id") or meta.get("node_id")
        return Preview(
            frame[8 + length :],
            str(meta.get("image_type") or "image/png"),
            str(meta["prompt_id"]) if meta.get("prompt_id") else None,
            str(node) if node is not None else None,
        )
    return None


class EventStream:
    """Keeps one websocket to ``ws_url?clientId=<client_id>`` open while :meth:`run` runs.

    Attributes: ``connected`` (bool), ``queue_remaining`` (int, from the last ``status`` frame:
    ComfyUI's pending + running count), ``last_frame_at`` (``time.monotonic()`` seconds).
    Reconnects wait ``backoff_s`` seconds, doubling after each failure up to ``max_backoff_s``.
    The socket's own keepalive (aiohttp's heartbeat) pings after ``ping_interval_s`` seconds
    without a frame and drops the connection when the pong takes longer than half of that
    (None: no keepalive).
    """

    def __init__(
        self,
        ws_url: str,
        client_id: str,
        on_frame: FrameHandler,
        on_connect: Callable[[bool], Awaitable[None]],
        on_disconnect: Callable[[], None],
        *,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        on_preview: PreviewHandler | None = None,
        ping_interval_s: float | None = 20.0,
    ) -> None:
        self._url = f"{ws_url}?clientId={client_id}"
        self._on_preview = on_preview
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._ping_interval_s = ping_interval_s
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._on_frame = on_frame
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._connected_event = asyncio.Event()
        self._kick = asyncio.Event()
        self._decoder = msgspec.json.Decoder()
        self.connected = False
        self.queue_remaining = 0
        self.last_frame_at = time.monotonic()
        self.connections = 0

    def connect_now(self) -> None:
        """Skip the reconnect backoff: ComfyUI was just seen answering, so the next connect
        attempt starts at once (no effect while connected)."""
        if not self.connected:
            self._kick.set()

    async def reconnect(self) -> None:
        """Close the current socket (a stale one: open but silent) and open a new one at once;
        ``on_disconnect`` then ``on_connect(True)`` run as after any drop."""
        ws = self._ws
        if ws is None:
            return
        self._kick.set()
        await ws.close()

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected; False after ``timeout_s`` seconds."""
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Connect and read until cancelled, reconnecting with backoff (``backoff_s`` doubling
        to ``max_backoff_s``)."""
        failures = 0  # since the last successful connect
        # trust_env=False (the default): HTTP(S)_PROXY never applies to loopback. The handshake
        # gets 5 s to connect and 5 s to answer (a stopped ComfyUI accepts TCP, then is silent);
        # once upgraded, reads have no timeout: the heartbeat watches the socket.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    async with session.ws_connect(
                        self._url,
                        max_msg_size=0,  # previews of any size
                        compress=0,
                        heartbeat=self._ping_interval_s,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0),
                    ) as ws:
                        self._ws = ws
                        self.connections += 1
                        self.connected = True
                        self.last_frame_at = time.monotonic()
                        self._connected_event.set()
                        failures = 0
                        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                            # previews with their prompt_id, node id
                            await ws.send_str(FEATURE_FLAGS)
                        await self._on_connect(self.connections > 1)
                        async for message in ws:
                            if message.type is aiohttp.WSMsgType.TEXT:
                                self.last_frame_at = time.monotonic()
                                self._dispatch(message.data)
                            elif message.type is aiohttp.WSMsgType.BINARY:
                                self.last_frame_at = time.monotonic()
                                if self._on_preview is not None:
                                    self._preview(message.data)
                            elif message.type is aiohttp.WSMsgType.ERROR:
                                break  # a missed pong, a broken frame: not a sign of life
                        if self._kick.is_set():
                            log.debug("websocket to ComfyUI closed for a reconnect")
                        else:
                            log.warning("websocket to ComfyUI lost: %s", ws.exception() or "closed")
                except asyncio.CancelledError:
                    raise
                except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                    if self.connected:
                        log.warning("websocket to ComfyUI lost: %s", exc)
                    else:
                        log.debug("websocket connect failed: %s", exc)
                finally:
                    self._ws = None
                    if self.connected:
                        self.connected = False
                        self._connected_event.clear()
                        self._on_disconnect()
                failures = await self._pause(failures)

    async def _pause(self, failures: int) -> int:
        """Wait before the next connect attempt: at once after :meth:`connect_now` or
        :meth:`reconnect`, else the backoff for ``failures + 1`` failures. Returns the new
        failure count (0 after a kick)."""
        failures += 1
        if self._kick.is_set():
            self._kick.clear()
            return 0
        delay = backoff_delay(failures, self._backoff_s, self._max_backoff_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._kick.wait(), delay)
        if self._kick.is_set():  # ComfyUI answers now: connect at once
            self._kick.clear()
            return 0
        return failures

    def _preview(self, frame: bytes) -> None:
        preview = decode_preview(frame)
        if preview is None or self._on_preview is None:
            return
        try:
            self._on_preview(preview)
        except Exception:
            log.exception("error handling a preview frame")

    def _dispatch(self, message: str) -> None:
        try:
            frame = self._decoder.decode(message)
        except msgspec.DecodeError:
            log.debug("ignoring a frame that is not JSON")
            return
        if not isinstance(frame, dict):
            return
        if frame.get("type") == "status":
            data = frame.get("data") or {}
            try:
                self.queue_remaining = int(data["status"]["exec_info"]["queue_remaining"])
            except (KeyError, TypeError, ValueError):
                pass
        try:
            self._on_frame(frame)
        except Exception:
            log.exception("error handling a %s frame", frame.get("type"))
