"""A real HTTP receiver on loopback that records requests (webhooks, uploads, IMDS, a metadata
service's stand-in)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietServer(ThreadingHTTPServer):
    """A threaded HTTP server that does not print a traceback when a client hangs up (tests
    make clients time out and go away on purpose)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class Recorded:
    """One request as the receiver saw it; ``t`` is ``time.monotonic()`` when it arrived."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    t: float

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A threaded HTTP server that records every request and answers as told.

    ``statuses``: status codes for the first requests, in order (then ``default_status``).
    ``delay_s``: seconds to wait before answering. ``hang``: never answer (until ``stop``).
    ``host``: the loopback address it listens on.
    """

    def __init__(
        self,
        statuses: list[int] | None = None,
        default_status: int = 200,
        delay_s: float | Callable[[], float] = 0.0,
        hang: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        self.requests: list[Recorded] = []
        self.statuses = list(statuses or [])
        self.default_status = default_status
        self.delay_s = delay_s
        self.hang = hang
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                t = time.monotonic()
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                rec = Recorded(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    t,
                )
                with receiver.lock:
                    receiver.requests.append(rec)
                    status = (
                        receiver.statuses.pop(0) if receiver.statuses else receiver.default_status
                    )
                    receiver.arrived.notify_all()
                if receiver.hang:
                    receiver.release.wait(30)
                    self.close_connection = True
                    return
                delay = receiver.delay_s() if callable(receiver.delay_s) else receiver.delay_s
                if delay:
                    time.sleep(delay)  # a slow receiver, for tests that need one
                payload = b"{}"
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout, shutdown)
                    self.close_connection = True

            do_GET = _handle
            do_POST = _handle
            do_PUT = _handle

        self.server = QuietServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.url = f"http://{host}:{self.server.server_address[1]}"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Recorded]:
        """Block until ``count`` requests arrived (AssertionError after ``timeout`` s)."""
        with self.arrived:
            ok = self.arrived.wait_for(lambda: len(self.requests) >= count, timeout)
            assert ok, f"got {len(self.requests)} requests, wanted {count}"
            return list(self.requests)

    def wait_until(
        self, predicate: Callable[[list[Recorded]], bool], timeout: float = 10.0
    ) -> list[Recorded]:
        """Block until ``predicate(requests)`` holds (AssertionError after ``timeout`` s)."""
        with self.arrived:
            ok = self.arrived.wait_for(
                lambda: bool(self.requests) and predicate(self.requests), timeout
            )
            assert ok, f"condition not met; got {len(self.requests)} requests"
            return list(self.requests)

    def snapshot(self) -> list[Recorded]:
        with self.lock:
            return list(self.requests)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
