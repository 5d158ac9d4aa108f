"""HTTP ``Range`` for output files (RFC 9110 section 14): one byte range, or the whole file.

Litestar's ``File`` response has no Range support, so ``GET /jobs/{id}/outputs/{n}`` parses the
header here and streams the slice itself. Multi-range requests are answered with the whole file
(200), which RFC 9110 allows; a syntactically bad header is ignored (200) as the RFC says;
a range that starts past the end is :class:`Unsatisfiable` (416).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio

CHUNK = 256 * 1024


class Unsatisfiable(Exception):
    """The range starts at or past the end of the file (answer 416 with ``bytes */size``)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte offsets, inclusive, of a single ``bytes=`` range of a file of
    ``size`` bytes; None to send the whole file. Raises :class:`Unsatisfiable`."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if not first_text:  # suffix: the last N bytes
            suffix = int(last_text)
            if suffix <= 0:
                raise Unsatisfiable(spec)
            return max(0, size - suffix), size - 1
        first = int(first_text)
        last = int(last_text) if last_text else size - 1
    except ValueError:
        return None
    if first >= size:
        raise Unsatisfiable(spec)
    if first < 0 or last < first:
        return None
    return first, min(last, size - 1)


async def read_slice(path: Path, first: int, last: int) -> AsyncIterator[bytes]:
    """Bytes ``first`` to ``last`` (inclusive) of ``path``, in chunks of at most 256 KiB."""
    remaining = last - first + 1
    async with await anyio.open_file(path, "rb") as handle:
        await handle.seek(first)
        while remaining > 0:
            chunk = await handle.read(min(CHUNK, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk
