"""Webhooks: Standard Webhooks signing, one bounded delivery queue, prompt and system events.

Wire format copies SaladTechnologies/comfyui-api (behaviour doc B17/B18):

* Headers ``content-type: application/json``, ``webhook-id``, ``webhook-timestamp`` (seconds since
  the epoch) and ``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``.
  The key is ``WEBHOOK_SECRET`` decoded like Node's ``Buffer.from(secret, "base64")`` (lenient:
  missing padding, URL-safe alphabet, junk skipped, stops at the first ``=``); a ``whsec_`` prefix
  is stripped first (comfyui-api does not strip it). With no secret the key is empty and bodies
  are still signed, as comfyui-api does.
* Prompt webhooks: v1 ``{"event": "output.complete", "image", "id", "filename", "prompt",
  "stats"}`` per output and ``{"event": "prompt.failed", "id", "prompt", "error"}``; v2
  ``{"type": "prompt.complete", "timestamp", ...200 body}`` and ``{"type": "prompt.failed",
  "timestamp", "id", "prompt", "error"}`` with the structured error.
* System events ``{"event": "comfy.<type>" | "storage.<type>", "data", "metadata"}``.

Unlike comfyui-api (unbounded fire-and-forget POSTs, fixed 1 s retry delay, no timeout), every
delivery goes through :class:`WebhookDispatcher`: one bounded queue with fixed worker tasks,
``PROMPT_WEBHOOK_RETRIES`` total attempts with capped exponential backoff and jitter, a
``WEBHOOK_TIMEOUT_S`` limit per attempt, per-key ordering, dropping of system events (never of
prompt webhooks) when full, and a flush on shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import random
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import httpx
import msgspec

from .config import SYSTEM_EVENT_NAMES, Settings

log = logging.getLogger(__name__)

#: ComfyUI websocket frame types that may be forwarded as ``comfy.<type>``.
COMFY_EVENT_NAMES: frozenset[str] = frozenset(n for n in SYSTEM_EVENT_NAMES if "file_" not in n)
#: Storage events forwarded as ``storage.<name>``.
STORAGE_EVENT_NAMES: frozenset[str] = frozenset(n for n in SYSTEM_EVENT_NAMES if "file_" in n)
#: System events that may be evicted from a full queue to make room for more important ones.
DROPPABLE_EVENTS: frozenset[str] = frozenset(
    {"comfy.progress", "comfy.progress_state", "comfy.status"}
)

# --- secret decoding and signing ------------------------------------------------------------

_B64_VALUES: dict[str, int] = {
    ch: i for i, ch in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}
_B64_VALUES["-"] = 62
_B64_VALUES["_"] = 63


def node_base64_decode(text: str) -> bytes:
    """Decode ``text`` exactly as Node's ``Buffer.from(text, "base64")`` does (Node 20).

    Both alphabets are accepted (``+/`` and ``-_``), characters outside them are skipped, the
    first ``=`` ends the input, and a trailing group of 2 or 3 characters yields 1 or 2 bytes
    (a lone trailing character yields nothing). Characters above U+00FF are taken modulo 256, as
    Node does for two-byte strings. Never raises. ``"testsecret"`` -> ``b5 eb 2d b1 e7 2b 7a``.
    """
    sextets: list[int] = []
    for ch in text:
        if ch == "=":
            break
        value = _B64_VALUES.get(chr(ord(ch) & 0xFF))
        if value is not None:
            sextets.append(value)
    out = bytearray()
    whole = len(sextets) - len(sextets) % 4
    for i in range(0, whole, 4):
        a, b, c, d = sextets[i : i + 4]
        out += ((a << 18) | (b << 12) | (c << 6) | d).to_bytes(3, "big")
    rest = sextets[whole:]
    if len(rest) >= 2:
        out.append(((rest[0] << 2) | (rest[1] >> 4)) & 0xFF)
    if len(rest) == 3:
        out.append(((rest[1] << 4) | (rest[2] >> 2)) & 0xFF)
    return bytes(out)


def decode_secret(secret: str | None) -> bytes:
    """HMAC key for ``WEBHOOK_SECRET``: strip a ``whsec_`` prefix, then :func:`node_base64_decode`.

    ``None`` or ``""`` gives ``b""`` (comfyui-api signs with an empty key when the secret is unset).
    """
    if not secret:
        return b""
    if secret.startswith("whsec_"):
        secret = secret[len("whsec_") :]
    return node_base64_decode(secret)


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature`` value for one message: ``v1,<base64 HMAC-SHA256>``.

    The signed content is ``f"{webhook_id}.{timestamp}.".encode() + body`` (Standard Webhooks).
    """
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


