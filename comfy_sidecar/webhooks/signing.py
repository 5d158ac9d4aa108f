"""Standard Webhooks signing as comfyui-api does it (behaviour doc B17/B18).

``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``. The key is
``WEBHOOK_SECRET`` decoded like Node's ``Buffer.from(secret, "base64")`` (lenient: missing
padding, URL-safe alphabet, junk skipped, stops at the first ``=``); a ``whsec_`` prefix is
stripped first (comfyui-api does not strip it). With no secret the key is empty and bodies are
still signed, as comfyui-api does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable

_B64_VALUES: dict[str, int] = {
    ch: i for i, ch in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}
_B64_VALUES["-"] = 62
_B64_VALUES["_"] = 63


def node_base64_decode(text: str) -> bytes:
    """Decode ``text`` exactly as Node's ``Buffer.from(text, "base64")`` does (Node 20).

    Both alphabets are accepted (``+/`` and ``-_``), characters outside them are skipped, the
    first ``=`` ends the input, and a trailing group of 2 or 3 characters yields 1 or 2 bytes
    (a lone trailing character yields nothing). Characters above U+00FF are taken modulo 256, as
    Node does for two-byte strings. Never raises. ``"testsecret"`` -> ``b5 eb 2d b1 e7 2b 7a``.
    """
    sextets: list[int] = []
    for ch in text:
        if ch == "=":
            break
        value = _B64_VALUES.get(chr(ord(ch) & 0xFF))
        if value is not None:
            sextets.append(value)
    out = bytearray()
    whole = len(sextets) - len(sextets) % 4
    for i in range(0, whole, 4):
        a, b, c, d = sextets[i : i + 4]
        out += ((a << 18) | (b << 12) | (c << 6) | d).to_bytes(3, "big")
    rest = sextets[whole:]
    if len(rest) >= 2:
        out.append(((rest[0] << 2) | (rest[1] >> 4)) & 0xFF)
    if len(rest) == 3:
        out.append(((rest[1] << 4) | (rest[2] >> 2)) & 0xFF)
    return bytes(out)


def decode_secret(secret: str | None) -> bytes:
    """HMAC key for ``WEBHOOK_SECRET``: strip a ``whsec_`` prefix, then :func:`node_base64_decode`.

    ``None`` or ``""`` gives ``b""`` (comfyui-api signs with an empty key when the secret is unset).
    """
    if not secret:
        return b""
    if secret.startswith("whsec_"):
        secret = secret[len("whsec_") :]
    return node_base64_decode(secret)


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature`` value for one message: ``v1,<base64 HMAC-SHA256>``.

    The signed content is ``f"{webhook_id}.{timestamp}.".encode() + body`` (Standard Webhooks).
    """
    return sign_chunks(key, webhook_id, timestamp, (body,))


def sign_chunks(key: bytes, webhook_id: str, timestamp: int, chunks: Iterable[bytes]) -> str:
    """Like :func:`sign` for a body given in pieces (blocking if ``chunks`` reads files)."""
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode(), hashlib.sha256)
    for chunk in chunks:
        mac.update(chunk)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")
