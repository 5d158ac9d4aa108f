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
The exporter is the SDK's OTLP/HTTP one; only its protobuf encoding is ours
(:mod:`comfy_sidecar.observability.otlp`: the same bytes for half the CPU).

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

The current span is this module's own context variable (:data:`_CURRENT`), not
OpenTelemetry's context: parents are passed to the SDK explicitly.
"""

from __future__ import annotations

import os
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

#: The tracer while tracing is on (an ``opentelemetry.sdk.trace.Tracer``), else None.
_tracer: Any = None
#: The SDK objects to flush and shut down at exit: (provider, exporter).
_sdk: tuple[Any, Any] | None = None


class _Api:
    """What the helpers use of OpenTelemetry's API, imported once by :func:`setup` (a
    function-level import on every span costs more than the span's own bookkeeping)."""

    def __init__(self) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.empty = Context()
        self.propagator = TraceContextTextMapPropagator()
        self.in_context = set_span_in_context
        self.failed = StatusCode.ERROR
        self.status = Status
        self.kinds = {
            "server": SpanKind.SERVER,
            "producer": SpanKind.PRODUCER,
            "consumer": SpanKind.CONSUMER,
            "client": SpanKind.CLIENT,
            "internal": SpanKind.INTERNAL,
        }


_api: _Api | None = None
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
    return _tracer is not None


def setup(version: str, env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on when :func:`configured` says so: the SDK's TracerProvider (its
    sampler from ``OTEL_TRACES_SAMPLER``), a BatchSpanProcessor (``OTEL_BSP_*``) and an
    OTLPSpanExporter over HTTP (``OTEL_EXPORTER_OTLP_*``), all configured by the SDK from
    the environment; ``version`` is ``service.version``. Only then is OpenTelemetry imported.
    Returns whether tracing is on."""
    global _tracer, _sdk, _api
    if not configured(env) or _tracer is not None:
        return _tracer is not None
    from opentelemetry.exporter.otlp.proto.http import trace_exporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from comfy_sidecar.observability import otlp

    # The exporter serializes ``encode_spans(spans)``: the same bytes from our encoder, at
    # half the CPU (comfy_sidecar/observability/otlp.py); everything else is the exporter's.
    if hasattr(trace_exporter, "encode_spans"):
        trace_exporter.encode_spans = otlp.Request

    resource = Resource.create({"service.version": version})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "comfy-sidecar"}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _api = _Api()
    _tracer = provider.get_tracer("comfy_sidecar", version)
    _sdk = (provider, exporter)
    return True


def shutdown(timeout_s: float = 5.0) -> None:
    """Export the spans still buffered (within ``timeout_s`` seconds), then stop the exporter:
    an export still retrying against an absent collector gives up at once, and the batch
    processor's daemon thread ends with the process. Nothing when tracing is off."""
    global _tracer, _sdk
    if _sdk is None:
        return
    provider, exporter = _sdk
    _tracer, _sdk = None, None  # _api stays: spans still open may end or fail
    provider.force_flush(timeout_millis=max(1, int(timeout_s * 1000)))
    exporter.shutdown()


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
    """One OpenTelemetry span (the SDK's, wrapped): :meth:`set` an attribute, record an
    :meth:`error`, :meth:`end` it. As a ``with`` block (what :func:`span` answers) it is the
    current span inside the block, records the exception that leaves it and ends there."""

    __slots__ = ("_context", "_span", "_token")

    recording = True

    def __init__(self, span: Any) -> None:
        self._span = span
        self._context: Any = None
        self._token: Token[Span | None] | None = None

    def set(self, key: str, value: str | bool | int | float) -> None:
        """Set the attribute ``key``."""
        self._span.set_attribute(key, value)

    def error(self, failure: BaseException | str, exception_type: str | None = None) -> None:
        """Mark the span failed: status ERROR with ``failure``'s text. An exception also adds
        the ``exception`` event (type, message, stack trace), as does a message with its
        ``exception_type`` (an error reported by ComfyUI: type and message)."""
        api = _api
        if api is None:  # tracing was shut down meanwhile
            return
        if isinstance(failure, BaseException):
            self._span.record_exception(failure)
            text = f"{type(failure).__name__}: {failure}"
        elif exception_type:
            self._span.add_event(
                "exception", {"exception.type": exception_type, "exception.message": failure}
            )
            text = f"{exception_type}: {failure}"
        else:
            text = failure
        self._span.set_status(api.status(api.failed, text))

    def end(self, end_ns: int | None = None) -> None:
        """End the span now, or at ``end_ns`` (ns since the epoch); later calls do nothing."""
        self._span.end(end_time=end_ns)

    @property
    def traceparent(self) -> str:
        """This span's W3C ``traceparent`` header value (version 00)."""
        ctx = self._span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    @property
    def trace_id(self) -> str:
        """The trace id, 32 hex digits (what the logs' ``trace_id`` holds)."""
        return f"{self._span.get_span_context().trace_id:032x}"

    def context(self) -> Any:
        """An OpenTelemetry context whose span is this one (the parent of its children)."""
        if self._context is None and _api is not None:
            self._context = _api.in_context(self._span)
        return self._context

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
    claimed from the queue). The current task's log records carry its trace id from here on.
    Not made current: wrap the job's work in :func:`use`; end it when the job ended."""
    tracer, api = _tracer, _api
    if tracer is None or api is None:
        return NO_SPAN
    parent = api.empty
    if carrier:
        parent = api.propagator.extract({"traceparent": carrier})
    root = Span(
        tracer.start_span(name, context=parent, kind=api.kinds[kind], attributes=attributes)
    )
    TRACE_ID.set(root.trace_id)
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
    tracer, api = _tracer, _api
    if tracer is None or api is None:
        return NO_SPAN
    owner = parent if parent is not None else _CURRENT.get()
    if not isinstance(owner, Span):
        return NO_SPAN
    return Span(
        tracer.start_span(
            name,
            context=owner.context(),
            kind=api.kinds[kind],
            attributes=attributes,
            start_time=start_ns,
        )
    )


def span(name: str, attributes: Attributes | None = None) -> Span | NoSpan:
    """A child of the current span for a ``with`` block: current inside it, failed by the
    exception that leaves it, ended at its end. :data:`NO_SPAN` outside a job's trace."""
    if _tracer is None:
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
