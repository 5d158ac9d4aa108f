"""Parallel ranged GETs for one large HTTP(S) file (what pget, ``aria2c -x`` and hf_transfer do).

A CDN, S3 or the Hugging Face hub caps each connection (roughly 50-150 MB/s); N ranged GETs
over N connections fetch one file about N times as fast. The HTTP backend's first plain GET
decides (:func:`ranged_length`): a 200 with ``Accept-Ranges: bytes`` and a Content-Length of at
least ``min_bytes`` is fetched by :func:`fetch`. That first response keeps streaming the first
piece; ``connections - 1`` worker threads take the other pieces with ``Range`` GETs (the same
URL after redirects, the same headers) and write them with ``os.pwrite`` into ``dest``. The
file is sparse until complete (no preallocation), so its allocated blocks count the bytes
written (what ``DownloadCache.progress`` reports).

- A piece whose response is cut is resumed by ``Range`` from the last byte written, up to
  :data:`RETRIES` times per piece (also after a 5xx or 429).
- A server that answers 200 to a ranged GET (it ignores ``Range``, or ``If-Range`` says the
  file changed) gets one stream: the first response reads on to the end.
- Every 206 must say ``Content-Range: bytes <start>-<end>/<length of the first response>``;
  at the end the file must hold exactly that length. Either mismatch is refused.
- Checksums the server gave for the whole content are checked (:func:`expected_digests`).
- The other connections open only after the first stream has read :data:`PROBE_BYTES`
  slower than :data:`ONE_STREAM_BPS` (a fast uncapped link keeps one stream).

Memory: one :data:`BUF` buffer per connection (8 connections: 2 MiB).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import os
import re
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_sidecar.storage.errors import BackendError, raise_for_status

if TYPE_CHECKING:
    import httpx

#: Files smaller than this are fetched with one GET (bytes).
MIN_BYTES = 64 << 20
#: One read buffer per connection (bytes); the same size as the one-stream path.
BUF = 256 << 10
#: Resumptions of one piece after a cut, a 5xx or a 429.
RETRIES = 5
#: The first stream reads this much (bytes) before other connections open; when it came at
#: :data:`ONE_STREAM_BPS` or faster, no connection is capped and one stream is kept.
PROBE_BYTES = 8 << 20
#: One connection this fast (bytes/s) is not capped: more would only cost CPU (measured on
#: loopback: 8 connections ran at 0.5-0.85x one stream on 2 cores).
ONE_STREAM_BPS = 400e6

#: ``connect(url)`` -> an HTTP(S) connection to ``url``'s origin, not yet connected (the HTTP
#: backend passes the one its one-stream path uses, so both go through the same checks).
ConnectFn = Callable[["httpx.URL"], http.client.HTTPConnection]


@dataclass(frozen=True)
class Limits:
    """Bounds of one download. ``max_bytes``: refuse a larger file (None = no cap, bytes).
    ``idle_timeout_s``: longest wait for one socket read or connect (seconds).
    ``deadline``: ``time.monotonic()`` after which the download is abandoned (None = none)."""

    max_bytes: int | None = None
    idle_timeout_s: float = 60.0
    deadline: float | None = None


def ranged_length(
    status: int, headers: Mapping[str, str] | http.client.HTTPMessage, min_bytes: int
) -> int | None:
    """The file length when a first response allows ranged GETs, else None.

    Allowed: a 200 (the whole file) with ``Accept-Ranges: bytes``, an identity body and a
    Content-Length of at least ``min_bytes``. ``headers`` must be case-insensitive.
    """
    if status != 200:
        return None
    if "bytes" not in (headers.get("accept-ranges") or "").lower():
        return None
    if (headers.get("content-encoding") or "identity").lower() != "identity":
        return None
    declared = headers.get("content-length") or ""
    if not declared.isdigit() or int(declared) < min_bytes:
        return None
    return int(declared)


# --- checksums -------------------------------------------------------------------------------

_HEX32 = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


def expected_digests(headers: Mapping[str, str] | http.client.HTTPMessage) -> dict[str, bytes]:
    """Digests of the whole content that a full (200) response's headers promise, by
    ``hashlib``/``crc32`` name. Used:

    - ``Content-MD5`` (base64 MD5 of the body, RFC 1864);
    - ``x-amz-checksum-sha256`` / ``-sha1`` / ``-crc32`` (base64), unless composite (a
      multipart upload's checksum ends in ``-<parts>``; it is not of the content);
    - an S3 ETag (the response has ``x-amz-request-id`` or ``x-amz-id-2``): a strong ETag of
      exactly 32 hex digits is the MD5 of a single-part upload, unless the object is encrypted
      with SSE-KMS or SSE-C (then the ETag is not the MD5). A multipart ETag (``"<hex>-N"``)
      and every other server's ETag are skipped: their ETags are opaque.
    """
    out: dict[str, bytes] = {}
    md5 = headers.get("content-md5")
    if md5:
        out["md5"] = _b64(md5, "Content-MD5")
    for name, algo in (("sha256", "sha256"), ("sha1", "sha1"), ("crc32", "crc32")):
        value = (headers.get(f"x-amz-checksum-{name}") or "").strip()
        if value and "-" not in value:
            out[algo] = _b64(value, f"x-amz-checksum-{name}")
    etag = (headers.get("etag") or "").strip()
    s3 = headers.get("x-amz-request-id") or headers.get("x-amz-id-2")
    sse = (headers.get("x-amz-server-side-encryption") or "").lower()
    sse_c = headers.get("x-amz-server-side-encryption-customer-algorithm")
    match = _HEX32.match(etag)
    if s3 and match and "md5" not in out and not sse.startswith("aws:kms") and not sse_c:
        out["md5"] = bytes.fromhex(match.group(1))
    return out


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except ValueError:
        raise BackendError(f"download: the server's {what} is not base64") from None


def verify(path: Path, digests: Mapping[str, bytes]) -> None:
    """Hash the file at ``path`` and compare with ``digests`` (from :func:`expected_digests`).
    Raises :class:`BackendError` naming the first mismatch."""
    if not digests:
        return
    hashes = {a: hashlib.new(a) for a in digests if a != "crc32"}
    crc = 0
    buf = bytearray(BUF * 4)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            for h in hashes.values():
                h.update(view[:n])
            if "crc32" in digests:
                crc = zlib.crc32(view[:n], crc)
    got = {a: h.digest() for a, h in hashes.items()}
    if "crc32" in digests:
        got["crc32"] = crc.to_bytes(4, "big")
    for algo, want in digests.items():
        if got[algo] != want:
            raise BackendError(f"download corrupt: {algo} does not match the server's checksum")


# --- the transfer ----------------------------------------------------------------------------


class _Cut(Exception):
    """A piece's response ended early or failed in a way worth a retry."""


class _NoRanges(Exception):
    """The server answered a ranged GET with the whole file."""


class _Transfer:
    """Shared state of one ranged download: the pieces left, the error, the live sockets."""

    def __init__(self, fd: int, total: int, pieces: deque[tuple[int, int]]) -> None:
        self.fd = fd
        self.total = total
        self.pieces = pieces
        self.lock = threading.Lock()
        self.written = 0
        self.error: BaseException | None = None
        self.ranges_ok: bool | None = None
        self.decided = threading.Event()  # set once ranges_ok is known (or on failure)
        self.done = threading.Event()  # set on failure and cancellation: everyone stops
        self.socks: set[socket.socket] = set()
        #: Called after every write (the caller's stall watchdog counts it as progress).
        self.on_write: Callable[[], None] | None = None

    def stopped(self) -> bool:
        """True when workers must stop: a failure, or the server ignores ranges."""
        return self.done.is_set() or self.ranges_ok is False

    def take(self) -> tuple[int, int] | None:
        with self.lock:
            return self.pieces.popleft() if self.pieces and not self.stopped() else None

    def give_back(self, piece: tuple[int, int]) -> None:
        with self.lock:
            self.pieces.appendleft(piece)

    def decide(self, ok: bool) -> None:
        with self.lock:
            if self.ranges_ok is None:
                self.ranges_ok = ok
        self.decided.set()

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
            socks = list(self.socks)
        self.done.set()
        self.decided.set()
        for sock in socks:  # unblock reads in other threads at once
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def write(self, view: memoryview, offset: int) -> None:
        os.pwrite(self.fd, view, offset)
        with self.lock:
            self.written += len(view)
        if self.on_write is not None:
            self.on_write()


def fetch(
    first: http.client.HTTPResponse,
    url: httpx.URL,
    headers: Mapping[str, str],
    dest: Path,
    total: int,
    *,
    connect: ConnectFn,
    connections: int,
    stop: threading.Event,
    limits: Limits | None = None,
    piece_bytes: int | None = None,
    one_stream_bps: float | None = ONE_STREAM_BPS,
    on_write: Callable[[], None] | None = None,
) -> None:
    """Fetch the ``total`` bytes of ``url`` into ``dest`` over ``connections`` connections.

    ``first`` is the open 200 response (``ranged_length`` said yes); it is read here and not
    closed (its connection's owner closes it). ``headers`` are sent on every ranged GET (the
    caller's auth for this origin). ``piece_bytes`` is the unit of work (default: total / 4
    per connection, 4-128 MiB). ``one_stream_bps``: see :data:`ONE_STREAM_BPS` (None: always
    ranged). ``stop`` set: abandon. Raises :class:`BackendError` (cut
    beyond retries, length or checksum mismatch, too large, past the deadline, cancelled),
    :class:`StorageError` from the status mapping, or ``OSError`` from writing ``dest``.
    """
    limits = limits or Limits()
    if limits.max_bytes is not None and total > limits.max_bytes:
        raise BackendError(f"download too large: {total} bytes (limit {limits.max_bytes})")
    piece = piece_bytes or min(max(total // (connections * 4), 4 << 20), 128 << 20)
    pieces = deque((s, min(s + piece, total)) for s in range(piece, total, piece))
    digests = expected_digests(first.headers)
    etag = first.getheader("etag") or ""
    extra = dict(headers)
    if etag and not etag.startswith("W/"):
        extra["If-Range"] = etag  # a changed file answers 200: one stream, never a mix
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        state = _Transfer(fd, total, pieces)
        state.on_write = on_write
        watcher = threading.Thread(target=_watch, args=(state, stop, limits), daemon=True)
        watcher.start()
        probe = min(PROBE_BYTES, piece, total)
        started = time.monotonic()
        pos = _read_into(state, first, 0, probe, cut_ok=True, first=True)
        elapsed = max(time.monotonic() - started, 1e-6)
        fast = one_stream_bps is not None and pos == probe and pos / elapsed >= one_stream_bps
        workers = [
            threading.Thread(target=_worker, args=(state, url, extra, connect, limits), daemon=True)
            for _ in range(0 if fast else min(connections - 1, len(pieces)))
        ]
        for t in workers:
            t.start()
        if not workers:
            state.decide(False)
        try:
            one_stream = _first_stream(state, first, pos, min(piece, total), workers)
            if not one_stream:
                _worker(state, url, extra, connect, limits)
        except BaseException as exc:
            state.fail(exc)
            one_stream = False
        for t in workers:
            t.join()
        state.done.set()
        watcher.join()
        if state.error is not None:
            raise state.error
        size = os.fstat(fd).st_size
        if size != total or (not one_stream and state.written != total):
            raise BackendError(f"download incomplete: {state.written} of {total} bytes")
    finally:
        os.close(fd)
    verify(dest, digests)


def _watch(state: _Transfer, stop: threading.Event, limits: Limits) -> None:
    """Fail the transfer when ``stop`` is set or the deadline passes."""
    while not state.done.wait(0.1):
        if stop.is_set():
            state.fail(BackendError("download cancelled"))
        elif limits.deadline is not None and time.monotonic() > limits.deadline:
            state.fail(BackendError("download took too long"))


def _first_stream(
    state: _Transfer,
    resp: http.client.HTTPResponse,
    pos: int,
    end: int,
    workers: list[threading.Thread],
) -> bool:
    """Read ``[pos, end)`` from the first response. When the server ignores ranges, wait for the
    workers to stop and read on to the end of the file (returns True: one stream). A cut
    before ``end`` hands the rest to the workers (returns False)."""
    pos = _read_into(state, resp, pos, end, cut_ok=True, first=True)
    state.decided.wait()
    if state.ranges_ok:
        if pos < end:
            state.give_back((pos, end))
        return False
    if state.error is not None:
        return False
    for t in workers:
        t.join()  # nothing but this stream writes from here on
    if pos < end:
        raise BackendError(f"download interrupted after {pos} bytes")
    pos = _read_into(state, resp, pos, state.total, cut_ok=False, first=True)
    if pos != state.total:
        raise BackendError(f"download incomplete: {pos} of {state.total} bytes")
    return True


def _read_into(
    state: _Transfer,
    resp: http.client.HTTPResponse,
    pos: int,
    end: int,
    *,
    cut_ok: bool,
    first: bool = False,
) -> int:
    """Copy ``resp``'s body to the file from ``pos`` up to ``end``; returns the new position.
    A failed read returns early when ``cut_ok``, else raises :class:`BackendError`. Stops
    early on failure, and (unless ``first``) when the server turned out to ignore ranges."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    while pos < end and not (state.done.is_set() if first else state.stopped()):
        try:
            n = resp.readinto(view[: min(BUF, end - pos)])
        except (OSError, http.client.HTTPException) as exc:
            if cut_ok:
                return pos
            raise BackendError(
                f"download interrupted after {pos} bytes: {type(exc).__name__}"
            ) from None
        if not n:
            break
        state.write(view[:n], pos)
        pos += n
    return pos


def _worker(
    state: _Transfer,
    url: httpx.URL,
    headers: Mapping[str, str],
    connect: ConnectFn,
    limits: Limits,
) -> None:
    """Take pieces until none is left; any failure beyond retries fails the transfer."""
    conn: http.client.HTTPConnection | None = None
    try:
        while (piece := state.take()) is not None:
            conn = _fetch_piece(state, url, headers, connect, limits, piece, conn)
    except _NoRanges:
        state.decide(False)
    except BaseException as exc:
        state.fail(exc)
    finally:
        if conn is not None:
            conn.close()


def _fetch_piece(
    state: _Transfer,
    url: httpx.URL,
    headers: Mapping[str, str],
    connect: ConnectFn,
    limits: Limits,
    piece: tuple[int, int],
    conn: http.client.HTTPConnection | None,
) -> http.client.HTTPConnection | None:
    """GET ``piece`` (``[start, end)``) with Range, resuming after cuts. Returns the
    connection when it can carry the next request, else None."""
    pos, end = piece
    failures = 0
    while pos < end:
        if state.stopped():
            return conn
        try:
            if conn is None:
                conn = _open(state, url, connect, limits)
            conn.request(
                "GET",
                url.raw_path.decode("ascii"),
                headers={**headers, "Range": f"bytes={pos}-{end - 1}"},
            )
            resp = conn.getresponse()
            _check_piece(state, resp, pos)
            pos = _read_into(state, resp, pos, end, cut_ok=True)
            if pos < end:
                raise _Cut
            if not resp.isclosed():  # body longer than the range: the connection is spent
                conn.close()
                conn = None
        except (_Cut, OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
                conn = None
            failures += 1
            if failures > RETRIES:
                raise BackendError(f"download interrupted at byte {pos} after retries") from None
            state.done.wait(0.1 * failures)  # a short backoff; wakes at once on failure
    return conn


def _open(
    state: _Transfer, url: httpx.URL, connect: ConnectFn, limits: Limits
) -> http.client.HTTPConnection:
    conn = connect(url)
    conn.timeout = limits.idle_timeout_s
    conn.connect()
    if conn.sock is not None:
        conn.sock.settimeout(limits.idle_timeout_s)
        with state.lock:
            state.socks.add(conn.sock)
    return conn


def _check_piece(state: _Transfer, resp: http.client.HTTPResponse, pos: int) -> None:
    """Accept a 206 for ``pos`` of the same length; 200 -> :class:`_NoRanges`; 5xx/429 ->
    :class:`_Cut` (retried); other statuses and a different length -> raise."""
    if resp.status == 200:
        resp.close()
        raise _NoRanges
    if resp.status >= 500 or resp.status == 429:
        resp.close()
        raise _Cut
    if resp.status != 206:
        resp.close()
        raise_for_status(resp.status, "download")
        raise BackendError(f"download: HTTP {resp.status} to a ranged GET")
    match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)$", resp.getheader("content-range") or "")
    if match is None or int(match.group(1)) != pos:
        raise BackendError("download: the server sent a different byte range than asked")
    if match.group(3) != str(state.total):
        raise BackendError(
            f"download length mismatch: {match.group(3)} bytes, first said {state.total}"
        )
    state.decide(True)


__all__ = [
    "MIN_BYTES",
    "ConnectFn",
    "Limits",
    "expected_digests",
    "fetch",
    "ranged_length",
    "verify",
]
