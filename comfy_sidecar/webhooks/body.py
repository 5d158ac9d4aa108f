"""Webhook request bodies: JSON encoded once, with output files streamed as base64 from disk."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec

from .signing import sign, sign_chunks

_FILE_CHUNK = 3 * 256 * 1024  # raw bytes per read; a multiple of 3 so base64 pieces concatenate


class Base64File:
    """A file whose contents appear in a JSON body as one base64 string, read in chunks.

    Only the path is held: the file is opened while the body is read (signed or sent) and closed
    after, so a delivery waiting for its receiver holds no file descriptor. Its size (``size``,
    bytes) is read at construction (``OSError`` if it cannot be); the file must stay until the
    body is closed, and reading fewer bytes than ``size`` later raises ``OSError``.
    ``on_close`` runs once when the owning :class:`JsonBody` is closed (delivered, given up or
    dropped): the file's owner removes it there.
    """

    __slots__ = ("_closed", "_on_close", "path", "size")

    def __init__(
        self, path: str | os.PathLike[str], on_close: Callable[[], None] | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.size = os.stat(self.path).st_size
        self._on_close = on_close
        self._closed = False

    @property
    def encoded_length(self) -> int:
        """Length of the base64 text, in bytes."""
        return 4 * ((self.size + 2) // 3)

    def open(self) -> int:
        """A read-only file descriptor for the file (blocking); the caller closes it."""
        if self._closed:
            raise OSError(f"{self.path}: already closed")
        return os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def read_encoded(self, fd: int, offset: int) -> bytes:
        """Base64 of up to one chunk of raw bytes at ``offset`` of ``fd`` (from :meth:`open`;
        blocking, call in a thread)."""
        want = min(_FILE_CHUNK, self.size - offset)
        data = os.pread(fd, want, offset)
        if len(data) != want:
            raise OSError(f"{self.path}: file shrank while being sent")
        return base64.b64encode(data)

    def encoded_chunks(self) -> Iterator[bytes]:
        """All base64 text in chunks (blocking); the file is open only while iterating."""
        fd = self.open()
        try:
            for offset in range(0, self.size, _FILE_CHUNK):
                yield self.read_encoded(fd, offset)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Run ``on_close`` (idempotent); the file cannot be read after."""
        if not self._closed:
            self._closed = True
            if self._on_close is not None:
                self._on_close()


_MARK = "\u2063b64f\u2063"


class JsonBody:
    """A JSON request body, encoded once with msgspec (compact, UTF-8, like ``JSON.stringify``).

    ``obj`` is any msgspec-encodable value (dicts keep their key order; msgspec Structs and
    ``os.PathLike`` are accepted); :class:`Base64File` values anywhere inside become base64
    strings streamed from disk, so a large output is never held in memory. ``length`` is the
    exact body size in bytes. ``TypeError`` for values msgspec cannot encode.
    """

    __slots__ = ("_files", "_parts", "length")

    def __init__(self, obj: Any) -> None:
        files: list[Base64File] = []
        token = secrets.token_hex(8)

        def hook(value: Any) -> Any:
            if isinstance(value, Base64File):
                files.append(value)
                return f"{_MARK}{token}:{len(files) - 1}{_MARK}"
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            raise TypeError(f"cannot encode {type(value).__name__} in a webhook body")

        raw = msgspec.json.encode(obj, enc_hook=hook)
        self._files = files
        self._parts: list[bytes | Base64File] = []
        if not files:
            self._parts.append(raw)
        else:
            mark = _MARK.encode()
            pattern = re.compile(
                re.escape(mark + token.encode() + b":") + rb"(\d+)" + re.escape(mark)
            )
            pos = 0
            for match in pattern.finditer(raw):
                self._parts.append(raw[pos : match.start()])
                self._parts.append(files[int(match.group(1))])
                pos = match.end()
            self._parts.append(raw[pos:])
        self.length = sum(
            p.encoded_length if isinstance(p, Base64File) else len(p) for p in self._parts
        )

    @property
    def static(self) -> bytes | None:
        """The whole body when it has no file parts, else ``None``."""
        if len(self._parts) == 1 and isinstance(self._parts[0], bytes):
            return self._parts[0]
        return None

    def chunks(self) -> Iterator[bytes]:
        """The body in pieces (blocking file reads; run in a thread for file bodies)."""
        for part in self._parts:
            if isinstance(part, Base64File):
                yield from part.encoded_chunks()
            elif part:
                yield part

    async def achunks(self) -> AsyncIterator[bytes]:
        """The body in pieces; file reads run in a worker thread one chunk at a time."""
        for part in self._parts:
            if isinstance(part, Base64File):
                fd = await asyncio.to_thread(part.open)
                try:
                    for offset in range(0, part.size, _FILE_CHUNK):
                        yield await asyncio.to_thread(part.read_encoded, fd, offset)
                finally:
                    os.close(fd)
            elif part:
                yield part

    def read(self) -> bytes:
        """The whole body as bytes (loads files into memory; for tests and small bodies)."""
        return b"".join(self.chunks())

    async def signature(self, key: bytes, webhook_id: str, timestamp: int) -> str:
        """Like :func:`sign`, streaming file parts through the HMAC in a worker thread."""
        static = self.static
        if static is not None:
            return sign(key, webhook_id, timestamp, static)

        return await asyncio.to_thread(sign_chunks, key, webhook_id, timestamp, self.chunks())

    def close(self) -> None:
        """Close the :class:`Base64File` parts (their ``on_close`` runs; idempotent)."""
        for f in self._files:
            f.close()
