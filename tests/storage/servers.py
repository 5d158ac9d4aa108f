"""Plain HTTP servers for the storage tests (threaded, 127.0.0.1, real sockets).

``FileServer`` routes:

- ``GET/HEAD /files/<name>``: ``files[name]``, with Content-Length (``delay_s`` before the
  body, so concurrent requests overlap).
- ``/noext/<name>?cd=<filename>&ct=<type>``: the same bytes, optional Content-Disposition and
  Content-Type headers, path without extension.
- ``/redirect?to=<url>``: 302 to ``to``.
- ``/auth/<name>``: 401 unless ``Authorization: Bearer secret``, Basic ``user:pass``,
  ``X-Key: k`` or ``?key=k``.
- ``/cut/<name>``: announces the full length, sends half, closes the connection.
- ``/ranged/<name>``: ``Accept-Ranges: bytes``, 206 to ``Range: bytes=a-b`` / ``bytes=a-``;
  the bytes come from ``files[name]`` or the file ``paths[name]`` (sent with ``sendfile``),
  with ``headers[name]`` added (checksums). Knobs: ``range_mode`` ``"ok"``, ``"ignore"``
  (200 with the whole file to a ranged GET) or ``"wrong_total"`` (206s claim one byte more);
  ``cut_ranges`` (that many ranged responses send half their body and close); ``throttle_bps``
  (each connection sends at most that many bytes per second).
- ``PUT /upload/<name>``: stores the body in ``uploads[name]`` (``put_delay_s`` per 64 KiB
  read, to make uploads slow); ``PUT /fail/<name>``: 500.

Every request is recorded in ``requests`` as ``(method, path, headers)``.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.receiver import QuietServer


class FileServer(QuietServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.uploads: dict[str, bytes] = {}
        #: Bytes received so far of each PUT still arriving, by name.
        self.receiving: dict[str, int] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.delay_s = 0.0
        self.put_delay_s = 0.0
        self.paths: dict[str, Path] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.range_mode = "ok"
        self.cut_ranges = 0
        self.throttle_bps = 0.0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def count(self, method: str, path_prefix: str) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and p.startswith(path_prefix))

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _record(self) -> tuple[str, dict[str, list[str]]]:
        with self.server.lock:
            self.server.requests.append((self.command, self.path, dict(self.headers.items())))
        parts = urllib.parse.urlsplit(self.path)
        return parts.path, urllib.parse.parse_qs(parts.query)

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path, query = self._record()
        parts = path.strip("/").split("/", 1)
        kind, name = parts[0], (parts[1] if len(parts) > 1 else "")
        if kind == "redirect":
            self._send(302, headers={"Location": query["to"][0]})
            return
        if kind == "ranged":
            self._ranged(name)
            return
        data = self.server.files.get(name)
        if data is None:
            self._send(404, b"not found")
            return
        headers: dict[str, str] = {"Content-Type": "application/octet-stream"}
        if kind == "noext":
            if "cd" in query:
                headers["Content-Disposition"] = f'attachment; filename="{query["cd"][0]}"'
            if "ct" in query:
                headers["Content-Type"] = query["ct"][0]
        elif kind == "auth":
            auth = self.headers.get("Authorization", "")
            ok = (
                auth == "Bearer secret"
                or auth == "Basic dXNlcjpwYXNz"  # user:pass
                or self.headers.get("X-Key") == "k"
                or query.get("key") == ["k"]
            )
            if not ok:
                self._send(401, b"unauthorized")
                return
        elif kind == "cut":
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        elif kind != "files":
            self._send(404, b"not found")
            return
        if self.server.delay_s:
            time.sleep(self.server.delay_s)  # a slow server, for tests that need one
        if self.headers.get("Range") == "bytes=0-0":
            self._send(206, data[:1], headers)
            return
        self._send(200, data, headers)

    def _ranged(self, name: str) -> None:
        server = self.server
        data = server.files.get(name)
        path = server.paths.get(name)
        if data is None and path is None:
            self._send(404, b"not found")
            return
        size = len(data) if data is not None else path.stat().st_size  # type: ignore[union-attr]
        start, end, code = 0, size, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        cut = False
        if match and server.range_mode != "ignore":
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, size) if match.group(2) else size
            code = 206
            with server.lock:
                if start > 0 and server.cut_ranges > 0:
                    server.cut_ranges -= 1
                    cut = True
        self.send_response(code)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        if code == 206:
            claimed = size + 1 if server.range_mode == "wrong_total" else size
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{claimed}")
        else:
            for k, v in server.headers.get(name, {}).items():
                self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        stop = start + (end - start) // 2 if cut else end
        self._body(data, path, start, stop)
        if cut:
            self.close_connection = True

    def _body(self, data: bytes | None, path: Path | None, start: int, end: int) -> None:
        """Send ``[start, end)`` of ``data`` or the file at ``path``, paced to
        ``throttle_bps`` per connection."""
        rate = self.server.throttle_bps
        step = max(64 << 10, min(1 << 20, int(rate / 20))) if rate else max(end - start, 1)
        began, sent = time.monotonic(), 0
        fh = open(path, "rb") if path is not None else None  # noqa: SIM115
        try:
            pos = start
            while pos < end:
                n = min(step, end - pos)
                if fh is not None:
                    self.wfile.flush()
                    self.connection.sendfile(fh, pos, n)
                else:
                    assert data is not None
                    self.wfile.write(memoryview(data)[pos : pos + n])
                pos += n
                sent += n
                if rate:
                    ahead = began + sent / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)  # pacing a throttled connection
        except ConnectionError:
            self.close_connection = True
        finally:
            if fh is not None:
                fh.close()

    def do_PUT(self) -> None:
        path, _ = self._record()
        kind, _, name = path.strip("/").partition("/")
        length = int(self.headers.get("Content-Length", "0"))
        received = bytearray()
        while len(received) < length:
            chunk = self.rfile.read(min(65536, length - len(received)))
            if not chunk:
                self.close_connection = True
                return  # client went away (aborted upload): store nothing
            received += chunk
            self.server.receiving[name] = len(received)
            if self.server.put_delay_s:
                time.sleep(self.server.put_delay_s)  # a slow server, for tests that need one
        if kind == "fail":
            self._send(500, b"boom")
            return
        with self.server.lock:
            self.server.uploads[name] = bytes(received)
        self._send(201, b"")
