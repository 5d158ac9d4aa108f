"""The OTLP protobuf encoding of finished spans, written by hand: the bytes of an
``ExportTraceServiceRequest`` (opentelemetry-proto's ``collector/trace/v1``), the same message
the SDK's ``encode_spans`` builds, at less than half its CPU (the SDK builds a protobuf object
per span, attribute and value, and hashes each span's resource as JSON to group them; here
the attributes that repeat, such as a node's class_type, are encoded once).

:func:`encode` is what the OTLP/HTTP exporter serializes when tracing is on
(:func:`comfy_sidecar.observability.tracing.setup` hands it :class:`Request`); its output is
checked against the SDK's encoder in tests/core/test_tracing.py. A batch holding something
this encoder does not write (a span link, an attribute of another type) is encoded by the
SDK's own encoder instead. Imported only when tracing is on.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Producer", "Request", "Unsupported", "encode", "finished"]

_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_double = struct.Struct("<d").pack

#: ``SpanFlags``: the parent's ``is_remote`` is known (always), and true.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_FLAGS_LOCAL = b"\x85\x01" + _fixed32(_HAS_IS_REMOTE)  # Span.flags (field 16, fixed32)
_FLAGS_REMOTE = b"\x85\x01" + _fixed32(_HAS_IS_REMOTE | _IS_REMOTE)


class Unsupported(Exception):
    """A span holds something :func:`encode` does not write (the SDK's encoder does)."""


def _varint(n: int) -> bytes:
    """A protobuf varint of ``n`` (>= 0)."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: ``tag``, the length, ``payload``."""
    return tag + _varint(len(payload)) + payload


def _text(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode("utf-8"))


def _value(value: Any) -> bytes:
    """An ``AnyValue``'s fields (a oneof: written even when it holds its type's zero)."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _text(b"\x0a", value)
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if value is None:
        return b""
    if isinstance(value, Mapping):
        return _field(
            b"\x32",
            b"".join(
                _field(b"\x0a", _text(b"\x0a", str(k)) + _field(b"\x12", _value(v)))
                for k, v in value.items()
            ),
        )
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _value(v)) for v in value))
    raise Unsupported(f"attribute value of type {type(value).__name__}")


#: Encoded ``KeyValue`` fields of attributes seen lately, by (tag, key, value): most repeat
#: (a node's class_type, a flag). Emptied when it holds :data:`_PAIRS_MAX`.
_pairs: dict[tuple[bytes, str, Any], bytes] = {}
_PAIRS_MAX = 4096


def _pair(tag: bytes, key: str, value: Any) -> bytes:
    """``KeyValue`` ``key``: ``value`` as field ``tag``."""
    cacheable = isinstance(value, str | bool | int | float) and len(_pairs) < _PAIRS_MAX
    if cacheable:
        # bool is an int: True and 1 must not share an entry
        entry = (tag, key, (type(value), value))
        found = _pairs.get(entry)
        if found is not None:
            return found
    encoded = _field(tag, _text(b"\x0a", key) + _field(b"\x12", _value(value)))
    if cacheable:
        _pairs[entry] = encoded
    elif len(_pairs) >= _PAIRS_MAX:
        _pairs.clear()
    return encoded


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Each ``KeyValue`` of ``attributes`` as field ``tag``."""
    if not attributes:
        return b""
    return b"".join([_pair(tag, key, value) for key, value in attributes.items()])


def _status(status: Any) -> bytes:
    """``Status``: its message (field 2) and code (field 3), always present."""
    if not status.description and status.is_unset:
        return b"\x7a\x00"
    payload = b""
    if status.description:
        payload += _text(b"\x12", status.description)
    code = status.status_code.value
    if code:
        payload += b"\x18" + _varint(code)
    return _field(b"\x7a", payload)


def _event(event: Any) -> bytes:
    payload = b"\x09" + _fixed64(event.timestamp) + _text(b"\x12", event.name)
    payload += _attributes(b"\x1a", event.attributes)
    if event.dropped_attributes:
        payload += b"\x20" + _varint(event.dropped_attributes)
    return _field(b"\x5a", payload)


#: Encoded span names (field 5) and kinds (field 6): a handful.
_names: dict[str, bytes] = {}
_kinds: dict[Any, bytes] = {}


def _span(span: Any) -> bytes:
    """One ``Span`` message's bytes (without its tag)."""
    if span.links:
        raise Unsupported("span links")
    context = span.get_span_context()
    parts = [
        b"\x0a\x10",
        context.trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        context.span_id.to_bytes(8, "big"),
    ]
    state = context.trace_state
    if state:
        parts.append(_text(b"\x1a", ",".join(f"{k}={v}" for k, v in state.items())))
    parent = span.parent
    if parent:
        parts.append(b"\x22\x08")
        parts.append(parent.span_id.to_bytes(8, "big"))
    name = _names.get(span.name)
    if name is None:
        name = _text(b"\x2a", span.name)
        if len(_names) < _PAIRS_MAX:
            _names[span.name] = name
    parts.append(name)
    kind = _kinds.get(span.kind)
    if kind is None:
        kind = _kinds[span.kind] = b"\x30" + _varint(span.kind.value + 1)  # SDK 0 = proto 1
    parts.append(kind)
    parts.append(b"\x39" + _fixed64(span.start_time or 0))
    parts.append(b"\x41" + _fixed64(span.end_time or 0))
    parts.append(_attributes(b"\x4a", span.attributes))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    for event in span.events:
        parts.append(_event(event))
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))
    parts.append(_status(span.status))
    parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(parts)


