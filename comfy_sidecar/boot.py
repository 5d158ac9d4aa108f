"""The first half second: bind the API socket and answer probes before the framework is loaded.

Importing Litestar and uvicorn takes about 0.4 s; a kubelet or Salad probe arriving in that window
must get an answer, not a refused connection. :class:`BootProbes` answers every request on the
already-bound socket with a 503 probe body (phase ``starting``) from a thread, and hands the socket
to uvicorn with :meth:`BootProbes.stop`.
"""

from __future__ import annotations

import json
import socket
import threading

from comfy_sidecar.config import ConfigError


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (IPv6 ``::`` is dual-stack); returns the socket.

    Raises :class:`ConfigError` naming ``PORT``/``HOST`` when the address cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"HOST: cannot resolve {host!r}: {exc}") from None
    family, _, _, _, address = infos[0]
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto
    # says TCP, and without it the last small chunk of a response waits ~40 ms for an ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"PORT: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    return sock


class BootProbes:
    """Answer probes with 503 ``phase: starting`` on ``sock`` from a daemon thread until stopped."""

    def __init__(self, sock: socket.socket, version: str) -> None:
        self._sock = sock
        self._version = version
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="boot-probes", daemon=True)
        self.answered = 0

    def start(self) -> None:
        """Start answering."""
        self._sock.settimeout(0.02)
        self._thread.start()

    def stop(self) -> None:
        """Stop answering and leave the socket listening and non-blocking, for uvicorn."""
        self._stop.set()
        self._thread.join()
        self._sock.setblocking(False)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            try:
                self._answer(conn)
            except OSError:
                pass
            finally:
                conn.close()

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(1.0)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 16384:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        parts = data.split(b" ", 2)
        path = parts[1].decode("latin-1").split("?")[0] if len(parts) > 1 else "/"
        status = "not ready" if path == "/ready" else "not healthy"
        body = json.dumps(
            {
                "version": self._version,
                "status": status,
                "phase": "starting",
                "detail": "the sidecar is loading",
            }
        ).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
        )
        conn.sendall(head.encode() + body)
        self.answered += 1
