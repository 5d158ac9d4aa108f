"""Asset content hashes: ``blake3:<hex>`` (64 lowercase hex digits), the Comfy API v2 form.

comfy-sdk hashes a file locally the same way (``comfy_sdk/_hashing.py``: ``"blake3:" +
blake3(data).hexdigest()``) as a dedup hint; the store always recomputes it from the bytes it
received, and that value is authoritative.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_sidecar.errors import InputError

PREFIX = "blake3:"
#: Bytes read at a time when a file is hashed (1 MiB: large enough for blake3's SIMD paths).
CHUNK = 1024 * 1024
_HEX = re.compile(r"[0-9a-f]{64}")


if TYPE_CHECKING:
    from blake3 import blake3


def new_hasher() -> blake3:
    """An empty blake3 hasher (``update(bytes)``, ``hexdigest()``); blake3 is imported by the
    first hash, not at start-up (its library is about 0.6 MB of a sidecar's RSS)."""
    from blake3 import blake3

    return blake3()


def format_hash(hexdigest: str) -> str:
    """``blake3:<hexdigest>``."""
    return PREFIX + hexdigest


def parse_hash(value: object, location: str = "hash") -> str:
    """The 64 hex digits of a ``blake3:<hex>`` hash (prefix and hex case-insensitive).

    Raises :class:`~comfy_sidecar.errors.InputError` at ``location`` for anything else (another
    algorithm, a short or non-hex digest, a non-string)."""
    digest = is_hash(value)
    if digest is None:
        raise InputError("expected a hash of the form blake3:<64 hex digits>", location)
    return digest


def is_hash(value: object) -> str | None:
    """The 64 lowercase hex digits of a well-formed ``blake3:<hex>`` hash, else None."""
    if not isinstance(value, str) or value[: len(PREFIX)].lower() != PREFIX:
        return None
    digest = value[len(PREFIX) :].lower()
    return digest if _HEX.fullmatch(digest) else None


def hash_file(path: Path | str) -> str:
    """``blake3:<hex>`` of the file at ``path``, read in :data:`CHUNK` pieces (blocking: call
    it in a thread). Raises OSError."""
    hasher = new_hasher()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
    return format_hash(hasher.hexdigest())