# --- bodies ---------------------------------------------------------------------------------

_FILE_CHUNK = 3 * 256 * 1024  # raw bytes per read; a multiple of 3 so base64 pieces concatenate


class Base64File:
    """A file whose contents appear in a JSON body as one base64 string, read in chunks.

    The file is opened at construction (``OSError`` if it cannot be), so the caller may unlink it
    afterwards; its size is fixed then (``size``, bytes). The owner of the :class:`JsonBody`
    closes it; reading fewer bytes than ``size`` later raises ``OSError``.
    """

    __slots__ = ("_fd", "path", "size")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.size = os.fstat(self._fd).st_size

    @property
    def encoded_length(self) -> int:
        """Length of the base64 text, in bytes."""
        return 4 * ((self.size + 2) // 3)

    def read_encoded(self, offset: int) -> bytes:
        """Base64 of up to one chunk of raw bytes from ``offset`` (blocking; call in a thread)."""
        if self._fd is None:
            raise OSError(f"{self.path}: already closed")
        want = min(_FILE_CHUNK, self.size - offset)
        data = os.pread(self._fd, want, offset)
        if len(data) != want:
            raise OSError(f"{self.path}: file shrank while being sent")
        return base64.b64encode(data)

    def encoded_chunks(self) -> Iterator[bytes]:
        """All base64 text in chunks (blocking)."""
        for offset in range(0, self.size, _FILE_CHUNK):
            yield self.read_encoded(offset)

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_MARK = "\u2063b64f\u2063"
_MIN_RATE = 1024 * 1024  # bytes/s a receiver must at least take a body at (extends the timeout)


class JsonBody:
    """A JSON request body, encoded once with msgspec (compact, UTF-8, like ``JSON.stringify``).

    ``obj`` is any msgspec-encodable value (dicts keep their key order; msgspec Structs and
    ``os.PathLike`` are accepted); :class:`Base64File` values anywhere inside become base64
    strings streamed from disk, so a large output is never held in memory. ``length`` is the
    exact body size in bytes. ``TypeError`` for values msgspec cannot encode.
    """

    __slots__ = ("_files", "_parts", "length")

    def __init__(self, obj: Any) -> None:
        files: list[Base64File] = []
        token = secrets.token_hex(8)

        def hook(value: Any) -> Any:
            if isinstance(value, Base64File):
                files.append(value)
                return f"{_MARK}{token}:{len(files) - 1}{_MARK}"
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            raise TypeError(f"cannot encode {type(value).__name__} in a webhook body")

        raw = msgspec.json.encode(obj, enc_hook=hook)
        self._files = files
        self._parts: list[bytes | Base64File] = []
        if not files:
            self._parts.append(raw)
        else:
            mark = _MARK.encode()
            pattern = re.compile(
                re.escape(mark + token.encode() + b":") + rb"(\d+)" + re.escape(mark)
            )
            pos = 0
            for match in pattern.finditer(raw):
                self._parts.append(raw[pos : match.start()])
                self._parts.append(files[int(match.group(1))])
                pos = match.end()
            self._parts.append(raw[pos:])
        self.length = sum(
            p.encoded_length if isinstance(p, Base64File) else len(p) for p in self._parts
        )

    @property
    def static(self) -> bytes | None:
        """The whole body when it has no file parts, else ``None``."""
        if len(self._parts) == 1 and isinstance(self._parts[0], bytes):
            return self._parts[0]
        return None

    def chunks(self) -> Iterator[bytes]:
        """The body in pieces (blocking file reads; run in a thread for file bodies)."""
        for part in self._parts:
            if isinstance(part, Base64File):
                yield from part.encoded_chunks()
            elif part:
                yield part

    async def achunks(self) -> AsyncIterator[bytes]:
        """The body in pieces; file reads run in a worker thread one chunk at a time."""
        for part in self._parts:
            if isinstance(part, Base64File):
                for offset in range(0, part.size, _FILE_CHUNK):
                    yield await asyncio.to_thread(part.read_encoded, offset)
            elif part:
                yield part

    def read(self) -> bytes:
        """The whole body as bytes (loads files into memory; for tests and small bodies)."""
        return b"".join(self.chunks())

    async def signature(self, key: bytes, webhook_id: str, timestamp: int) -> str:
        """Like :func:`sign`, streaming file parts through the HMAC in a worker thread."""
        static = self.static
        if static is not None:
            return sign(key, webhook_id, timestamp, static)

        def run() -> str:
            mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode(), hashlib.sha256)
            for chunk in self.chunks():
                mac.update(chunk)
            return "v1," + base64.b64encode(mac.digest()).decode("ascii")

        return await asyncio.to_thread(run)

    def close(self) -> None:
        """Close the files of :class:`Base64File` parts (idempotent)."""
        for f in self._files:
            f.close()


