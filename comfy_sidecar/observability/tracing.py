"""OpenTelemetry traces: one trace per job, exported over OTLP/HTTP (protobuf).

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set
(and ``OTEL_SDK_DISABLED`` is not ``true``). Off, nothing of OpenTelemetry is imported and
every helper here answers :data:`NO_SPAN`, a shared object whose methods do nothing: no span,
no context variable set, no time read. On (:func:`setup`, at start-up), the SDK configures
itself from the standard variables: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``
(the resource; ``service.name`` defaults to ``comfy-sidecar``, ``service.version`` is the
sidecar's, ``service.instance.id`` the SDK's random UUID per process),
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (default ``parentbased_always_on``),
``OTEL_BSP_*`` (the batch processor: ``OTEL_BSP_SCHEDULE_DELAY`` ms between exports, default
5000) and ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers, timeout, compression, certificates).
The exporter is the SDK's OTLP/HTTP one, with the SDK's own protobuf encoding
(:mod:`comfy_sidecar.observability.span_export` hands it our spans as the SDK's
``ReadableSpan``).

The spans of one job (README "Operating it" shows a tree as the tests print it):

- ``job``: the root, from the request that made the job (kind SERVER), continuing the
  caller's W3C ``traceparent``; it lasts until the job ended (a 202's job outlives its
  request). In queue mode (``JOB_QUEUE_URL``) the request's span is ``job.submit``
  (PRODUCER), its context travels with the job in Redis, and the replica that claims the job
  runs it under a ``job`` span (CONSUMER) that is its child: one trace across replicas.
- children of the job: ``prepare`` (with a ``download`` per URL input: ``url.full``
  scrubbed of credentials, ``cache.hit``, ``download.bytes``), ``queue.wait`` (waiting for a
  slot on a ready ComfyUI), ``comfyui.execute`` (from ``POST /prompt`` to the job's end, with
  a ``comfyui.node`` child per node that ran or was served from ComfyUI's cache, timed from
  the websocket frames: ``comfyui.node.id``, ``comfyui.node.class_type``,
  ``comfyui.node.cached``), ``outputs.collect``, ``convert``, ``upload`` (one per file) and
  ``webhook`` (one per delivery attempt, ``webhook.attempt``,
  ``http.response.status_code``).

A failure is recorded on the span it happened in (status ERROR, an ``exception`` event) and
on the job's root. Spans below the root exist only inside a job's trace: a helper asked for a
child where no span is current answers :data:`NO_SPAN` (no stray traces from start-up
downloads or system events).

Outgoing calls carry the current span's ``traceparent`` (:func:`traceparent`): storage
requests, webhooks, and ComfyUI's ``POST /prompt`` (in ``extra_data``). With tracing off they
forward the request's own ``traceparent`` as received. Log records carry the job's trace id
(:data:`comfy_sidecar.observability.logs.TRACE_ID` is set when a job's root span starts).

How spans are made: the SDK configures everything (resource, sampler, batch processor,
exporter), but a live span is this module's :class:`Span`, a few slots filled as the job goes,
handed as it is to the batch processor when it ends; the exporter's thread makes it the SDK's
``ReadableSpan`` (:meth:`Span.readable`) and the SDK's OTLP exporter encodes and sends it, off
the event loop. The SDK's own
``Tracer.start_span``/``end`` cost about 60 µs per span inside the sidecar (its sampler,
bounded attributes, locks and processor hooks on every span); these cost a fifth of that
(bench/tracing_bench.py). The sampler decides once per trace, at its root (with the caller's
context: ``parentbased_*`` samplers follow the caller's flag); the spans below it follow the
root, as ``parentbased_*`` would have them. Span limits (``OTEL_SPAN_*_LIMIT``) are not
applied: the sidecar sets a few attributes per span. The current span is this module's own
context variable (:data:`_CURRENT`), not OpenTelemetry's context.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any

from comfy_sidecar.observability.logs import TRACE_ID, TRACEPARENT

__all__ = [
    "NO_SPAN",
    "NoSpan",
    "Span",
    "configured",
    "current",
    "enabled",
    "job_span",
    "setup",
    "shutdown",
    "span",
    "start",
    "traceparent",
    "use",
]

Attributes = Mapping[str, str | bool | int | float]


class _Sdk:
    """What the spans use of the SDK, made once by :func:`setup`: where ended spans go (the
    batch processor's ``on_end``; its exporter is
    :class:`~comfy_sidecar.observability.span_export.SidecarSpans`), the sampler, the id
    generator, the W3C propagator."""

    def __init__(self, provider: Any, processor: Any, exporter: Any) -> None:
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.exporter = exporter
        self.on_end = processor.on_end
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        # What the batch processor checks of each span it is handed: a sampled one's context.
        Span.context = SpanContext(1, 1, False, TraceFlags(TraceFlags.SAMPLED))
        self.propagator = TraceContextTextMapPropagator()
        self.parent_of = get_current_span
        self.kinds = {
            "server": SpanKind.SERVER,
            "producer": SpanKind.PRODUCER,
            "consumer": SpanKind.CONSUMER,
            "client": SpanKind.CLIENT,
            "internal": SpanKind.INTERNAL,
        }
        self.kind_values = {name: kind.value for name, kind in self.kinds.items()}


#: ``Status.code`` ERROR.
_ERROR = 2

#: The SDK while tracing is on, else None.
_sdk: _Sdk | None = None
#: The span the running task works under (see the module docstring).
_CURRENT: ContextVar[Span | None] = ContextVar("comfy_sidecar_span", default=None)


def configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``env`` (default ``os.environ``) turns tracing on: an OTLP endpoint for traces
    is set and ``OTEL_SDK_DISABLED`` is not ``true``."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def enabled() -> bool:
    """Whether spans are being made (after :func:`setup` turned tracing on)."""
    return _sdk is not None


def setup(version: str, env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on when :func:`configured` says so: the SDK's TracerProvider (its
    resource, and its sampler from ``OTEL_TRACES_SAMPLER``), a BatchSpanProcessor
    (``OTEL_BSP_*``) and an OTLPSpanExporter over HTTP (``OTEL_EXPORTER_OTLP_*``), all
    configured by the SDK from the environment, the exporter behind
    :class:`~comfy_sidecar.observability.span_export.SidecarSpans` (it makes the sidecar's
    spans SDK ``ReadableSpan`` objects); ``version`` is ``service.version``. Only then
    is OpenTelemetry imported. Returns whether tracing is on."""
    global _sdk
    if not configured(env) or _sdk is not None:
        return _sdk is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from comfy_sidecar.observability.span_export import SidecarSpans

    resource = Resource.create({"service.version": version})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "comfy-sidecar"}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    exporter = SidecarSpans(
        OTLPSpanExporter(), provider.resource, InstrumentationScope("comfy_sidecar", version)
    )
    processor = BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    _sdk = _Sdk(provider, processor, exporter)
    return True