def _scope(scope: Any) -> bytes:
    """``InstrumentationScope`` (field 1 of ``ScopeSpans``), always present."""
    if scope is None:
        return b"\x0a\x00"
    payload = _text(b"\x0a", scope.name) if scope.name else b""
    if scope.version:
        payload += _text(b"\x12", scope.version)
    payload += _attributes(b"\x1a", scope.attributes)
    return _field(b"\x0a", payload)


def encode(spans: Sequence[Any]) -> bytes:
    """The serialized ``ExportTraceServiceRequest`` of ``spans`` (SDK ``ReadableSpan``s),
    grouped as the SDK groups them: by resource, then by instrumentation scope, in order.
    Raises :class:`Unsupported` for a span it does not write."""
    groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope
        scopes = groups.setdefault(id(resource), (resource, {}))[1]
        scopes.setdefault(id(scope), (scope, []))[1].append(_field(b"\x12", _span(span)))
    out = []
    for resource, scopes in groups.values():
        payload = _field(b"\x0a", _attributes(b"\x0a", resource.attributes))
        for scope, encoded in scopes.values():
            body = _scope(scope) + b"".join(encoded)
            if scope is not None and scope.schema_url:
                body += _text(b"\x1a", scope.schema_url)
            payload += _field(b"\x12", body)
        if resource.schema_url:
            payload += _text(b"\x1a", resource.schema_url)
        out.append(_field(b"\x0a", payload))
    return b"".join(out)


class Producer:
    """Where this process's spans come from: its resource and instrumentation scope, encoded
    once, and the type of its own spans (``ours``: objects with an ``encode()`` that answers
    their ``ScopeSpans.spans`` field, as :func:`finished` makes it). :class:`Request` puts
    them under one ``ResourceSpans``."""

    def __init__(self, resource: Any, scope: Any, ours: type) -> None:
        self.resource = _field(b"\x0a", _attributes(b"\x0a", resource.attributes))
        self.resource_url = _text(b"\x1a", resource.schema_url) if resource.schema_url else b""
        self.scope = _scope(scope)
        self.ours: Any = ours

    def request(self, spans: Sequence[bytes]) -> bytes:
        """One ``ResourceSpans`` (field 1 of the request) holding the encoded ``spans``."""
        scope_spans = _field(b"\x12", self.scope + b"".join(spans))
        return _field(b"\x0a", self.resource + scope_spans + self.resource_url)


#: This process's producer (set when tracing is on).
producer: Producer | None = None


def finished(
    trace_id: int,
    span_id: int,
    parent: Any,
    state: Any,
    name: str,
    kind: int,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any],
    events: Sequence[tuple[str, int, Mapping[str, Any]]] | None,
    status: tuple[int, str] | None,
) -> bytes:
    """A finished span, encoded as the SDK's encoder would encode its ``ReadableSpan`` (as a
    ``ScopeSpans.spans`` field: tag, length, ``Span``):
    ``parent`` the parent's SpanContext (None for a new trace), ``state`` the trace state,
    ``kind`` the SDK's SpanKind value, ``events`` ``(name, time_ns, attributes)``, ``status``
    ``(code, description)`` (None: unset)."""
    parts = [
        b"\x0a\x10",
        trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        span_id.to_bytes(8, "big"),
    ]
    if state:
        parts.append(_text(b"\x1a", ",".join(f"{k}={v}" for k, v in state.items())))
    if parent is not None:
        parts.append(b"\x22\x08")
        parts.append(parent.span_id.to_bytes(8, "big"))
    encoded_name = _names.get(name)
    if encoded_name is None:
        encoded_name = _text(b"\x2a", name)
        if len(_names) < _PAIRS_MAX:
            _names[name] = encoded_name
    parts.append(encoded_name)
    parts.append(_KINDS[kind])
    parts.append(b"\x39" + _fixed64(start_ns))
    parts.append(b"\x41" + _fixed64(end_ns))
    for key, value in attributes.items():
        parts.append(_pair(b"\x4a", key, value))
    for event_name, time_ns, event_attributes in events or ():
        payload = b"\x09" + _fixed64(time_ns) + _text(b"\x12", event_name)
        payload += _attributes(b"\x1a", event_attributes)
        parts.append(_field(b"\x5a", payload))
    if status is None:
        parts.append(b"\x7a\x00")
    else:
        code, description = status
        payload = _text(b"\x12", description) if description else b""
        parts.append(_field(b"\x7a", payload + (b"\x18" + _varint(code) if code else b"")))
    parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return _field(b"\x12", b"".join(parts))


#: Span.kind (field 6) by the SDK's SpanKind value (INTERNAL 0 .. CONSUMER 4; proto's + 1).
_KINDS = [b"\x30" + _varint(value + 1) for value in range(5)]


class Request:
    """Stands for the SDK's ``ExportTraceServiceRequest`` of ``spans`` where its OTLP/HTTP
    exporter serializes one: :meth:`SerializePartialToString` answers the request's bytes:
    this process's own spans (:data:`producer`'s type) under its resource and scope, and any
    SDK ``ReadableSpan`` by :func:`encode` (by the SDK's own encoder when :func:`encode`
    cannot write it)."""

    def __init__(self, spans: Sequence[Any]) -> None:
        self.spans = spans

    def SerializePartialToString(self) -> bytes:
        kind = producer.ours if producer is not None else ()
        ours = [s.encode() for s in self.spans if isinstance(s, kind)]
        others = [s for s in self.spans if not isinstance(s, kind)]
        out = producer.request(ours) if ours and producer is not None else b""
        if not others:
            return out
        try:
            return out + encode(others)
        except Unsupported:
            from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

            data: bytes = encode_spans(others).SerializePartialToString()
            return out + data

    SerializeToString = SerializePartialToString
