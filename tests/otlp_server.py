"""A real OTLP/HTTP trace receiver on loopback for the tracing tests: ``POST /v1/traces`` with
an ``ExportTraceServiceRequest`` in protobuf (gzip or not), decoded with ``opentelemetry-proto``
into :class:`Got` spans; answers 200 with an empty ``ExportTraceServiceResponse``.

``server.wait_spans(predicate)`` waits for the spans received so far to satisfy a condition;
``tree(spans)`` prints one trace as an indented tree (the README shows one).
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.receiver import QuietServer
from tests.waiting import wait_for

#: Span kinds by their protobuf number.
KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


@dataclass
class Got:
    """One span as the collector received it: ids in hex, times in ns since the epoch,
    ``status`` 0 unset / 1 ok / 2 error, ``events`` as ``(name, attributes)``, ``resource``
    the attributes of the process that sent it, ``scope`` its instrumentation scope's
    ``(name, version)``."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: int
    status_message: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    resource: dict[str, Any] = field(default_factory=dict)
    scope: tuple[str, str] = ("", "")

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def failed(self) -> bool:
        return self.status == 2


def _value(value: Any) -> Any:
    """An ``AnyValue`` as Python."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _attributes(items: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


def decode(body: bytes) -> list[Got]:
    """The spans of one ``ExportTraceServiceRequest``."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[Got] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope in resource_spans.scope_spans:
            for span in scope.spans:
                spans.append(
                    Got(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=KINDS.get(span.kind, str(span.kind)),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attributes(span.attributes),
                        status=span.status.code,
                        status_message=span.status.message,
                        events=[(e.name, _attributes(e.attributes)) for e in span.events],
                        resource=resource,
                        scope=(scope.scope.name, scope.scope.version),
                    )
                )
    return spans


class OtlpServer(QuietServer):
    """Receives OTLP/HTTP protobuf trace exports on 127.0.0.1; ``endpoint`` is what
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes. Every span received is in :attr:`spans`; every
    export's headers in :attr:`exports`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[Got] = []
        self.exports: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def received(self) -> list[Got]:
        with self.lock:
            return list(self.spans)

    def wait_spans(
        self, predicate: Callable[[list[Got]], Any], *, timeout: float = 30.0, what: str
    ) -> list[Got]:
        """The spans received once ``predicate(spans)`` is true (polled)."""
        return wait_for(
            lambda: predicate(spans := self.received()) and spans, timeout=timeout, what=what
        )

    def trace(self, trace_id: str) -> list[Got]:
        """The spans of one trace received so far."""
        return [s for s in self.received() if s.trace_id == trace_id]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: OtlpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.headers.get("content-encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces":
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        spans = decode(body)
        with self.server.lock:
            self.server.spans.extend(spans)
            self.server.exports.append(dict(self.headers.items()))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def children(spans: list[Got], parent_id: str) -> list[Got]:
    """The spans whose parent is ``parent_id``, by start time."""
    return sorted((s for s in spans if s.parent_id == parent_id), key=lambda s: s.start_ns)


#: Attributes printed after a span's name in :func:`tree`, in this order.
SHOWN = (
    "job.endpoint",
    "url.full",
    "cache.hit",
    "download.bytes",
    "comfyui.instance",
    "comfyui.node.id",
    "comfyui.node.class_type",
    "comfyui.node.cached",
    "comfy_sidecar.outputs",
    "upload.bytes",
    "webhook.attempt",
    "http.response.status_code",
)


def tree(spans: list[Got], root: Got | None = None) -> str:
    """One trace as an indented tree: each span's name, kind (when not internal), shown
    attributes, duration and ``ERROR: <message>`` when failed; children by start time."""
    ids = {s.span_id for s in spans}
    roots = [root] if root is not None else [s for s in spans if s.parent_id not in ids]
    lines: list[str] = []

    def show(span: Got, prefix: str, last: bool, top: bool) -> None:
        attrs = " ".join(
            f"{key.rsplit('.', 1)[-1] if key.startswith('comfyui.node') else key}="
            f"{span.attributes[key]}"
            for key in SHOWN
            if key in span.attributes
        )
        kind = "" if span.kind == "internal" else f" [{span.kind}]"
        failed = f"  ERROR: {span.status_message}" if span.failed else ""
        branch = "" if top else ("└─ " if last else "├─ ")
        text = f"{span.name}{kind} {attrs}".rstrip()
        lines.append(f"{prefix}{branch}{text}  {span.ms:.1f} ms{failed}")
        below = children(spans, span.span_id)
        deeper = prefix if top else prefix + ("   " if last else "│  ")
        for i, child in enumerate(below):
            show(child, deeper, i == len(below) - 1, False)

    for span in sorted(roots, key=lambda s: s.start_ns):
        show(span, "", True, True)
    return "\n".join(lines)
