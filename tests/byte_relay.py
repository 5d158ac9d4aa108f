"""A TCP relay on a free loopback port that counts the bytes a client sends through it: put it
between a client and a sidecar to see how much of a request reached the server (an upload
that deduplicates sends no body)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ByteRelay:
    """Relays ``127.0.0.1:port`` to ``127.0.0.1:target``; :attr:`sent` counts the bytes
    clients sent (request lines, headers and bodies), :attr:`received` those answered."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sent = 0
        self.received = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.sent = self.received = 0

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, dest: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if upstream:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
                dest.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, dest):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()


@contextmanager
def byte_relay(target: int) -> Iterator[ByteRelay]:
    relay = ByteRelay(target)
    try:
        yield relay
    finally:
        relay.close()
