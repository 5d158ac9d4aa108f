"""The storage errors. Each case is a class; the HTTP status is decided at the edge (app.py),
never here. ``str(err)`` is safe to show to the caller: it never contains credentials.

Statuses the API answers today, for reference: :class:`BadRequestError`, :class:`AuthError`,
:class:`NotFoundError` 400; :class:`CacheConflictError`, :class:`SupersededError` 409;
:class:`OutputMissingError` 500; :class:`DiskFullError` 507; :class:`BackendError` and any
other :class:`StorageError` 502.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx


class StorageError(Exception):
    """A storage operation failed (the base class; on its own: the storage side failed)."""


class BadRequestError(StorageError):
    """The caller's input is unusable: bad URL, unsupported scheme, path traversal."""


class URLRefused(BadRequestError):
    """The SSRF guard (:mod:`comfy_sidecar.storage.netguard`) refused a URL: its scheme, an address
    its host resolves to, or its port. ``str(err)`` says why."""


class AuthError(StorageError):
    """The backend refused the credentials in use, or a cached auth-gated entry was asked for
    without valid auth (comfyui-api answers these download failures with 400)."""


class NotFoundError(StorageError):
    """The remote object does not exist (the caller gave a URL that does not resolve)."""


class BackendError(StorageError):
    """The backend failed: 5xx, connection cut, length mismatch, SDK error."""


class SupersededError(StorageError):
    """An upload was aborted because a later upload to the same URL started.

    comfyui-api's "latest wins": the later upload takes over the destination.
    """


class CacheConflictError(StorageError):
    """A link to a cache entry cannot be placed: a file the cache did not make, or a
    directory, is at the destination (manifest ``local_path``, ``POST /download`` name)."""


class OutputMissingError(StorageError):
    """The output file to upload is not on disk (the sidecar's own fault, not the caller's)."""


class DiskFullError(StorageError):
    """A file system of the sidecar is full or over quota (ENOSPC / EDQUOT): while downloading
    into the cache or writing its index, writing a job's input, or converting an output. Nothing
    half-written is kept; the message names no path."""


def is_disk_full(exc: OSError) -> bool:
    """True when ``exc`` says its file system is full or over quota (ENOSPC / EDQUOT): the
    one test every write that maps a full disk to :class:`DiskFullError` uses."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


__all__ = [
    "AuthError",
    "BackendError",
    "BadRequestError",
    "CacheConflictError",
    "DiskFullError",
    "NotFoundError",
    "OutputMissingError",
    "StorageError",
    "SupersededError",
    "URLRefused",
    "is_disk_full",
]


def raise_for_status(resp: httpx.Response | int, what: str) -> None:
    """Map a non-2xx response (or status code) to a :class:`StorageError` (no URL in the
    message)."""
    code = resp if isinstance(resp, int) else resp.status_code
    if 200 <= code < 300:
        return
    if code in (401, 403):
        raise AuthError(f"{what}: authentication failed (HTTP {code})")
    if code in (404, 410):
        raise NotFoundError(f"{what}: not found (HTTP {code})")
    raise BackendError(f"{what}: HTTP {code}")
