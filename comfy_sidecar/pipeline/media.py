"""Inline media in a prompt: strict base64, ``data:`` URLs, and the file type of decoded bytes.

Used by :mod:`comfy_sidecar.pipeline.preprocess` for media inputs that are not URLs nor files
in ``INPUT_DIR``. Extensions come from the ``data:`` URL's MIME type, else from the first bytes
(PNG, JPEG, GIF, WebP, BMP, TIFF, ICO, MP4/MOV/M4A, WebM, AVI, WAV, FLAC, Ogg, MP3, FLV).
"""

from __future__ import annotations

import base64
import binascii
import re

from comfy_sidecar.errors import InputError

_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?),(?P<data>.*)$", re.DOTALL
)

# (magic bytes at offset 0, extension); checked in order.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x01\x00", "ico"),
    (b"\x1aE\xdf\xa3", "webm"),
    (b"fLaC", "flac"),
    (b"OggS", "ogg"),
    (b"ID3", "mp3"),
    (b"FLV", "flv"),
)
# RIFF containers: form type (bytes 8-12) -> extension.
_RIFF_FORMS = {b"WEBP": "webp", b"WAVE": "wav", b"AVI ": "avi"}
_MIME_EXT = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/jpg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
    "video/mp4": "mp4",
    "video/webm": "webm",
    "video/quicktime": "mov",
    "video/x-matroska": "mkv",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/mpeg": "mp3",
    "audio/ogg": "ogg",
    "audio/flac": "flac",
    "audio/mp4": "m4a",
    "audio/x-m4a": "m4a",
}


def sniff_extension(head: bytes) -> str | None:
    """File extension (no dot) guessed from the first bytes of a file, or None."""
    for magic, ext in _MAGIC:
        if head.startswith(magic):
            return ext
    if head[:4] == b"RIFF" and head[8:12] in _RIFF_FORMS:
        return _RIFF_FORMS[head[8:12]]
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand.startswith(b"qt"):
            return "mov"
        if brand in (b"M4A ", b"M4B "):
            return "m4a"
        return "mp4"
    if len(head) > 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        return "mp3"
    return None


def decode_base64(value: str) -> bytes | None:
    """Strictly decode standard or URL-safe base64 (whitespace ignored); None if it is not."""
    compact = "".join(value.split())
    if len(compact) < 8:
        return None
    pattern = _BASE64 if _BASE64.match(compact) else None
    if pattern is None and _BASE64URL.match(compact):
        pattern = _BASE64URL
    if pattern is None:
        return None
    padded = compact + "=" * (-len(compact) % 4)
    try:
        if pattern is _BASE64:
            return base64.b64decode(padded, validate=True)
        return base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        return None


def decode_data_url(value: str, location: str) -> tuple[bytes, str | None]:
    """A ``data:<mime>;base64,<data>`` URL -> (its bytes, extension without the dot or None).

    The extension comes from the MIME type, else from :func:`sniff_extension`. Raises
    :class:`InputError` at ``location`` when the URL is not base64 or its payload is invalid.
    """
    match = _DATA_URL.match(value)
    if not match or ";base64" not in (match.group("params") or ""):
        raise InputError("a data: URL must be base64 (data:<mime>;base64,<data>)", location)
    data = decode_base64(match.group("data"))
    if data is None:
        raise InputError("the data: URL's payload is not valid base64", location)
    ext = _MIME_EXT.get((match.group("mime") or "").lower()) or sniff_extension(data[:64])
    return data, ext