def iso_timestamp(now: datetime | None = None) -> str:
    """UTC time as JavaScript's ``Date.toISOString()`` writes it: ``2026-01-02T03:04:05.678Z``."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def v1_output_body(
    *,
    id: str,
    filename: str,
    prompt: Any,
    stats: Any,
    image_path: str | os.PathLike[str],
) -> JsonBody:
    """Deprecated v1 ``output.complete`` body for one output file (comfyui-api B17).

    Shape ``{"event": "output.complete", "image": <base64 of the file>, "id", "filename",
    "prompt", "stats"}``. The file is opened now and streamed when sent (it may be unlinked once
    this returns). Logs the deprecation warning comfyui-api logs. ``OSError`` if unreadable.
    """
    log.warning("job %s: the `webhook` field is deprecated; use `webhook_v2`", id)
    return JsonBody(
        {
            "event": "output.complete",
            "image": Base64File(image_path),
            "id": id,
            "filename": filename,
            "prompt": prompt,
            "stats": stats,
        }
    )


def v1_failed_body(*, id: str, prompt: Any, error: str | Mapping[str, Any]) -> JsonBody:
    """Deprecated v1 ``prompt.failed`` body ``{"event": "prompt.failed", "id", "prompt", "error"}``.

    ``error`` is a string as in comfyui-api; given the structured error dict, its ``"error"``
    message is used.
    """
    log.warning("job %s: the `webhook` field is deprecated; use `webhook_v2`", id)
    message = str(error.get("error", error)) if isinstance(error, Mapping) else error
    return JsonBody({"event": "prompt.failed", "id": id, "prompt": prompt, "error": message})


def v2_complete_body(result: Mapping[str, Any], *, timestamp: str | None = None) -> JsonBody:
    """v2 ``prompt.complete`` body: ``{"type": "prompt.complete", "timestamp", **result}``.

    ``result`` is the sync 200 body (``id, prompt, images, filenames, stats``; ``images`` holds
    base64 strings, upload URLs, or :class:`Base64File` objects to stream). A ``credentials`` key
    is never sent (comfyui-api echoes it: W-S3). ``timestamp`` defaults to now (ISO-8601).
    """
    body: dict[str, Any] = {"type": "prompt.complete", "timestamp": timestamp or iso_timestamp()}
    body.update((k, v) for k, v in result.items() if k != "credentials")
    return JsonBody(body)


def v2_failed_body(
    *, id: str, prompt: Any, error: Mapping[str, Any] | str, timestamp: str | None = None
) -> JsonBody:
    """v2 failure body ``{"type": "prompt.failed", "timestamp", "id", "prompt", "error"}``.

    ``error`` is the structured error the sync call would have answered, e.g. ``{"error": msg,
    "node_id", "node_type", "exception_type", "exception_message"}`` (comfyui-api sends only a
    generic string here: W-B9).
    """
    return JsonBody(
        {
            "type": "prompt.failed",
            "timestamp": timestamp or iso_timestamp(),
            "id": id,
            "prompt": prompt,
            "error": error,
        }
    )


# --- helpers for system events --------------------------------------------------------------

_SECRET_QUERY = re.compile(r"sig|token|key|secret|password|credential|auth", re.IGNORECASE)


def strip_credentials(url: str) -> str:
    """``url`` without userinfo and with secret-looking query values replaced by ``REDACTED``.

    Query parameters whose name contains sig, token, key, secret, password, credential or auth
    (e.g. ``X-Amz-Signature``, Azure SAS ``sig``) are redacted; others are kept as given.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "unknown"
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query and _SECRET_QUERY.search(query):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{quote(k, safe='')}={'REDACTED' if _SECRET_QUERY.search(k) else quote(v, safe='')}"
            for k, v in pairs
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def rewrite_prompt_ids(
    frame: Mapping[str, Any], api_id_for: Callable[[str], str | None]
) -> tuple[dict[str, Any], str | None]:
    """Copy of a ComfyUI frame ``{"type", "data"}`` with ComfyUI prompt ids replaced by API ids.

    Rewrites ``data.prompt_id`` and the ``prompt_id`` of each entry of ``data.nodes`` (the
    ``progress_state`` frame). Ids ``api_id_for`` does not know (returns ``None``) are kept, as
    comfyui-api keeps them. The input is not modified. Returns ``(frame, api id or ComfyUI id of
    data.prompt_id or None)``.
    """
    out = dict(frame)
    data = frame.get("data")
    if not isinstance(data, Mapping):
        return out, None
    new_data = dict(data)
    seen: dict[str, str] = {}

    def mapped(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value not in seen:
            seen[value] = api_id_for(value) or value
        return seen[value]

    key: str | None = None
    if "prompt_id" in new_data:
        new_data["prompt_id"] = mapped(new_data["prompt_id"])
        if isinstance(new_data["prompt_id"], str):
            key = new_data["prompt_id"]
    nodes = new_data.get("nodes")
    if isinstance(nodes, Mapping):
        new_data["nodes"] = {
            k: (
                {**v, "prompt_id": mapped(v["prompt_id"])}
                if isinstance(v, Mapping) and "prompt_id" in v
                else v
            )
            for k, v in nodes.items()
        }
    out["data"] = new_data
    return out, key


# --- delivery -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    url: str
    webhook_id: str
    body: JsonBody
    lane: str
    label: str
    droppable: bool = False
    future: asyncio.Future[bool] | None = None
    started: bool = False
    cancelled: bool = False


@dataclass(eq=False)
class _Kind:
    """One kind of delivery (prompt or system): its lanes, ready queue and bound."""

    name: str
    capacity: int
    workers: int
    lanes: dict[str, deque[_Job]] = field(default_factory=dict)
    ready: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    pending: int = 0
    droppable: deque[_Job] = field(default_factory=deque)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.room.set()
        self.idle.set()


class WebhookDispatcher:
    """Signs and delivers prompt webhooks and system events through one bounded queue.

    Prompt webhooks and system events have separate limits (``prompt_queue_size``,
    ``system_queue_size``, counting queued and in-flight deliveries) and separate fixed worker
    pools (``prompt_workers``, ``system_workers``), so a slow system receiver never delays a
    job's result. Deliveries sharing an order key (a lane) are sent one at a time, in order.

    Each delivery gets ``settings.prompt_webhook_retries`` total attempts; an attempt succeeds
    on any 2xx answer and is limited to ``settings.webhook_timeout_s`` seconds (connect, send,
    response headers), plus 1 s per MiB of body so large outputs can be sent. Between
    attempts it sleeps ``min(cap, base * 2**(n-1))`` seconds times a jitter factor in
    [0.75, 1]. Every attempt sends the same ``webhook-id`` and body bytes,
    signed with a fresh ``webhook-timestamp`` (so a late retry still passes the 5-minute
    tolerance of Standard Webhooks verifiers). Redirects are not followed.

    ``settings`` come validated from :func:`~comfy_sidecar.config.load_settings`.
    """

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient | None = None,
        *,
        prompt_workers: int = 4,
        system_workers: int = 2,
        prompt_queue_size: int = 256,
        system_queue_size: int = 512,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 30.0,
    ) -> None:
        url = settings.system_webhook_url  # validated by load_settings: http(s) or None
        self._key = decode_secret(settings.webhook_secret)
        self._attempts = settings.prompt_webhook_retries
        self._timeout_s = settings.webhook_timeout_s
        self._system_url = url
        subscribed = frozenset(settings.system_webhook_events) if url else frozenset()
        self._comfy_events = subscribed & COMFY_EVENT_NAMES
        self._storage_events = subscribed & STORAGE_EVENT_NAMES
        self._metadata: dict[str, str] = {**settings.system_meta, **settings.salad}
        self._client = client
        self._own_client = client is None
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._prompt = _Kind("prompt", prompt_queue_size, prompt_workers)
        self._system = _Kind("system", system_queue_size, system_workers)
        self._tasks: list[asyncio.Task[None]] = []
        self._state = "new"  # new -> running -> closing -> closed
        self._last_drop_log = 0.0
        self._seq = 0
        #: Counters: ``delivered``, ``failed`` (gave up after all attempts), ``attempts``,
        #: ``dropped`` (system events not sent because the queue was full), ``abandoned``
        #: (still queued or in flight when ``close`` gave up).
        self.counters: dict[str, int] = dict.fromkeys(
            ("delivered", "failed", "attempts", "dropped", "abandoned"), 0
        )
        if not settings.webhook_secret:
            log.info("WEBHOOK_SECRET is not set: webhooks are signed with an empty key")

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the HTTP client (unless one was given) and the worker tasks."""
        if self._state != "new":
            return
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            )
        for kind in (self._prompt, self._system):
            for i in range(kind.workers):
                task = asyncio.create_task(self._worker(kind), name=f"webhook-{kind.name}-{i}")
                self._tasks.append(task)
        self._state = "running"

    async def close(self, grace_s: float) -> None:
        """Deliver what is queued (new deliveries are still accepted meanwhile) for up to
        ``grace_s`` seconds, then cancel the workers. Unsent deliveries count as ``abandoned``;
        their :meth:`send_prompt` futures resolve to ``False``. Resets nothing else; idempotent.
        """
        if self._state in ("closing", "closed"):
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._state = "closing"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, grace_s)
        for kind in (self._prompt, self._system):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(kind.idle.wait(), remaining)
            except TimeoutError:
                break
        self._state = "closed"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for kind in (self._prompt, self._system):
            for lane in kind.lanes.values():
                for job in lane:
                    if not job.cancelled:
                        self._finish(kind, job, delivered=None)
            kind.lanes.clear()
            kind.droppable.clear()
            kind.room.set()  # wakes send_prompt callers waiting for room; they raise
        if self._own_client and self._client is not None:
            await self._client.aclose()

    @property
    def dropped(self) -> int:
        """System events dropped because the queue was full."""
        return self.counters["dropped"]

    @property
    def pending(self) -> dict[str, int]:
        """Deliveries queued or in flight: ``{"prompt": n, "system": n}``."""
        return {"prompt": self._prompt.pending, "system": self._system.pending}

    # -- prompt webhooks -----------------------------------------------------------------------

    async def send_prompt(
        self,
        url: str,
        body: JsonBody | Mapping[str, Any],
        webhook_id: str,
        order_key: str | None = None,
    ) -> asyncio.Future[bool]:
        """Queue one prompt webhook; never dropped. Waits for room when the queue is full.

        ``body`` is a :class:`JsonBody` (from the ``v1_*``/``v2_*`` builders; the dispatcher takes
        ownership and closes it) or a plain mapping. ``webhook_id`` is the job's API id.
        Deliveries with the same ``order_key`` (default: ``webhook_id``) are sent in order.
        Returns a future resolving to ``True`` when a 2xx answer was received, ``False`` when
        all attempts failed, the URL is not http(s), or the dispatcher closed first; awaiting
        it is optional. ``RuntimeError`` if :meth:`start` was not called or after :meth:`close`.
        """
        if not isinstance(body, JsonBody):
            body = JsonBody(body)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if urlsplit(url).scheme not in ("http", "https"):
            log.error("job %s: webhook URL %r is not http(s); not sent", webhook_id, url)
            body.close()
            future.set_result(False)
            return future
        kind = self._prompt
        while self._state in ("running", "closing") and kind.pending >= kind.capacity:
            kind.room.clear()
            await kind.room.wait()
        if self._state not in ("running", "closing"):
            body.close()
            raise RuntimeError("webhook dispatcher is not running")
        job = _Job(
            url=url,
            webhook_id=webhook_id,
            body=body,
            lane=order_key or webhook_id,
            label="prompt webhook",
            future=future,
        )
        self._put(kind, job)
        return future

    # -- system events -------------------------------------------------------------------------

    def emit_system(self, event: str, data: Any, order_key: str | None = None) -> bool:
        """Queue ``{"event": event, "data": data, "metadata": ...}`` for ``SYSTEM_WEBHOOK_URL``.

        Non-blocking. ``event`` is the full name (``comfy.progress``); subscription is not
        checked here. Events with the same ``order_key`` are delivered in order. When the queue
        is full the event is dropped (counted in ``dropped``, logged at most every 10 s); an
        event that is not progress/progress_state/status may instead evict the oldest queued
        one of those. Returns whether it was queued. Call it (like the other event methods)
        from the event loop's thread only. ``TypeError`` if ``data`` cannot be encoded.
        """
        if self._system_url is None or self._state not in ("running", "closing"):
            return False
        kind = self._system
        droppable = event in DROPPABLE_EVENTS
        # Full: a progress-like event is dropped; another one takes the place of the oldest
        # queued progress-like event if there is one, else it is dropped too.
        if kind.pending >= kind.capacity and (droppable or not self._evict(kind)):
            self._count_drop(event)
            return False
        body = JsonBody({"event": event, "data": data, "metadata": self._metadata})
        if order_key is None:
            self._seq += 1
            order_key = f"\x00{self._seq}"
        job = _Job(
            url=self._system_url,
            webhook_id=str(uuid.uuid4()),
            body=body,
            lane=order_key,
            label=event,
            droppable=droppable,
        )
        self._put(kind, job)
        if droppable:
            kind.droppable.append(job)
            if len(kind.droppable) > 2 * kind.capacity:
                kind.droppable = deque(j for j in kind.droppable if not (j.started or j.cancelled))
        return True

    def handle_comfy_frame(
        self, frame: Mapping[str, Any], api_id_for: Callable[[str], str | None]
    ) -> None:
        """Forward one ComfyUI websocket frame ``{"type", "data"}`` if its type is subscribed.

        Sent as ``{"event": "comfy.<type>", "data": <frame with prompt ids mapped by
        api_id_for>, "metadata"}`` (see :func:`rewrite_prompt_ids`), ordered per prompt (frames
        without a prompt id share one lane). Cheap when not subscribed; never blocks or raises.
        """
        kind = frame.get("type")
        if not isinstance(kind, str) or kind not in self._comfy_events:
            return
        try:
            data, key = rewrite_prompt_ids(frame, api_id_for)
            self.emit_system(f"comfy.{kind}", data, key or "\x00comfy")
        except Exception:
            log.exception("system event comfy.%s not sent", kind)

    def storage_event(self, name: str, data: Mapping[str, Any]) -> None:
        """Forward a cache/storage event (usable as the cache's ``on_event`` callback).

        ``name`` is ``file_downloaded``, ``file_uploaded`` or ``file_deleted`` (a ``storage.``
        prefix is accepted). Only ``url`` (credentials stripped), ``local_path`` (as a string),
        ``size`` (bytes) and ``duration`` (seconds) are sent, never file contents. Non-blocking.
        """
        name = name.removeprefix("storage.")
        if name not in self._storage_events:
            return
        out: dict[str, Any] = {}
        url = data.get("url")
        out["url"] = strip_credentials(url) if isinstance(url, str) else "unknown"
        local_path = data.get("local_path")
        if isinstance(local_path, str | os.PathLike):
            out["local_path"] = os.fspath(local_path)
        for key in ("size", "duration"):
            value = data.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = value
        self.emit_system(f"storage.{name}", out)

    # -- internals -----------------------------------------------------------------------------

    def _put(self, kind: _Kind, job: _Job) -> None:
        lane = kind.lanes.get(job.lane)
        if lane is None:
            kind.lanes[job.lane] = deque([job])
            kind.ready.put_nowait(job.lane)
        else:
            lane.append(job)
        kind.pending += 1
        kind.idle.clear()
        if kind.pending >= kind.capacity:
            kind.room.clear()

    def _evict(self, kind: _Kind) -> bool:
        while kind.droppable:
            job = kind.droppable.popleft()
            if not (job.started or job.cancelled):
                job.cancelled = True
                self._count_drop(job.label)
                self._release(kind)
                job.body.close()
                return True
        return False

    def _count_drop(self, event: str) -> None:
        self.counters["dropped"] += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 10.0:
            self._last_drop_log = now
            log.warning(
                "system webhook queue full: dropped %s (%d dropped so far)",
                event,
                self.counters["dropped"],
            )

    def _release(self, kind: _Kind) -> None:
        kind.pending -= 1
        if kind.pending < kind.capacity:
            kind.room.set()
        if kind.pending == 0:
            kind.idle.set()

    def _finish(self, kind: _Kind, job: _Job, delivered: bool | None) -> None:
        """Account for a job that left the queue: delivered True/False, or None = abandoned."""
        if job.cancelled:
            return
        job.cancelled = True
        job.body.close()
        self._release(kind)
        if delivered is None:
            self.counters["abandoned"] += 1
        else:
            self.counters["delivered" if delivered else "failed"] += 1
        if job.future is not None and not job.future.done():
            job.future.set_result(bool(delivered))

    async def _worker(self, kind: _Kind) -> None:
        while True:
            lane_key = await kind.ready.get()
            lane = kind.lanes.get(lane_key)
            if not lane:
                continue
            job = lane.popleft()
            try:
                if not job.cancelled:
                    job.started = True
                    ok = await self._deliver(job)
                    self._finish(kind, job, ok)
            finally:
                if job.started and not job.cancelled:  # cancelled mid-delivery by close()
                    self._finish(kind, job, None)
                if lane:
                    kind.ready.put_nowait(lane_key)
                else:
                    kind.lanes.pop(lane_key, None)

    def _backoff(self, attempt: int) -> float:
        delay = min(self._backoff_cap_s, self._backoff_base_s * 2 ** (attempt - 1))
        return float(delay * (0.75 + 0.25 * random.random()))

    async def _deliver(self, job: _Job) -> bool:
        assert self._client is not None
        reason = ""
        for attempt in range(1, self._attempts + 1):
            self.counters["attempts"] += 1
            timestamp = round(time.time())
            try:
                signature = await job.body.signature(self._key, job.webhook_id, timestamp)
                headers = {
                    "content-type": "application/json",
                    "content-length": str(job.body.length),
                    "webhook-id": job.webhook_id,
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": signature,
                }
                static = job.body.static
                content: bytes | AsyncIterator[bytes] = (
                    static if static is not None else job.body.achunks()
                )
                # A large body (a video's base64) gets 1 s more per MiB on top of the limit.
                limit = self._timeout_s + job.body.length / _MIN_RATE
                async with (
                    asyncio.timeout(limit),
                    self._client.stream(
                        "POST",
                        job.url,
                        content=content,
                        headers=headers,
                        timeout=self._timeout_s,
                    ) as response,
                ):
                    status = response.status_code
                if 200 <= status < 300:
                    return True
                reason = f"HTTP {status}"
            except TimeoutError:
                reason = f"no answer within {self._timeout_s:g} s"
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except OSError as exc:
                log.error(
                    "%s %s to %s: cannot read body: %s", job.label, job.webhook_id, job.url, exc
                )
                return False
            log.warning(
                "%s %s to %s: attempt %d/%d failed: %s",
                job.label,
                job.webhook_id,
                job.url,
                attempt,
                self._attempts,
                reason,
            )
            if attempt < self._attempts:
                await asyncio.sleep(self._backoff(attempt))
        log.error(
            "failed to send %s %s to %s after %d attempts: %s",
            job.label,
            job.webhook_id,
            job.url,
            self._attempts,
            reason,
        )
        return False