def shutdown(timeout_s: float = 5.0) -> None:
    """Export the spans still buffered (within ``timeout_s`` seconds), then stop the exporter:
    an export still retrying against an absent collector gives up at once, and the batch
    processor's daemon thread ends with the process. Spans ending later are dropped. Nothing
    when tracing is off."""
    global _sdk
    sdk = _sdk
    if sdk is None:
        return
    _sdk = None
    sdk.provider.force_flush(timeout_millis=max(1, int(timeout_s * 1000)))
    sdk.exporter.shutdown()


class NoSpan:
    """What every helper answers while tracing is off or outside a job's trace: each method
    does nothing, and it is its own ``with`` block."""

    __slots__ = ()

    recording = False
    traceparent: str | None = None

    def set(self, key: str, value: str | bool | int | float) -> None:
        """Nothing."""

    def error(self, failure: BaseException | str, exception_type: str | None = None) -> None:
        """Nothing."""

    def end(self, end_ns: int | None = None) -> None:
        """Nothing."""

    def __enter__(self) -> NoSpan:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


#: The span of nothing (see :class:`NoSpan`).
NO_SPAN = NoSpan()


class Span:
    """One span of a job's trace: :meth:`set` an attribute, record an :meth:`error`,
    :meth:`end` it (it then goes to the SDK's batch processor, when its trace is sampled). As
    a ``with`` block (what :func:`span` answers) it is the current span inside the block,
    records the exception that leaves it and ends there. ``recording``: the trace is sampled
    (its attributes are worth computing)."""

    #: As a parent, a span of this process (a SpanContext's ``is_remote``).
    is_remote = False
    #: For the batch processor, which exports spans whose context says sampled (only those
    #: are handed to it); set by :func:`setup`.
    context: Any = None

    __slots__ = (
        "_attributes",
        "_end",
        "_events",
        "_kind",
        "_name",
        "_parent",
        "_start",
        "_state",
        "_status",
        "_token",
        "recording",
        "span_id",
        "trace_id",
    )

    def __init__(
        self,
        name: str,
        kind: int,
        trace_id: int,
        span_id: int,
        parent: Any,
        sampled: bool,
        state: Any,
        attributes: Attributes | None,
        start_ns: int | None,
    ) -> None:
        self._name = name
        self._kind = kind
        self.trace_id = trace_id
        self.span_id = span_id
        self._parent = parent  # the parent Span or remote SpanContext; None: a new trace
        self.recording = sampled
        self._state = state
        self._attributes: dict[str, Any] = dict(attributes) if attributes else {}
        self._events: list[tuple[str, int, dict[str, Any]]] | None = None
        self._status: tuple[int, str] | None = None
        self._start = start_ns or time.time_ns()
        self._end = 0
        self._token: Token[Span | None] | None = None

    def set(self, key: str, value: str | bool | int | float) -> None:
        """Set the attribute ``key`` (not once the span has ended)."""
        if not self._end:
            self._attributes[key] = value

    def error(self, failure: BaseException | str, exception_type: str | None = None) -> None:
        """Mark the span failed: status ERROR with ``failure``'s text. An exception also adds
        the ``exception`` event (type, message, stack trace), as does a message with its
        ``exception_type`` (an error reported by ComfyUI: type and message)."""
        sdk = _sdk
        if sdk is None or not self.recording or self._end:
            return
        if isinstance(failure, BaseException):
            import traceback

            kind = type(failure)
            module = kind.__module__
            name = f"{module}.{kind.__qualname__}" if module != "builtins" else kind.__qualname__
            attributes = {
                "exception.type": name,
                "exception.message": str(failure),
                "exception.stacktrace": "".join(traceback.format_exception(failure)),
                "exception.escaped": "False",
            }
            text = f"{kind.__name__}: {failure}"
        elif exception_type:
            attributes = {"exception.type": exception_type, "exception.message": failure}
            text = f"{exception_type}: {failure}"
        else:
            attributes, text = {}, failure
        if attributes:
            if self._events is None:
                self._events = []
            self._events.append(("exception", time.time_ns(), attributes))
        self._status = (_ERROR, text)

    def end(self, end_ns: int | None = None) -> None:
        """End the span now, or at ``end_ns`` (ns since the epoch), and hand it to the batch
        processor (a sampled trace's): it waits there as it is, and the exporter's thread
        makes it a ``ReadableSpan`` (:meth:`readable`). Later calls do nothing."""
        if self._end:
            return
        self._end = end_ns or time.time_ns()
        sdk = _sdk
        if sdk is not None and self.recording:
            sdk.on_end(self)

    def readable(self, resource: Any, scope: Any) -> Any:
        """This ended span as the SDK's ``ReadableSpan`` under ``resource`` (an SDK
        ``Resource``) and ``scope`` (an ``InstrumentationScope``): what the SDK's exporters
        take. Called by the exporter, in its thread: the span no longer changes."""
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        sampled = TraceFlags(TraceFlags.SAMPLED)
        parent = self._parent
        if isinstance(parent, Span):
            parent = SpanContext(parent.trace_id, parent.span_id, False, sampled, self._state)
        status = self._status
        return ReadableSpan(
            name=self._name,
            context=SpanContext(self.trace_id, self.span_id, False, sampled, self._state),
            parent=parent,
            resource=resource,
            attributes=self._attributes,
            events=[
                Event(name, attributes, timestamp)
                for name, timestamp, attributes in self._events or ()
            ],
            kind=SpanKind(self._kind),
            instrumentation_scope=scope,
            status=Status(StatusCode(status[0]), status[1]) if status else Status(),
            start_time=self._start,
            end_time=self._end,
        )

    @property
    def traceparent(self) -> str:
        """This span's W3C ``traceparent`` header value (version 00)."""
        flags = "01" if self.recording else "00"
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{flags}"

    def __enter__(self) -> Span:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None
        if e is not None:
            self.error(e)
        self.end()


