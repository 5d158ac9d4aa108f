"""What every storage backend shares: the backend Protocol, SDK call runners, URL and name
helpers.

Nothing here imports a cloud SDK; backends import theirs lazily inside their methods.
"""

from __future__ import annotations

import asyncio
import mimetypes
import re
import threading
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from comfy_sidecar.schemas import DownloadAuth
from comfy_sidecar.storage.errors import BadRequestError, StorageError, SupersededError

# --- the backend interface ---------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    """What a backend learned while downloading.

    ``ext`` is an extension (with the dot) found from response metadata (HTTP only:
    Content-Disposition, final URL, Content-Type), used only when the URL path has none.
    ``used_caller_auth`` is True when credentials supplied by the caller (per-request auth or
    ``user:password`` in the URL) were sent: the cache entry is then auth-gated.
    """

    ext: str = ""
    used_caller_auth: bool = False


class CancelToken:
    """Thread-safe flag set when an upload is superseded; backends check it while streaming."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`SupersededError` when cancelled."""
        if self._event.is_set():
            raise SupersededError("upload superseded by a later upload to the same URL")


T = TypeVar("T")
#: A backend's SDK-exception mapper: ``(exc, what)`` -> the :class:`StorageError` to raise,
#: ``what`` being "download", "auth check" or "upload"; messages carry no secrets.
MapError = Callable[[Exception, str], StorageError]


async def run_sdk(executor: Executor, call: Callable[[], T], map_error: MapError, what: str) -> T:
    """Run the blocking SDK ``call`` on ``executor`` (the backend's thread pool) and return
    its result; any failure raises ``map_error(exc, what)``, not chained (an SDK traceback
    may hold credentials)."""
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, call)
    except Exception as exc:
        raise map_error(exc, what) from None


async def run_upload(
    cancel: CancelToken, executor: Executor, call: Callable[[], None], map_error: MapError
) -> None:
    """Run the blocking SDK upload ``call`` on ``executor`` under ``cancel``: a superseded
    upload raises :class:`SupersededError` (also when the SDK failed because it was stopped),
    any other failure raises ``map_error(exc, "upload")``; never passes silently."""
    try:
        cancel.check()
        await asyncio.get_running_loop().run_in_executor(executor, call)
    except SupersededError:
        raise
    except Exception as exc:
        if cancel.cancelled:
            raise SupersededError("upload superseded by a later upload to the same URL") from None
        raise map_error(exc, "upload") from None
    cancel.check()


@runtime_checkable
class Backend(Protocol):
    """One storage backend (S3, Hugging Face, Azure Blob, HTTP).

    Downloads are routed by URL (:meth:`handles`); uploads by the request's upload spec type
    (``Storage._upload_backend``). All methods raise :class:`StorageError` subclasses and
    never put secrets in messages.
    """

    name: str

    def handles(self, url: str) -> bool:
        """True when this backend downloads ``url``."""
        ...

    async def download(self, url: str, dest: Path, auth: DownloadAuth | None) -> FetchResult:
        """Download ``url`` into ``dest`` (a path inside a private temp directory; files other
        than ``dest`` may be created in that directory). Raise on any failure; a complete
        ``dest`` on return is the whole object (length checked where the backend gives one)."""
        ...

    async def check_auth(self, url: str, auth: DownloadAuth | None) -> None:
        """Confirm that ``auth`` (resolved the same way :meth:`download` would) may read
        ``url`` now. Raise :class:`AuthError` / :class:`NotFoundError` otherwise."""
        ...

    def upload_url(self, spec: object, filename: str) -> str:
        """The URL an upload of ``filename`` under ``spec`` lands at (what the API returns)."""
        ...

    async def upload(self, path: Path, spec: object, filename: str, cancel: CancelToken) -> None:
        """Upload the file at ``path`` (streamed from disk). Raise on failure; raise
        :class:`SupersededError` when ``cancel`` is set before the upload finished."""
        ...


# --- helpers ------------------------------------------------------------------------------


def check_name(value: str, what: str, *, allow_slash: bool) -> str:
    """Refuse path traversal in a caller-given file name or prefix.

    Refused: ``..`` segments, absolute paths, NUL, backslashes; ``/`` too unless
    ``allow_slash``. Returns ``value``. Raises :class:`BadRequestError` naming ``what``.
    """
    if "\x00" in value:
        raise BadRequestError(f"{what}: must not contain NUL")
    if "\\" in value:
        raise BadRequestError(f"{what}: must not contain a backslash")
    if value.startswith("/") and not allow_slash:
        raise BadRequestError(f"{what}: must not be an absolute path")
    if not allow_slash and "/" in value:
        raise BadRequestError(f"{what}: must be a plain file name (no '/')")
    segments = value.split("/")
    if any(seg == ".." for seg in segments):
        raise BadRequestError(f"{what}: must not contain '..'")
    if not allow_slash and value in ("", "."):
        raise BadRequestError(f"{what}: must be a file name")
    return value


def check_prefix(prefix: str, what: str) -> str:
    """A caller-given upload prefix: ``/`` allowed inside, leading/trailing ``/`` trimmed,
    ``..``/NUL/backslash refused. Returns the trimmed prefix (may be empty)."""
    check_name(prefix, what, allow_slash=True)
    return prefix.strip("/")


def join_key(prefix: str, filename: str) -> str:
    """``prefix`` and ``filename`` joined with exactly one ``/`` (no ``/`` when prefix is
    empty). ``filename`` must already be checked."""
    prefix = prefix.strip("/")
    return f"{prefix}/{filename}" if prefix else filename


def url_extname(url: str) -> str:
    """Node ``path.extname`` of the URL's pathname: ``""`` for none or a dotfile, ``"."`` for a
    trailing dot, case kept (comfyui-api's cache-name extension)."""
    try:
        path = urllib.parse.urlsplit(url).path
    except ValueError:
        return ""
    return extname(path)


def extname(path: str) -> str:
    """Node ``path.extname`` semantics on a ``/``-separated path."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    idx = base.rfind(".")
    if idx <= 0:
        return ""
    # Node: a name made only of dots before the last one (e.g. "..") has no extension.
    if base[:idx].strip(".") == "" and idx == len(base) - 1:
        return ""
    return base[idx:]


_SAFE_EXT = re.compile(r"^\.[A-Za-z0-9_+-]{0,15}$|^\.$")


def safe_ext(ext: str) -> str:
    """``ext`` if it is safe to put in a file name (``.`` + up to 15 of A-Z a-z 0-9 _ + -),
    else ``""``."""
    return ext if _SAFE_EXT.match(ext) else ""


def content_type_for(name: str) -> str:
    """MIME type for an upload, from the file name's extension."""
    return mimetypes.guess_type(name)[0] or "application/octet-stream"
