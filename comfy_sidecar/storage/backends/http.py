"""HTTP(S) backend: every http(s) URL no other backend claims (httpx, streamed both ways).

Auth, highest priority first (comfyui-api's order): per-request auth (``bearer``, ``basic``,
``header``, ``query``; ``s3`` sends nothing), ``user:password`` in the URL (sent as Basic), then
``HTTP_AUTH_HEADER_NAME/VALUE`` — but only to hosts matching ``HTTP_AUTH_HEADER_HOSTS``
(comfyui-api sends the operator's header to any URL). Caller auth goes only to the URL's own
origin: redirects to another origin carry no caller credentials. Every request carries the
job's W3C ``traceparent`` (:func:`comfy_sidecar.observability.tracing.traceparent`), on every hop.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import http.client
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_sidecar.observability import tracing
from comfy_sidecar.schemas import (
    BasicAuth,
    BearerAuth,
    DownloadAuth,
    HeaderAuth,
    HTTPUpload,
    QueryAuth,
)
from comfy_sidecar.storage import netguard
from comfy_sidecar.storage.backends import ranged
from comfy_sidecar.storage.backends.base import (
    CancelToken,
    FetchResult,
    check_name,
    content_type_for,
    extname,
    safe_ext,
)
from comfy_sidecar.storage.errors import (
    BackendError,
    BadRequestError,
    StorageError,
    SupersededError,
    URLRefused,
    raise_for_status,
)
from comfy_sidecar.storage.globs import host_matches

if TYPE_CHECKING:
    import httpx

    from comfy_sidecar.config import Settings

CHUNK = 1 << 20
#: Body buffer of the direct GET path. 256 KiB stays in the CPU cache between the socket read
#: and the file write; 1 MiB costs 3.5x the CPU (measured: 3.7 s vs 1.0 s per GiB).
DIRECT_CHUNK = 256 << 10
#: Redirect hops followed; each hop is checked by the SSRF guard again.
MAX_REDIRECTS = 5
#: A download must receive at least this many bytes per DOWNLOAD_IDLE_TIMEOUT_S (the direct
#: path's buffer: a read that has not filled it in time is the same rule).
MIN_PROGRESS = DIRECT_CHUNK
#: How often, in seconds, the watchdog of a direct download looks at it.
WATCH_INTERVAL_S = 0.25
#: Seconds: connecting (both paths), and httpx's read, write and pool waits (its client is made
#: on first use, so a sidecar that downloads nothing never imports httpx).
CONNECT_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 60.0
POOL_TIMEOUT_S = 30.0

#: Content-Type -> extension, the last cache-name fallback (comfyui-api has a similar table).
CONTENT_TYPE_EXT: dict[str, str] = {
    "application/octet-stream": ".bin",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "audio/mpeg": ".mp3",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/flac": ".flac",
    "audio/ogg": ".ogg",
    "application/json": ".json",
    "text/plain": ".txt",
    "application/zip": ".zip",
    "application/x-tar": ".tar",
    "application/gzip": ".gz",
}


def disposition_filename(value: str | None) -> str | None:
    """The file name in a Content-Disposition header (``filename*`` or ``filename``)."""
    if not value:
        return None
    params: dict[str, str] = {}
    for part in value.split(";")[1:]:
        if "=" not in part:
            continue
        key, _, raw = part.partition("=")
        params[key.strip().lower()] = raw.strip().strip('"').strip("'")
    star = params.get("filename*")
    if star:
        _charset, _, rest = star.partition("''")
        return urllib.parse.unquote(rest or star)
    return params.get("filename")


def ext_from_headers(headers: Mapping[str, str] | http.client.HTTPMessage, final_path: str) -> str:
    """comfyui-api's fallbacks for a URL without extension: Content-Disposition file name,
    then the final URL's path (extension of at most 15 characters), then Content-Type.
    ``headers`` must be case-insensitive (httpx.Headers, http.client.HTTPMessage)."""
    name = disposition_filename(headers.get("content-disposition"))
    if name:
        ext = safe_ext(extname(name.replace("\\", "/")))
        if ext and ext != ".":
            return ext
    ext = safe_ext(extname(final_path))
    if ext and ext != "." and len(ext) <= 15:
        return ext
    ctype = (headers.get("content-type") or "").split(";")[0].strip().lower()
    return CONTENT_TYPE_EXT.get(ctype, "")


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return (url.scheme, url.host, url.port)


class HTTPBackend:
    """Plain HTTP(S) downloads (GET) and uploads (PUT ``<url_prefix>/<filename>``)."""

    name = "http"

    def __init__(
        self,
        settings: Settings,
        executor: Executor | None = None,
        guard: netguard.NetGuard | None = None,
    ) -> None:
        self._executor = executor
        self._guard = guard or netguard.NetGuard(settings)
        self._max_bytes = int(settings.max_download_gb * 1024**3) or None
        self._idle_s = settings.download_idle_timeout_s
        self._env_header: tuple[str, str] | None = None
        if settings.http_auth_header_name and settings.http_auth_header_value:
            self._env_header = (settings.http_auth_header_name, settings.http_auth_header_value)
        self._env_hosts = list(settings.http_auth_header_hosts)
        self._client: httpx.AsyncClient | None = None
        #: Ranged downloads: connections per file, the smallest file (bytes), the piece size
        #: (bytes; None = ranged.fetch's default), the one-stream speed (bytes/s; None =
        #: always ranged). Tests lower the sizes and turn the last off.
        self.connections = settings.download_connections
        self.ranged_min_bytes = ranged.MIN_BYTES
        self.ranged_piece_bytes: int | None = None
        self.ranged_one_stream_bps: float | None = ranged.ONE_STREAM_BPS

    def client(self) -> httpx.AsyncClient:
        """The httpx client, on the SSRF guard's transport: a request goes through
        HTTP(S)_PROXY when one applies to it (its host checked first), else directly to the
        address the guard checked (see
        :func:`~comfy_sidecar.storage.guarded.guarded_transport`)."""
        if self._client is None:
            import httpx  # on first use, as its transport (httpcore)

            from comfy_sidecar.storage.guarded import guarded_transport

            timeout = httpx.Timeout(
                connect=CONNECT_TIMEOUT_S,
                read=IO_TIMEOUT_S,
                write=IO_TIMEOUT_S,
                pool=POOL_TIMEOUT_S,
            )
            self._client = httpx.AsyncClient(
                timeout=timeout, follow_redirects=False, transport=guarded_transport(self._guard)
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self._client = None

    def handles(self, url: str) -> bool:
        return url.lower().startswith(("http://", "https://"))

    # --- auth -------------------------------------------------------------------------

    def _prepare(
        self, url: str, auth: DownloadAuth | None
    ) -> tuple[httpx.URL, dict[str, str], bool]:
        """The URL to request (credentials moved out, query auth added), the headers for its
        origin, and whether caller credentials are in use."""
        import httpx  # the first URL download imports it (see client())

        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError):
            raise BadRequestError("invalid URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise BadRequestError("invalid http(s) URL")
        headers: dict[str, str] = {}
        used = False
        userinfo = parsed.userinfo
        if userinfo:
            parsed = parsed.copy_with(username=None, password=None)
        if auth is not None and not isinstance(
            auth, BearerAuth | BasicAuth | HeaderAuth | QueryAuth
        ):
            auth = None  # s3 auth on an http URL: comfyui-api sends no headers
        if isinstance(auth, BearerAuth):
            headers["Authorization"] = f"Bearer {auth.token}"
            used = True
        elif isinstance(auth, BasicAuth):
            headers["Authorization"] = _basic(auth.username, auth.password)
            used = True
        elif isinstance(auth, HeaderAuth):
            headers[auth.header_name] = auth.header_value
            used = True
        elif isinstance(auth, QueryAuth):
            parsed = parsed.copy_merge_params({auth.query_param: auth.query_value})
            used = True
        elif userinfo:
            user, _, password = userinfo.decode().partition(":")
            headers["Authorization"] = _basic(
                urllib.parse.unquote(user), urllib.parse.unquote(password)
            )
            used = True
        return parsed, headers, used

    def _env_headers_for(self, url: httpx.URL, caller_headers: dict[str, str]) -> dict[str, str]:
        if caller_headers or self._env_header is None:
            return {}
        if not host_matches(url.host, self._env_hosts):
            return {}
        return {self._env_header[0]: self._env_header[1]}

    async def _open(
        self,
        method: str,
        url: str,
        auth: DownloadAuth | None,
        extra: dict[str, str] | None = None,
    ) -> tuple[httpx.Response, bool]:
        """Send ``method`` following up to 5 redirects by hand (so caller credentials stay on
        the first origin, and the guard checks every hop). Returns the streamed final response
        (caller closes it). Raises :class:`URLRefused` for a refused hop."""
        import httpx

        first, caller_headers, used = self._prepare(url, auth)
        current = first
        client = self.client()
        for _ in range(MAX_REDIRECTS + 1):
            headers = {**self._headers_for(current, first, caller_headers), **(extra or {})}
            try:
                resp = await client.send(
                    client.build_request(method, current, headers=headers), stream=True
                )
            except httpx.HTTPError as exc:
                raise BackendError(f"request failed: {type(exc).__name__}") from None
            if resp.is_redirect and "location" in resp.headers:
                await resp.aclose()
                current = next_hop(current, resp.headers["location"])
                if method not in ("GET", "HEAD") and resp.status_code in (301, 302, 303):
                    method = "GET"
                continue
            return resp, used
        raise BackendError(f"more than {MAX_REDIRECTS} redirects")

    # --- the Backend protocol ------------------------------------------------------------

    async def download(self, url: str, dest: Path, auth: DownloadAuth | None) -> FetchResult:
        first, caller_headers, used = self._prepare(url, auth)
        if netguard.proxy_for(first.scheme, first.host) is None:
            watch = _Watch(netguard.is_trusted())
            job = functools.partial(
                contextvars.copy_context().run,  # the thread sends the job's traceparent
                self._download_direct,
                first,
                caller_headers,
                dest,
                watch,
            )
            future = asyncio.get_running_loop().run_in_executor(self._executor, job)
            ext = await self._watch(future, watch)
            return FetchResult(ext=ext, used_caller_auth=used)
        return await self._download_httpx(url, dest, auth)

    async def _watch(self, future: asyncio.Future[str], watch: _Watch) -> str:
        """Await a direct download, cutting it (socket shut down, so the thread is freed at
        once) when no read completed for DOWNLOAD_IDLE_TIMEOUT_S or the caller is cancelled."""
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=WATCH_INTERVAL_S)
                if done:
                    return future.result()
                if watch.idle_for() > self._idle_s:
                    watch.abort(
                        f"download stalled: less than {MIN_PROGRESS // 1024} KiB in "
                        f"{self._idle_s:g} s (DOWNLOAD_IDLE_TIMEOUT_S)"
                    )
        except asyncio.CancelledError:
            watch.abort("download cancelled")
            # The thread ends at once with that reason; nobody waits for it any more.
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise

    def _headers_for(
        self, current: httpx.URL, first: httpx.URL, caller_headers: dict[str, str]
    ) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}
        if _origin(current) == _origin(first):
            headers.update(caller_headers)
        headers.update(self._env_headers_for(current, caller_headers))
        trace = tracing.traceparent()
        if trace is not None:
            headers["traceparent"] = trace
        return headers

    def _connection(self, url: httpx.URL, trusted: bool) -> http.client.HTTPConnection:
        """An http.client connection to ``url``'s origin that connects to the address the
        SSRF guard resolved and checked (unless ``trusted``); TLS SNI and ``Host`` keep the
        name. Raises :class:`URLRefused` at ``connect()``."""
        port = url.port or (443 if url.scheme == "https" else 80)
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(
                url.host, port, timeout=CONNECT_TIMEOUT_S, context=_ssl_context()
            )
        else:
            conn = http.client.HTTPConnection(url.host, port, timeout=CONNECT_TIMEOUT_S)
        if not trusted:
            guard = self._guard

            def create(
                address: tuple[str, int],
                timeout: float | None = None,
                source_address: tuple[str, int] | None = None,
            ) -> socket.socket:
                pinned = guard.resolve(address[0], address[1])
                return socket.create_connection((pinned, address[1]), timeout, source_address)

            conn._create_connection = create  # type: ignore[attr-defined]
        return conn

    def _download_direct(
        self,
        first: httpx.URL,
        caller_headers: dict[str, str],
        dest: Path,
        watch: _Watch,
    ) -> str:
        """GET with http.client in a worker thread, reading the body with ``readinto`` into
        one 256 KiB buffer: about 3x the throughput of httpx's async stream, and less CPU
        than curl. Used when no proxy applies. Returns the extension fallback. ``watch``
        (see :meth:`_watch`) can cut it from the event loop."""
        current = first
        for _ in range(MAX_REDIRECTS + 1):
            conn = self._connection(current, watch.trusted)
            try:
                try:
                    watch.attach(conn)
                    conn.connect()
                    if conn.sock is not None:
                        conn.sock.settimeout(self._idle_s)
                    target = current.raw_path.decode("ascii")
                    conn.request(
                        "GET", target, headers=self._headers_for(current, first, caller_headers)
                    )
                    resp = conn.getresponse()
                except (OSError, http.client.HTTPException) as exc:
                    watch.check()
                    raise BackendError(f"request failed: {type(exc).__name__}") from None
                location = resp.getheader("location")
                if resp.status in (301, 302, 303, 307, 308) and location:
                    current = next_hop(current, location)
                    continue
                raise_for_status(resp.status, "download")
                if resp.getheader("content-encoding", "identity").lower() != "identity":
                    raise BackendError("download: server sent a compressed body")
                declared = resp.getheader("content-length")
                if self.connections > 1:
                    total = ranged.ranged_length(resp.status, resp.headers, self.ranged_min_bytes)
                    if total is not None:
                        _Limit(self._max_bytes).check(total)
                        self._download_ranged(resp, current, first, caller_headers, dest, watch)
                        return ext_from_headers(resp.headers, current.path)
                written = self._read_body(resp, dest, watch, declared)
                declared = resp.getheader("content-length")
                if declared is not None and declared.isdigit() and written != int(declared):
                    raise BackendError(f"download incomplete: {written} of {declared} bytes")
                return ext_from_headers(resp.headers, current.path)
            finally:
                conn.close()
        raise BackendError(f"more than {MAX_REDIRECTS} redirects")

    def _read_body(
        self, resp: http.client.HTTPResponse, dest: Path, watch: _Watch, declared: str | None
    ) -> int:
        """Stream ``resp``'s body into ``dest`` within MAX_DOWNLOAD_GB; returns the bytes
        written. Raises :class:`BackendError` (too large, cut, stalled, cancelled)."""
        limit = _Limit(self._max_bytes)
        if declared is not None and declared.isdigit():
            limit.check(int(declared))
        written = 0
        view = memoryview(bytearray(DIRECT_CHUNK))
        with open(dest, "wb") as fh:
            while True:
                watch.check()
                try:
                    n = resp.readinto(view)
                except (OSError, http.client.HTTPException) as exc:
                    watch.check()
                    raise BackendError(
                        f"download interrupted after {written} bytes: {type(exc).__name__}"
                    ) from None
                watch.progress()
                if not n:
                    return written
                written += n
                limit.check(written)
                fh.write(view[:n])

    def _download_ranged(
        self,
        resp: http.client.HTTPResponse,
        current: httpx.URL,
        first: httpx.URL,
        caller_headers: dict[str, str],
        dest: Path,
        watch: _Watch,
    ) -> None:
        """Hand a large file whose first response (``resp``, a 200 from ``current``) allows
        ranges to :func:`ranged.fetch`: ranged GETs on ``self.connections`` connections with
        the headers this origin gets. Raises what ``ranged.fetch`` raises."""
        total = int(resp.getheader("content-length") or 0)
        ranged.fetch(
            resp,
            current,
            self._headers_for(current, first, caller_headers),
            dest,
            total,
            connect=lambda url: self._connection(url, watch.trusted),
            connections=self.connections,
            stop=watch.stopped,
            limits=ranged.Limits(max_bytes=self._max_bytes, idle_timeout_s=self._idle_s),
            piece_bytes=self.ranged_piece_bytes,
            one_stream_bps=self.ranged_one_stream_bps,
            on_write=watch.progress,
        )

    async def _download_httpx(self, url: str, dest: Path, auth: DownloadAuth | None) -> FetchResult:
        """GET through httpx (honours HTTP(S)_PROXY / NO_PROXY), streamed to ``dest``."""
        import httpx

        resp, used = await self._open("GET", url, auth)
        try:
            raise_for_status(resp, "download")
            expected: int | None = None
            encoded = resp.headers.get("content-encoding", "identity").lower() != "identity"
            if "content-length" in resp.headers and not encoded:
                try:
                    expected = int(resp.headers["content-length"])
                except ValueError:
                    expected = None
            written = 0
            limit = _Limit(self._max_bytes)
            limit.check(expected or 0)
            stall = _Stall(self._idle_s)
            chunks = resp.aiter_bytes() if encoded else resp.aiter_raw()
            # Writes go to the page cache (about 1 ms per MiB); doing them here avoids a
            # thread hop per chunk, which costs more throughput than it saves latency.
            with open(dest, "wb") as fh:
                try:
                    async for chunk in chunks:
                        written += len(chunk)
                        limit.check(written)
                        stall.add(len(chunk))
                        fh.write(chunk)
                except httpx.HTTPError as exc:
                    raise BackendError(
                        f"download interrupted after {written} bytes: {type(exc).__name__}"
                    ) from None
            if expected is not None and written != expected:
                raise BackendError(f"download incomplete: {written} of {expected} bytes")
            return FetchResult(
                ext=ext_from_headers(resp.headers, resp.url.path), used_caller_auth=used
            )
        finally:
            await resp.aclose()

    async def check_auth(self, url: str, auth: DownloadAuth | None) -> None:
        resp, _ = await self._open("HEAD", url, auth)
        await resp.aclose()
        if resp.status_code in (405, 501):
            resp, _ = await self._open("GET", url, auth, {"Range": "bytes=0-0"})
            await resp.aclose()
        raise_for_status(resp, "auth check")

    async def remote_size(self, url: str, auth: DownloadAuth | None) -> int | None:
        """The object's size in bytes from a ``HEAD`` (its Content-Length), or None when the
        server gives none (compressed, chunked, HEAD not allowed). Used by the cache to check
        a file it adopts. Raises :class:`AuthError` / :class:`NotFoundError` like a download,
        :class:`BackendError` when the server fails or cannot be reached."""
        resp, _ = await self._open("HEAD", url, auth)
        await resp.aclose()
        if resp.status_code in (405, 501):
            return None
        raise_for_status(resp, "size check")
        if (resp.headers.get("content-encoding") or "identity").lower() != "identity":
            return None
        length = resp.headers.get("content-length") or ""
        return int(length) if length.isdigit() else None

    def upload_url(self, spec: object, filename: str) -> str:
        assert isinstance(spec, HTTPUpload)
        check_name(filename, "filename", allow_slash=False)
        prefix = spec.url_prefix.rstrip("/")
        if not prefix.lower().startswith(("http://", "https://")):
            raise BadRequestError("http_upload.url_prefix: must be an http(s) URL")
        path_part = urllib.parse.urlsplit(prefix).path
        check_name(urllib.parse.unquote(path_part), "http_upload.url_prefix", allow_slash=True)
        return f"{prefix}/{urllib.parse.quote(filename, safe='')}"

    async def upload(self, path: Path, spec: object, filename: str, cancel: CancelToken) -> None:
        import httpx

        url = self.upload_url(spec, filename)
        size = path.stat().st_size
        target, caller_headers, _ = self._prepare(url, None)
        headers = {
            "Content-Type": content_type_for(filename),
            "Content-Length": str(size),
            **caller_headers,
            **self._env_headers_for(target, caller_headers),
        }
        trace = tracing.traceparent()
        if trace is not None:
            headers["traceparent"] = trace

        async def body() -> AsyncIterator[bytes]:
            with open(path, "rb") as fh:
                while True:
                    cancel.check()
                    chunk = await asyncio.to_thread(fh.read, CHUNK)
                    if not chunk:
                        return
                    yield chunk

        try:
            resp = await self.client().put(target, content=body(), headers=headers)
        except SupersededError:
            raise
        except httpx.HTTPError as exc:
            cancel.check()
            raise BackendError(f"upload failed: {type(exc).__name__}") from None
        except StorageError:
            raise
        cancel.check()
        if not 200 <= resp.status_code < 300:
            raise BackendError(f"upload failed: HTTP {resp.status_code}")


def next_hop(current: httpx.URL, location: str) -> httpx.URL:
    """The URL a redirect's ``Location`` points at, relative to ``current``. Raises
    :class:`BackendError` for an unparseable one and :class:`URLRefused` for a scheme other
    than http(s) (``gopher:``, ``file:``, ...); the guard checks its host at connect."""
    import httpx

    try:
        target = current.join(location)
    except (httpx.InvalidURL, ValueError):
        raise BackendError("bad redirect location") from None
    if target.scheme not in ("http", "https"):
        raise URLRefused(f"URL refused: redirect to a {target.scheme or 'relative'!r} URL")
    return target


class _Limit:
    """MAX_DOWNLOAD_GB for one body (``max_bytes`` None = no limit)."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes

    def check(self, size: int) -> None:
        """Raise :class:`BackendError` when ``size`` bytes exceed the limit."""
        if self.max_bytes is not None and size > self.max_bytes:
            raise BackendError(
                f"download larger than MAX_DOWNLOAD_GB ({self.max_bytes / 1024**3:g} GiB); stopped"
            )


