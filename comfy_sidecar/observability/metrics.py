"""Prometheus metrics: every metric the sidecar exposes on ``GET /metrics``, and the small
functions the rest of the code calls to move them (one line at each call site).

Text exposition format 0.0.4 from ``prometheus_client``, on a registry of our own
(:data:`REGISTRY`, not the library's global one). Base units (seconds, bytes), ``_total`` on
counters, and only bounded labels (statuses, phases, endpoints, instance names, backend names,
route templates, API key names: never a key), after the conventions of vLLM, Triton and
OpenTelemetry's HTTP semantic conventions (``http_server_request_duration_seconds``). The
ComfyUI instance is the label ``comfyui_instance``: ``instance`` (and ``job``) are the target
labels Prometheus attaches to every scraped series, which would rename ours
``exported_instance``.

Two kinds of metric live here:

* event metrics (counters, histograms, the start-up gauge), process-wide in :data:`REGISTRY`,
  moved by :func:`job_ended`, :func:`job_completed`, :func:`key_job_started`,
  :func:`key_job_ended`, :func:`key_rejected`, :func:`restarts_known`,
  :func:`process_restart`, :func:`startup_phase`/:func:`time_startup`,
  :func:`download_finished`, :func:`cache_request`, :func:`webhook_finished`,
  :func:`system_event_dropped` and :func:`instrument` (HTTP);
* state read at scrape time through the small :class:`Scraped` protocol
  (:class:`SidecarCollector`): jobs waiting/running in the dispatcher (and how long the oldest
  has waited), the shared job queue's reachability (queue mode), pending webhook deliveries
  and their limit, each instance's up/ready, the cache's size, limit and filesystem, GPU
  memory and ComfyUI's version from ComfyUI's ``/system_stats`` (cached, refreshed in the
  background at most every :data:`SYSTEM_STATS_REFRESH_S`; a scrape never waits more than
  :data:`SCRAPE_WAIT_S` for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, TypeVar, runtime_checkable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from comfy_sidecar.config.keys import ANONYMOUS, LIMITS

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("comfy_sidecar.metrics")

T = TypeVar("T")

#: Where the metrics are served (open unless METRICS_REQUIRE_AUTH, see comfy_sidecar.http.auth).
PATH = "/metrics"
#: Prometheus text format 0.0.4 (Litestar adds ``; charset=utf-8``), what every Prometheus
#: scrapes; prometheus_client's own default became 1.0.0 (UTF-8 names), which we do not need.
MEDIA_TYPE = "text/plain; version=0.0.4"


class StatsClient(Protocol):
    """What the scrape asks of an instance's ComfyUI client."""

    async def get_json(self, path: str) -> Any: ...


class ScrapedInstance(Protocol):
    """What the scrape reads of one ComfyUI instance."""

    @property
    def name(self) -> str: ...
    @property
    def up(self) -> bool: ...
    @property
    def accepting(self) -> bool: ...
    @property
    def client(self) -> StatsClient: ...


class ScrapedCache(Protocol):
    """What the scrape reads of the download cache."""

    @property
    def max_bytes(self) -> int: ...
    def total_bytes(self) -> int: ...
    def disk_space(self) -> tuple[int, int] | None: ...


@runtime_checkable
class Scraped(Protocol):
    """What the scrape reads of the sidecar serving it: ``queue_up`` is None without a shared
    job queue (JOB_QUEUE_URL)."""

    @property
    def version(self) -> str: ...
    @property
    def jobs_waiting(self) -> int: ...
    @property
    def jobs_oldest_wait_s(self) -> float: ...
    @property
    def jobs_running(self) -> int: ...
    @property
    def queue_up(self) -> bool | None: ...
    @property
    def pending_deliveries(self) -> int: ...
    @property
    def max_pending_deliveries(self) -> int: ...
    @property
    def instances(self) -> Sequence[ScrapedInstance]: ...
    @property
    def cache(self) -> ScrapedCache: ...


#: How often ComfyUI's /system_stats is fetched at most, per instance, in seconds.
SYSTEM_STATS_REFRESH_S = 10.0
#: How long one /system_stats fetch may take, in seconds.
SYSTEM_STATS_TIMEOUT_S = 2.0
#: How long a scrape waits for a refresh it started before answering from the cache, seconds.
SCRAPE_WAIT_S = 0.5

#: Job and download durations: 50 ms to 30 min.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
#: HTTP request durations: OpenTelemetry's recommended buckets, then up to a long sync /prompt.
HTTP_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10),
    *(30, 60, 120, 300, 600),
)

