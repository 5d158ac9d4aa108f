"""A loopback HTTP server that misbehaves on purpose, for the download-limit tests.

* ``/endless``: 200 without Content-Length, 64 KiB chunks until the client goes away;
* ``/huge``: declares a 10 GiB Content-Length (sends little of it);
* ``/trickle``: declares 1 MB and sends 1 byte every 0.2 s;
* ``/files/<name>``: a file from ``files``, at once;
* ``/held/<name>``: a file from ``files``: its first half at once, the rest once ``release``
  is set;
* ``/redirect?to=<url>``: 302 to ``url``.

``open_now`` counts misbehaving (and held) responses being served, ``gone`` the ones the
client dropped, ``sent`` the body bytes they wrote, ``hits`` the files served (held or not).
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class SlowServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _Handler)
        self.host = host
        self.files: dict[str, bytes] = {}
        self.open_now = 0
        self.gone = 0
        self.hits = 0
        self.sent = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.release = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.server_address[1]}{path}"

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.stopping.set()
        self.release.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: SlowServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/redirect":
            target = urllib.parse.parse_qs(query)["to"][0]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path.startswith("/files/"):
            with self.server.lock:
                self.server.hits += 1
            data = self.server.files[path.removeprefix("/files/")]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        with self.server.lock:
            self.server.open_now += 1
        try:
            self._misbehave(path)
        except OSError:
            with self.server.lock:
                self.server.gone += 1
        finally:
            with self.server.lock:
                self.server.open_now -= 1
            self.close_connection = True

    def _write(self, chunk: bytes) -> None:
        self.wfile.write(chunk)
        self.wfile.flush()
        with self.server.lock:
            self.server.sent += len(chunk)

    def _held(self, name: str) -> None:
        data = self.server.files[name]
        with self.server.lock:
            self.server.hits += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        half = len(data) // 2
        self._write(data[:half])
        self.server.release.wait()
        self._write(data[half:])

    def _misbehave(self, path: str) -> None:
        if path.startswith("/held/"):
            self._held(path.removeprefix("/held/"))
            return
        self.send_response(200)
        if path == "/huge":
            self.send_header("Content-Length", str(10 * 1024**3))
        elif path == "/trickle":
            self.send_header("Content-Length", str(10**6))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"x" * (64 << 10) if path != "/trickle" else b"x"
        pause = 0.2 if path == "/trickle" else 0.0
        while not self.server.stopping.is_set():
            self._write(chunk)
            if pause:
                time.sleep(pause)
            if path == "/huge":
                self.server.stopping.wait(0.05)
