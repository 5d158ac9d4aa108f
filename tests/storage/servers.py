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
- ``PUT /upload/<name>``: stores the body in ``uploads[name]`` (``put_delay_s`` per 64 KiB
  read, to make uploads slow); ``PUT /fail/<name>``: 500.

Every request is recorded in ``requests`` as ``(method, path, headers)``.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
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