#: The job phases of ``comfyui_job_duration_seconds``.
JOB_PHASES = ("queue", "preprocess", "execute", "upload", "total")
#: Download providers (storage backend names); anything else is counted as ``other``.
PROVIDERS = frozenset({"http", "s3", "hf", "azure"})
#: HTTP methods kept as they are (OTel's list); any other is ``_OTHER``.
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
#: The ``route`` of a request no route matched (404, 405).
UNMATCHED_ROUTE = "other"

disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``*_created`` series: they double the output for no use here

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes

JOBS = Counter(
    "comfyui_jobs",
    "Jobs that ended, by final status (completed, failed, cancelled, timed_out) and endpoint.",
    ["status", "endpoint"],
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "comfyui_job_duration_seconds",
    "Durations of completed jobs by phase: queue (waiting for a slot and in ComfyUI's queue), "
    "preprocess, execute (ComfyUI's execution), upload, total.",
    ["phase"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
RESTARTS = Counter(
    "comfyui_process_restarts",
    "ComfyUI restarts by instance and reason (exit, hang, stall, recycle).",
    ["comfyui_instance", "reason"],
    registry=REGISTRY,
)
STARTUP = Gauge(
    "comfyui_startup_duration_seconds",
    "How long the last start-up phase took: provision (the manifest), launch (ComfyUI "
    "answering and its websocket open), warmup (the warmup prompt).",
    ["phase"],
    registry=REGISTRY,
)
DOWNLOAD_BYTES = Counter(
    "comfyui_download_bytes",
    "Bytes downloaded into the cache, by provider (http, s3, hf, azure).",
    ["provider"],
    registry=REGISTRY,
)
DOWNLOAD_DURATION = Histogram(
    "comfyui_download_duration_seconds",
    "Durations of downloads into the cache, by provider.",
    ["provider"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
CACHE_REQUESTS = Counter(
    "comfyui_cache_requests",
    "Lookups of a URL in the download cache: hit (served from the cache) or miss (downloaded).",
    ["result"],
    registry=REGISTRY,
)
WEBHOOKS = Counter(
    "comfyui_webhook_deliveries",
    "Webhook deliveries by kind (prompt, system) and result (delivered, failed, dropped).",
    ["kind", "result"],
    registry=REGISTRY,
)
SYSTEM_EVENTS_DROPPED = Counter(
    "comfyui_system_events_dropped",
    "System events not sent because the system webhook queue was full.",
    registry=REGISTRY,
)
KEY_JOBS = Counter(
    "comfyui_key_jobs",
    "Jobs that ended, by the name of the API key that submitted them (anonymous: no key) and "
    "final status.",
    ["key", "status"],
    registry=REGISTRY,
)
KEY_JOBS_RUNNING = Gauge(
    "comfyui_key_jobs_running",
    "Jobs running on this replica (ComfyUI executing them), by the name of their API key.",
    ["key"],
    registry=REGISTRY,
)
KEY_REJECTIONS = Counter(
    "comfyui_key_rejections",
    "Submissions refused 429 because their API key was past a quota, by key name and reason "
    "(max_concurrent_jobs, jobs_per_minute, max_queue).",
    ["key", "reason"],
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "http_server_request_duration_seconds",
    "Duration of HTTP requests by method, route template and status code.",
    ["method", "route", "status_code"],
    buckets=HTTP_BUCKETS,
    registry=REGISTRY,
)

for _result in ("hit", "miss"):
    CACHE_REQUESTS.labels(_result)
for _kind in ("prompt", "system"):
    for _result in ("delivered", "failed", "dropped"):
        WEBHOOKS.labels(_kind, _result)


# --- what the code calls ------------------------------------------------------------------


def job_ended(status: str, endpoint: str) -> None:
    """A job record ended with ``status`` (a ``JobStatus`` value); ``endpoint`` is the
    record's (prompt, jobs, warmup, aidock, modal_jobs, modal_simple)."""
    JOBS.labels(str(status), endpoint).inc()


#: The ``key`` label of a job submitted without an API key (none configured, or the warmup).
ANONYMOUS_KEY = ANONYMOUS
#: Why a key's submission is refused (the ``reason`` of ``comfyui_key_rejections_total``).
QUOTA_REASONS = LIMITS
#: Final statuses of a job (``JobStatus`` values that end it).
FINAL_STATUSES = ("completed", "failed", "cancelled", "timed_out")


def keys_known(names: Iterable[str]) -> None:
    """The configured API keys' ``names``: their series start at 0 (the ``key`` label only
    ever takes these values, ``anonymous``, and names other replicas' keys gave the jobs of
    the shared queue: bounded by configuration, never a key)."""
    for name in (*names, ANONYMOUS_KEY):
        KEY_JOBS_RUNNING.labels(name)
        for status in FINAL_STATUSES:
            KEY_JOBS.labels(name, status)
        for reason in QUOTA_REASONS:
            KEY_REJECTIONS.labels(name, reason)


def key_job_started(owner: str | None) -> None:
    """A job of the API key named ``owner`` (None: no key) started running here."""
    KEY_JOBS_RUNNING.labels(owner or ANONYMOUS_KEY).inc()


def key_job_ended(owner: str | None, status: str | None, was_running: bool) -> None:
    """A job of the API key named ``owner`` ended with ``status`` (None: forgotten before it
    ended, not counted); ``was_running``: it had started here."""
    name = owner or ANONYMOUS_KEY
    if was_running:
        KEY_JOBS_RUNNING.labels(name).dec()
    if status is not None:
        KEY_JOBS.labels(name, status).inc()


def key_rejected(name: str, reason: str) -> None:
    """A submission with the API key ``name`` was refused past its quota ``reason``."""
    KEY_REJECTIONS.labels(name, reason).inc()


def job_phases(stats: Mapping[str, Any]) -> dict[str, float]:
    """Seconds per phase of :data:`JOB_PHASES` from comfyui-api's ``stats`` (ms durations,
    ``comfy_execution.duration`` from ComfyUI's own timestamps). ``queue`` is the round trip
    to ComfyUI minus its execution: the wait for an instance slot plus ComfyUI's queue. A
    missing or non-numeric value leaves its phase out."""
    execution = stats.get("comfy_execution")
    executed = execution.get("duration") if isinstance(execution, Mapping) else None
    round_trip = stats.get("comfy_round_trip_time")
    ms: dict[str, Any] = {
        "preprocess": stats.get("preprocess_time"),
        "execute": executed,
        "upload": stats.get("upload_time"),
        "total": stats.get("total_time"),
    }
    if _number(round_trip) and _number(executed):
        ms["queue"] = round_trip - executed
    return {phase: max(0.0, value / 1000) for phase, value in ms.items() if _number(value)}


def job_completed(stats: Mapping[str, Any]) -> None:
    """A job completed: observe its phases (:func:`job_phases`)."""
    for phase, seconds in job_phases(stats).items():
        JOB_DURATION.labels(phase).observe(seconds)


def restarts_known(instance: str, reasons: Iterable[str]) -> None:
    """Expose ``comfyui_process_restarts_total`` of ``instance`` at 0 for every reason before
    the first restart: an alert's ``increase()`` then sees the first one too (a series that
    appears at 1 has no increase), and its expression meets a series from the start."""
    for reason in reasons:
        RESTARTS.labels(instance, reason)


def process_restart(instance: str, reason: str) -> None:
    """ComfyUI instance ``instance`` is restarted because of ``reason`` (exit, hang, stall,
    recycle)."""
    RESTARTS.labels(instance, reason).inc()


def startup_phase(phase: str, seconds: float) -> None:
    """Start-up ``phase`` (provision, launch, warmup) took ``seconds``."""
    STARTUP.labels(phase).set(seconds)


async def time_startup(phase: str, step: Awaitable[T]) -> T:
    """Await ``step`` and record how long it took as start-up ``phase`` (when it succeeds);
    returns its value, raises what it raises."""
    started = time.monotonic()
    value = await step
    startup_phase(phase, time.monotonic() - started)
    return value


def download_finished(provider: str, size: int, seconds: float) -> None:
    """The cache downloaded ``size`` bytes in ``seconds`` through backend ``provider``."""
    label = provider if provider in PROVIDERS else "other"
    DOWNLOAD_BYTES.labels(label).inc(size)
    DOWNLOAD_DURATION.labels(label).observe(seconds)


def cache_request(result: str) -> None:
    """A cache lookup was a ``hit`` or a ``miss``."""
    CACHE_REQUESTS.labels(result).inc()


def webhook_finished(kind: str, delivered: bool | None) -> None:
    """A ``kind`` (prompt, system) delivery left the queue: delivered True/False, or None
    when it was abandoned at shutdown (counted as ``dropped``)."""
    result = "dropped" if delivered is None else "delivered" if delivered else "failed"
    WEBHOOKS.labels(kind, result).inc()


def system_event_dropped() -> None:
    """A system event was dropped because its queue was full."""
    SYSTEM_EVENTS_DROPPED.inc()
    WEBHOOKS.labels("system", "dropped").inc()


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- HTTP -----------------------------------------------------------------------------------


def route_of(scope: Mapping[str, Any]) -> str:
    """The route template a request matched (``/jobs/{job_id}``), :data:`UNMATCHED_ROUTE` when
    none did. Litestar puts ``path_template`` in the scope once it routed the request."""
    if "route_handler" not in scope:
        return UNMATCHED_ROUTE
    return str(scope.get("path_template") or UNMATCHED_ROUTE)


def instrument(app: Litestar) -> Litestar:
    """``app`` with every HTTP request timed into ``http_server_request_duration_seconds``.
    Wraps Litestar's ASGI handler (routing and exception handling included, as its
    OpenTelemetry plugin does), so 404s and 405s are counted too, as route ``other``."""
    inner: ASGIApp = app.asgi_handler

    async def timed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # type: ignore[comparison-overlap]  # a str enum
            await inner(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await inner(scope, receive, send_status)
        finally:
            method = scope.get("method", "")
            HTTP_DURATION.labels(
                method if method in HTTP_METHODS else "_OTHER", route_of(scope), str(status)
            ).observe(time.perf_counter() - started)

    app.asgi_handler = timed
    return app


# --- state read at scrape time --------------------------------------------------------------


class SystemStats:
    """What ComfyUI's ``/system_stats`` says, per instance: VRAM of ``devices[0]``
    (``vram_total``, ``vram_free``, bytes) and ``system.comfyui_version``. Refreshed in the
    background (one task at a time, :data:`SYSTEM_STATS_TIMEOUT_S` per fetch) when older than
    :data:`SYSTEM_STATS_REFRESH_S`."""

    def __init__(self) -> None:
        #: instance name -> (total bytes, used bytes)
        self.vram: dict[str, tuple[float, float]] = {}
        self.comfyui_version = ""
        self.fetched_at = -math.inf
        self._task: asyncio.Task[None] | None = None

    async def fresh(self, instances: Iterable[ScrapedInstance], wait_s: float) -> None:
        """Start a refresh when the cache is stale, and wait up to ``wait_s`` seconds for it."""
        if self._task is None and time.monotonic() - self.fetched_at >= SYSTEM_STATS_REFRESH_S:
            self.fetched_at = time.monotonic()
            self._task = asyncio.ensure_future(self._refresh(list(instances)))
            self._task.add_done_callback(self._refreshed)
        if self._task is not None and wait_s > 0:
            await asyncio.wait({self._task}, timeout=wait_s)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._task = None
        self.fetched_at = time.monotonic()
        if not task.cancelled() and task.exception() is not None:
            log.debug("/system_stats refresh failed: %s", task.exception())

    async def _refresh(self, instances: list[ScrapedInstance]) -> None:
        await asyncio.gather(*(self._fetch(instance) for instance in instances))

    async def _fetch(self, instance: ScrapedInstance) -> None:
        if not instance.up:
            self.vram.pop(instance.name, None)
            return
        try:
            stats = await asyncio.wait_for(
                instance.client.get_json("/system_stats"), SYSTEM_STATS_TIMEOUT_S
            )
        except Exception as exc:  # unreachable, slow or not JSON: keep the last values
            log.debug("instance %s: /system_stats: %s", instance.name, exc)
            return
        if not isinstance(stats, dict):
            return
        system = stats.get("system")
        if isinstance(system, dict) and system.get("comfyui_version"):
            self.comfyui_version = str(system["comfyui_version"])
        devices = stats.get("devices")
        device = devices[0] if isinstance(devices, list) and devices else {}
        total, free = device.get("vram_total"), device.get("vram_free")
        if _number(total) and _number(free):
            self.vram[instance.name] = (float(total), max(0.0, float(total) - float(free)))
        else:  # a CPU device has no VRAM
            self.vram[instance.name] = (0.0, 0.0)


class SidecarCollector(Collector):
    """The metrics read from one sidecar at scrape time."""

    def __init__(self, sidecar: Scraped, stats: SystemStats) -> None:
        self.sidecar = sidecar
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        """Gauges of the dispatcher, job queue, instances, deliveries, cache and GPUs, and the
        info metric."""
        sidecar = self.sidecar
        yield _gauge(
            "comfyui_jobs_waiting",
            "Jobs waiting in the sidecar for an instance slot.",
            sidecar.jobs_waiting,
        )
        yield _gauge(
            "comfyui_jobs_waiting_oldest_seconds",
            "Seconds the job waiting longest for an instance slot has waited (0: none waits).",
            sidecar.jobs_oldest_wait_s,
        )
        yield _gauge(
            "comfyui_jobs_running",
            "Jobs holding an instance slot (sent to ComfyUI or about to be).",
            sidecar.jobs_running,
        )
        if sidecar.queue_up is not None:
            yield _gauge(
                "comfyui_job_queue_up",
                "1 while the shared job queue (JOB_QUEUE_URL, Redis) answers, 0 while it is "
                "unreachable; absent without JOB_QUEUE_URL.",
                float(sidecar.queue_up),
            )
        yield _gauge(
            "comfyui_pending_deliveries",
            "Asynchronous jobs with a webhook admitted and not yet delivered (running, or a "
            "webhook of theirs still retrying).",
            sidecar.pending_deliveries,
        )
        yield _gauge(
            "comfyui_pending_deliveries_max",
            "MAX_PENDING_DELIVERIES: from this many pending deliveries on, new asynchronous jobs "
            "with a webhook get 429 (0: no limit).",
            sidecar.max_pending_deliveries,
        )
        up = GaugeMetricFamily(
            "comfyui_instance_up",
            "1 while the instance's ComfyUI process runs.",
            labels=["comfyui_instance"],
        )
        ready = GaugeMetricFamily(
            "comfyui_instance_ready",
            "1 while the instance accepts jobs (ready, connected, not draining).",
            labels=["comfyui_instance"],
        )
        for instance in sidecar.instances:
            up.add_metric([instance.name], float(instance.up))
            ready.add_metric([instance.name], float(instance.accepting))
        yield up
        yield ready
        cache = sidecar.cache
        yield _gauge(
            "comfyui_cache_size_bytes", "Bytes of files in the download cache.", cache.total_bytes()
        )
        yield _gauge(
            "comfyui_cache_max_bytes",
            "LRU_CACHE_SIZE_GB in bytes: the cache evicts least recently used files above it "
            "(0: no limit).",
            cache.max_bytes,
        )
        space = cache.disk_space()
        if space is not None:
            yield _gauge(
                "comfyui_cache_filesystem_size_bytes",
                "Size of the filesystem holding CACHE_DIR, in bytes.",
                space[0],
            )
            yield _gauge(
                "comfyui_cache_filesystem_avail_bytes",
                "Bytes free for the sidecar on the filesystem holding CACHE_DIR.",
                space[1],
            )
        used = GaugeMetricFamily(
            "comfyui_gpu_memory_used_bytes",
            "GPU memory in use (ComfyUI's /system_stats, devices[0]; 0 on CPU).",
            labels=["comfyui_instance"],
        )
        total = GaugeMetricFamily(
            "comfyui_gpu_memory_total_bytes",
            "GPU memory in all (ComfyUI's /system_stats, devices[0]; 0 on CPU).",
            labels=["comfyui_instance"],
        )
        for name, (vram_total, vram_used) in sorted(self.stats.vram.items()):
            used.add_metric([name], vram_used)
            total.add_metric([name], vram_total)
        yield used
        yield total
        yield InfoMetricFamily(
            "comfyui_sidecar",
            "The sidecar's version and ComfyUI's (empty until ComfyUI answered).",
            value={"version": sidecar.version, "comfyui_version": self.stats.comfyui_version},
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _Scraped:
    """The per-sidecar half of a scrape: its collector on a registry of its own."""

    def __init__(self, sidecar: Scraped) -> None:
        self.stats = SystemStats()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SidecarCollector(sidecar, self.stats))


_SCRAPED: weakref.WeakKeyDictionary[Scraped, _Scraped] = weakref.WeakKeyDictionary()


async def exposition(sidecar: Scraped) -> bytes:
    """The text exposition of every metric, ``sidecar``'s state included."""
    scraped = _SCRAPED.get(sidecar)
    if scraped is None:
        scraped = _SCRAPED[sidecar] = _Scraped(sidecar)
    with contextlib.suppress(Exception):  # the scrape answers from the cache whatever happens
        await scraped.stats.fresh(sidecar.instances, SCRAPE_WAIT_S)
    return generate_latest(REGISTRY) + generate_latest(scraped.registry)
