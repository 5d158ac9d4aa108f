"""The webhook dispatcher: one bounded delivery queue for prompt webhooks and system events.

Unlike comfyui-api (unbounded fire-and-forget POSTs, fixed 1 s retry delay, no timeout), every
delivery goes through :class:`WebhookDispatcher`: one bounded queue with fixed worker tasks,
``PROMPT_WEBHOOK_RETRIES`` total attempts with capped exponential backoff and jitter, a
``WEBHOOK_TIMEOUT_S`` limit per attempt, per-key ordering, dropping of system events (never of
prompt webhooks) when full, and a flush on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from comfy_sidecar.config import SYSTEM_EVENT_NAMES, Settings
from comfy_sidecar.net.backoff import attempt_failure, backoff_delay
from comfy_sidecar.net.urls import scrub_url
from comfy_sidecar.observability import metrics, tracing
from comfy_sidecar.observability.logs import TRACEPARENT
from comfy_sidecar.storage.errors import URLRefused
from comfy_sidecar.storage.netguard import NetGuard, trusted

from .body import JsonBody
from .payloads import rewrite_prompt_ids
from .signing import decode_secret

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("comfy_sidecar.webhooks")

#: ComfyUI websocket frame types that may be forwarded as ``comfy.<type>``.
COMFY_EVENT_NAMES: frozenset[str] = frozenset(n for n in SYSTEM_EVENT_NAMES if "file_" not in n)
#: Storage events forwarded as ``storage.<name>``.
STORAGE_EVENT_NAMES: frozenset[str] = frozenset(n for n in SYSTEM_EVENT_NAMES if "file_" in n)
#: System events that may be evicted from a full queue to make room for more important ones.
DROPPABLE_EVENTS: frozenset[str] = frozenset(
    {"comfy.progress", "comfy.progress_state", "comfy.status"}
)
_MIN_RATE = 1024 * 1024  # bytes/s a receiver must at least take a body at (extends the timeout)


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
    traceparent: str | None = None  # the W3C traceparent of the request that made it
    #: The span each attempt is a child of (the job's), when tracing.
    parent: tracing.Span | tracing.NoSpan = tracing.NO_SPAN
    trusted: bool = False  # the operator's SYSTEM_WEBHOOK_URL: not checked by the SSRF guard


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
        self._client: httpx.AsyncClient | None = None  # made by the first delivery
        self._guard = NetGuard(settings)
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
        """Start the worker tasks (the HTTP client is made by the first delivery: a sidecar
        that never sends a webhook holds no client, no TLS context, no connection pool)."""
        if self._state != "new":
            return
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
        if self._client is not None:
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
        all attempts failed, the URL is not http(s), or the dispatcher closed first (also when
        it had closed before this call: the delivery is abandoned like one still queued at
        :meth:`close`, logged in one line); awaiting it is optional. ``RuntimeError`` if
        :meth:`start` was not called.
        """
        if not isinstance(body, JsonBody):
            body = JsonBody(body)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if urlsplit(url).scheme not in ("http", "https"):
            log.error("job %s: webhook URL %s is not http(s); not sent", webhook_id, scrub_url(url))
            body.close()
            future.set_result(False)
            return future
        kind = self._prompt
        while self._state in ("running", "closing") and kind.pending >= kind.capacity:
            kind.room.clear()
            await kind.room.wait()
        if self._state == "new":
            body.close()
            raise RuntimeError("webhook dispatcher is not running")
        if self._state == "closed":  # a job that ended after the shutdown's flush
            body.close()
            log.warning(
                "job %s: webhook to %s not sent: the sidecar shut down first",
                webhook_id,
                scrub_url(url),
            )
            metrics.webhook_finished(kind.name, None)
            self.counters["abandoned"] += 1
            future.set_result(False)
            return future
        job = _Job(
            url=url,
            webhook_id=webhook_id,
            body=body,
            lane=order_key or webhook_id,
            label="prompt webhook",
            future=future,
            traceparent=TRACEPARENT.get(),
            parent=tracing.current(),
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
            trusted=True,
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
        out["url"] = scrub_url(url) if isinstance(url, str) else "unknown"
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
        metrics.system_event_dropped()
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
        metrics.webhook_finished(kind.name, delivered)
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
                    with trusted() if job.trusted else contextlib.nullcontext():
                        ok = await self._deliver(job)
                    self._finish(kind, job, ok)
            finally:
                if job.started and not job.cancelled:  # cancelled mid-delivery by close()
                    self._finish(kind, job, None)
                if lane:
                    kind.ready.put_nowait(lane_key)
                else:
                    kind.lanes.pop(lane_key, None)

    def _http(self) -> httpx.AsyncClient:
        """The one HTTP client of the deliveries, made on first use."""
        if self._client is None:
            import httpx  # on the first delivery, with its transport (httpcore)

            from comfy_sidecar.storage.guarded import guarded_transport

            limits = httpx.Limits(max_connections=32, max_keepalive_connections=8)
            # Prompt webhooks are callers' URLs: every one passes the SSRF guard's transport
            # (directly: each connection checked and pinned; through HTTP(S)_PROXY when one
            # applies: the host checked first). SYSTEM_WEBHOOK_URL is the operator's, delivered
            # inside trusted().
            self._client = httpx.AsyncClient(
                follow_redirects=False, transport=guarded_transport(self._guard, limits=limits)
            )
        return self._client

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self._backoff_base_s, self._backoff_cap_s, jitter=0.25)

    async def _deliver(self, job: _Job) -> bool:
        """POST ``job`` until an attempt gets a 2xx answer, at most ``PROMPT_WEBHOOK_RETRIES``
        attempts with backoff between them. False when none did or its body cannot be read."""
        import httpx

        client = self._http()
        reason = ""
        for attempt in range(1, self._attempts + 1):
            self.counters["attempts"] += 1
            span = tracing.start("webhook", parent=job.parent, kind="client")
            if span.recording:
                span.set("url.full", scrub_url(job.url))
                span.set("webhook.id", job.webhook_id)
                span.set("webhook.attempt", attempt)
            try:
                status = await self._post(job, client, span.traceparent)
                span.set("http.response.status_code", status)
                if 200 <= status < 300:
                    return True
                reason = f"HTTP {status}"
                span.error(reason)
            except (TimeoutError, httpx.HTTPError) as exc:
                reason = attempt_failure(exc, self._timeout_s)
                span.error(reason, exception_type=type(exc).__name__)
            except URLRefused as exc:  # the SSRF guard: no retry can change that
                log.error("%s %s to %s: %s", job.label, job.webhook_id, scrub_url(job.url), exc)
                span.error(exc)
                return False
            except OSError as exc:
                log.error(
                    "%s %s to %s: cannot read body: %s",
                    job.label,
                    job.webhook_id,
                    scrub_url(job.url),
                    exc,
                )
                span.error(exc)
                return False
            except BaseException as exc:  # cancelled by close()
                span.error(exc)
                raise
            finally:
                span.end()
            log.warning(
                "%s %s to %s: attempt %d/%d failed: %s",
                job.label,
                job.webhook_id,
                scrub_url(job.url),
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
            scrub_url(job.url),
            self._attempts,
            reason,
        )
        return False

    async def _post(
        self, job: _Job, client: httpx.AsyncClient, traceparent: str | None = None
    ) -> int:
        """One attempt: sign ``job``'s body with a fresh ``webhook-timestamp`` and POST it with
        ``traceparent`` (the attempt's span's; else the one of the request that made the
        job, as received); returns the HTTP status. Raises :class:`TimeoutError` past the time
        limit (the timeout plus 1 s per MiB), ``httpx.HTTPError``, or ``OSError`` when the
        body cannot be read."""
        timestamp = round(time.time())
        signature = await job.body.signature(self._key, job.webhook_id, timestamp)
        headers = {
            "content-type": "application/json",
            "content-length": str(job.body.length),
            "webhook-id": job.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        traceparent = traceparent or job.traceparent
        if traceparent:
            headers["traceparent"] = traceparent
        static = job.body.static
        content: bytes | AsyncIterator[bytes] = static if static is not None else job.body.achunks()
        # A large body (a video's base64) gets 1 s more per MiB on top of the limit.
        limit = self._timeout_s + job.body.length / _MIN_RATE
        async with (
            asyncio.timeout(limit),
            client.stream(
                "POST", job.url, content=content, headers=headers, timeout=self._timeout_s
            ) as response,
        ):
            return response.status_code