class _Stall:
    """The idle-read rule for an async body: at least MIN_PROGRESS bytes per ``idle_s``."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.mark = time.monotonic()
        self.since = 0

    def add(self, n: int) -> None:
        """Count ``n`` bytes received; raise :class:`BackendError` when stalled."""
        self.since += n
        now = time.monotonic()
        if self.since >= MIN_PROGRESS:
            self.mark, self.since = now, 0
        elif now - self.mark > self.idle_s:
            raise BackendError(
                f"download stalled: less than {MIN_PROGRESS // 1024} KiB in {self.idle_s:g} s "
                "(DOWNLOAD_IDLE_TIMEOUT_S)"
            )


class _Watch:
    """Shared by a direct download's thread and its watchdog on the event loop: when the last
    read completed, the connection in use, and why it was cut (if it was)."""

    def __init__(self, trusted: bool) -> None:
        self.trusted = trusted
        self.last = time.monotonic()
        self.reason: str | None = None
        self.stopped = threading.Event()  # set when cut: a ranged download's workers stop
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def attach(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._conn = conn
            self.last = time.monotonic()
        self.check()

    def progress(self) -> None:
        self.last = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last

    def abort(self, reason: str) -> None:
        """Cut the download: the blocked read returns at once with an error."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            sock = self._conn.sock if self._conn is not None else None
        self.stopped.set()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def check(self) -> None:
        """Raise :class:`BackendError` with the reason when the download was cut."""
        if self.reason is not None:
            raise BackendError(self.reason)


_SSL: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL
    if _SSL is None:
        _SSL = ssl.create_default_context()
    return _SSL


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
