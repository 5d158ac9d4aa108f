"""Signed, short-lived asset content URLs: the ``url`` / ``url_expires_at`` of a v2 Asset or
Output.

A URL is ``{prefix}/assets/{id}/content?exp=<unix seconds>&sig=<signature>``, host-relative:
``prefix`` is where the v2 surface is mounted (``/api/v2``). ``sig`` is the unpadded base64url
HMAC-SHA256, keyed by ``ASSET_URL_SECRET``, of ``asset-content\\n<id>\\n<exp>``; whoever holds
the URL may read the bytes until ``exp`` without an API key (the content route calls
:meth:`UrlSigner.verify`). comfy-sdk's Asset/Output models type ``url`` as ``AnyUrl``, which
must be absolute: the edge prefixes the request's origin (scheme + authority), as
comfy-api-proxy does with its ``_external_base``. A key made at start (ASSET_URL_SECRET unset)
dies with the process: URLs then survive neither a restart nor a hop to another replica.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from comfy_sidecar.errors import AssetUrlRefused

_BAD = "the content URL's signature is not valid"
#: Longest ``exp`` accepted, in digits (unix seconds until the year 33658).
_MAX_EXP_DIGITS = 12


@dataclass(frozen=True)
class SignedUrl:
    """A signed content URL: ``path`` (host-relative, with its query) and ``expires_at``
    (aware UTC, whole seconds; the v2 ``url_expires_at``)."""

    path: str
    expires_at: datetime

    @property
    def expires_at_text(self) -> str:
        """``expires_at`` in RFC 3339 with its zone, e.g. ``2026-05-01T12:00:00+00:00``."""
        return self.expires_at.isoformat()

    def absolute(self, origin: str) -> str:
        """The URL against ``origin`` (``https://host:port``, no trailing slash)."""
        return origin.rstrip("/") + self.path


class UrlSigner:
    """Makes and checks signed content URLs (see the module docstring).

    ``secret``: the HMAC key (``str`` is UTF-8 encoded), ``None`` for a random 32-byte key made
    now (:attr:`ephemeral` is then True). ``ttl_s``: seconds a URL stays valid (> 0).
    ``prefix``: the mount point of the v2 surface, without a trailing slash.
    """

    def __init__(self, secret: bytes | str | None, ttl_s: float, prefix: str = "/api/v2") -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.ephemeral = secret is None
        if secret is None:
            secret = secrets.token_bytes(32)
        self._key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        self.ttl_s = ttl_s
        self.prefix = prefix.rstrip("/")

    def _signature(self, asset_id: str, exp: int) -> str:
        message = f"asset-content\n{asset_id}\n{exp}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")

    def content_path(self, asset_id: str) -> str:
        """``{prefix}/assets/{id}/content``, the unsigned content route of ``asset_id``."""
        return f"{self.prefix}/assets/{quote(asset_id, safe='')}/content"

    def sign(self, asset_id: str, *, now: float | None = None) -> SignedUrl:
        """A URL for ``asset_id`` valid ``ttl_s`` seconds from ``now`` (unix seconds, default
        the clock), its expiry rounded up to a whole second."""
        now = time.time() if now is None else now
        exp = math.ceil(now + self.ttl_s)
        sig = self._signature(asset_id, exp)
        path = f"{self.content_path(asset_id)}?exp={exp}&sig={sig}"
        return SignedUrl(path=path, expires_at=datetime.fromtimestamp(exp, UTC))

    def verify(
        self, asset_id: str, exp: str | None, sig: str | None, *, now: float | None = None
    ) -> None:
        """Check the ``exp`` and ``sig`` query values of a content URL for ``asset_id``.

        Returns None when the signature is right (compared in constant time) and ``now``
        (unix seconds, default the clock) is not past ``exp``. Raises
        :class:`~comfy_sidecar.errors.AssetUrlRefused` with ``reason`` ``bad_signature`` (a
        value missing or malformed, or a signature made for another id, expiry or key) or
        ``expired``; the signature is checked first, so a forged ``exp`` is never
        ``expired``."""
        if (
            not exp
            or not sig
            or not exp.isascii()
            or not exp.isdigit()
            or len(exp) > _MAX_EXP_DIGITS
        ):
            raise AssetUrlRefused(_BAD, reason="bad_signature")
        expected = self._signature(asset_id, int(exp))
        if not hmac.compare_digest(expected.encode("ascii"), sig.encode("utf-8", "replace")):
            raise AssetUrlRefused(_BAD, reason="bad_signature")
        now = time.time() if now is None else now
        if now > int(exp):
            raise AssetUrlRefused("the content URL has expired", reason="expired")
