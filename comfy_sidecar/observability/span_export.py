"""The exporter of the sidecar's spans: an SDK ``SpanExporter`` in front of the SDK's
``OTLPSpanExporter`` (OTLP/HTTP, protobuf).

The batch processor holds the sidecar's own ended spans
(:class:`comfy_sidecar.observability.tracing.Span`) as they are; in the processor's export
thread, :meth:`SidecarSpans.export` makes each one the SDK's ``ReadableSpan``
(:meth:`~comfy_sidecar.observability.tracing.Span.readable`: under this process's resource and
instrumentation scope) and hands the batch to the OTLP exporter, which encodes it with the
SDK's own encoder and sends it. An SDK span in a batch is passed on as it is. Public SDK API
only. Imported only when tracing is on
(:func:`comfy_sidecar.observability.tracing.setup`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = ["SidecarSpans"]


class SidecarSpans(SpanExporter):
    """Exports batches through ``exporter`` (the SDK's ``OTLPSpanExporter``, or any
    ``SpanExporter``), the sidecar's spans (what is not already a ``ReadableSpan``: objects
    with ``readable(resource, scope)``) made ``ReadableSpan``s under ``resource`` and
    ``scope`` first. ``shutdown`` and ``force_flush`` are the exporter's."""

    def __init__(
        self, exporter: SpanExporter, resource: Resource, scope: InstrumentationScope
    ) -> None:
        self.exporter = exporter
        self.resource = resource
        self.scope = scope

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        """Export ``spans`` (ended: they no longer change): the OTLP exporter's result
        (``SUCCESS``, or ``FAILURE`` once its retries gave up)."""
        readable: list[ReadableSpan] = [
            s if isinstance(s, ReadableSpan) else s.readable(self.resource, self.scope)
            for s in spans
        ]
        return self.exporter.export(readable)

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)