class _Use:
    """``with use(span)``: ``span`` is the current span inside the block (not ended there)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._token: Token[Span | None] | None = None

    def __enter__(self) -> Span:
        self._token = _CURRENT.set(self._span)
        return self._span

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)


def job_span(
    name: str,
    carrier: str | None,
    attributes: Attributes | None = None,
    *,
    kind: str = "server",
) -> Span | NoSpan:
    """Start the root of a job's trace: span ``name`` (``job``, ``job.submit``) whose
    parent is the remote span of ``carrier`` (a W3C ``traceparent`` value: the request's
    header, or the one a job brought from Redis), or a new trace when it is None or invalid.
    ``kind``: ``server`` (a request), ``producer`` (a queue submission) or ``consumer`` (a job
    claimed from the queue). The sampler decides here, for the whole trace. The current
    task's log records carry its trace id from here on. Not made current: wrap the job's work
    in :func:`use`; end it when the job ended."""
    sdk = _sdk
    if sdk is None:
        return NO_SPAN
    from opentelemetry.context import Context

    context = Context()
    parent = None
    if carrier:
        context = sdk.propagator.extract({"traceparent": carrier})
        parent = sdk.parent_of(context).get_span_context()
        if not parent.is_valid:
            parent = None
    trace_id = parent.trace_id if parent is not None else sdk.ids.generate_trace_id()
    decision = sdk.sampler.should_sample(context, trace_id, name, sdk.kinds[kind], attributes)
    root = Span(
        name,
        sdk.kind_values[kind],
        trace_id,
        sdk.ids.generate_span_id(),
        parent,
        decision.decision.is_sampled(),
        decision.trace_state,
        {**(attributes or {}), **(decision.attributes or {})},
        None,
    )
    TRACE_ID.set(f"{trace_id:032x}")
    return root


def current() -> Span | NoSpan:
    """The span the running task works under, or :data:`NO_SPAN`."""
    return _CURRENT.get() or NO_SPAN


def start(
    name: str,
    attributes: Attributes | None = None,
    *,
    parent: Span | NoSpan | None = None,
    start_ns: int | None = None,
    kind: str = "internal",
) -> Span | NoSpan:
    """Start span ``name``, a child of ``parent`` (default: the current span), not made
    current; the caller ends it. ``start_ns``: its start, in ns since the epoch (default
    now). :data:`NO_SPAN` when there is no parent (off, or outside a job's trace)."""
    sdk = _sdk
    if sdk is None:
        return NO_SPAN
    owner = parent if parent is not None else _CURRENT.get()
    if not isinstance(owner, Span):
        return NO_SPAN
    return Span(
        name,
        sdk.kind_values[kind],
        owner.trace_id,
        sdk.ids.generate_span_id(),
        owner,
        owner.recording,
        owner._state,
        attributes,
        start_ns,
    )


def span(name: str, attributes: Attributes | None = None) -> Span | NoSpan:
    """A child of the current span for a ``with`` block: current inside it, failed by the
    exception that leaves it, ended at its end. :data:`NO_SPAN` outside a job's trace."""
    if _sdk is None:
        return NO_SPAN
    return start(name, attributes)


def use(span: Span | NoSpan) -> _Use | NoSpan:
    """A ``with`` block in which ``span`` is the current span (it is not ended there)."""
    if isinstance(span, Span):
        return _Use(span)
    return NO_SPAN


def traceparent() -> str | None:
    """The ``traceparent`` for an outgoing call made now: the current span's, else the
    request's own header as received (:data:`~comfy_sidecar.observability.logs.TRACEPARENT`),
    else None."""
    active = _CURRENT.get()
    if active is not None:
        return active.traceparent
    return TRACEPARENT.get()
