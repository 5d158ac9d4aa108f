"""URL helpers shared by storage, the pipeline, the manifest and webhooks.

* :func:`is_url` decides whether a prompt input, manifest entry or ``/download`` request is a
  URL to download (comfyui-api's ``isValidUrl``).
* :func:`scrub_url` is the one way a URL is written anywhere but the wire: logs, error messages,
  storage events, the cache index, progress lines.
"""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["REDACTED", "UNPARSEABLE", "is_url", "scrub_url"]

#: Schemes a storage backend downloads from.
URL_SCHEMES = ("http://", "https://", "s3://")
#: What a secret query value is replaced by.
REDACTED = "REDACTED"
#: What :func:`scrub_url` returns for a string ``urllib`` cannot split (e.g. ``http://[::1``).
UNPARSEABLE = "<unparseable URL>"

# A parameter is secret when its name contains one of these (case-insensitive). Substrings
# rather than exact names, so ``X-Amz-Signature``, ``X-Amz-Credential``,
# ``X-Amz-Security-Token``, Azure SAS ``sig``, ``access_token``, ``api_key``, ``apiKey``,
# ``client_secret``, ``AWSAccessKeyId`` all match: redacting too much is safe, too little not.
_SECRET_NAME = re.compile(r"sig|token|key|secret|passw|pwd|credential|auth", re.IGNORECASE)
# Names that match the pattern above but are known not to be secret.
_NOT_SECRET = frozenset({"x-amz-signedheaders"})


def is_url(value: object) -> bool:
    """True for a string a storage backend would download: ``http://``, ``https://`` or
    ``s3://`` (scheme in any case) followed by a host, as comfyui-api's ``isValidUrl``.

    Anything else (other schemes, ``"http://"`` alone, ``"https:///path"``, non-strings) is
    False. Never raises.
    """
    if not isinstance(value, str):
        return False
    lower = value.lower()
    for scheme in URL_SCHEMES:
        if lower.startswith(scheme) and len(value) > len(scheme):
            return value[len(scheme)] not in "/?#"
    return False


def _is_secret(name: str) -> bool:
    lower = name.lower()
    return lower not in _NOT_SECRET and _SECRET_NAME.search(lower) is not None


def _scrub_pairs(text: str) -> str:
    """``a=1&sig=x`` -> ``a=1&sig=REDACTED``; non-secret pairs are kept byte for byte."""
    out = []
    for piece in text.split("&"):
        name, sep, _ = piece.partition("=")
        if sep and _is_secret(urllib.parse.unquote_plus(name)):
            piece = f"{name}={REDACTED}"
        out.append(piece)
    return "&".join(out)


def scrub_url(url: str) -> str:
    """``url`` safe to log: no ``user:password@`` (nor a bare ``token@``), and the value of
    every secret-looking query (or fragment) parameter replaced by ``REDACTED``.

    Secret-looking names contain sig, token, key, secret, passw, pwd, credential or auth
    (any case): S3 presigned ``X-Amz-Signature``/``X-Amz-Credential``/``X-Amz-Security-Token``,
    Azure SAS ``sig``, ``token``, ``access_token``, ``api_key``, ``password``...
    (``X-Amz-SignedHeaders`` is kept). Every other parameter, the scheme, host, port and path
    are kept exactly as given. A string ``urllib`` cannot split gives :data:`UNPARSEABLE`.
    Never raises.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return UNPARSEABLE
    netloc = parts.netloc.rpartition("@")[2]
    query = _scrub_pairs(parts.query) if parts.query else ""
    fragment = _scrub_pairs(parts.fragment) if parts.fragment else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))
