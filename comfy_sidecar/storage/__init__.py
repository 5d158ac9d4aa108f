"""Storage: the download cache plus the four backends (S3, Hugging Face, Azure Blob, HTTP),
behind one facade the pipeline holds.

Downloads are routed by URL, in comfyui-api's order: ``s3://`` -> S3; a Hub ``/resolve/`` URL on
huggingface.co or ``HF_ENDPOINT``'s host -> Hugging Face; ``*.blob.core.windows.net`` and
Azurite URLs -> Azure; any other http(s) URL -> HTTP. Uploads are routed by the request key
(``s3``, ``hf_upload``, ``azure_blob_upload``, ``http_upload``; first present wins).

Usage::

    storage = Storage(settings, on_event=send_system_event)
    await storage.start()
    with storage.lease() as lease:                # one per job: nothing it uses is evicted
        auth = storage.credentials_for(url, request.credentials)
        name = await storage.stage_input(url, auth, Path(settings.input_dir), "job/x.png", lease)
        model = await storage.stage_model(url, auth, Path(settings.model_dir) / "loras", lease)
    # spec: the request's S3Upload | HFUpload | AzureBlobUpload | HTTPUpload
    url = await storage.upload(output_path, spec, output_filename)
    await storage.close()
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_sidecar.errors import InputError
from comfy_sidecar.net.urls import scrub_url
from comfy_sidecar.observability import tracing
from comfy_sidecar.schemas import (
    AzureBlobUpload,
    Credential,
    DownloadAuth,
    HFUpload,
    HTTPUpload,
    PromptOptions,
    S3Auth,
    S3Upload,
)
from comfy_sidecar.storage import netguard
from comfy_sidecar.storage.backends.azure import AzureBackend
from comfy_sidecar.storage.backends.base import Backend, CancelToken
from comfy_sidecar.storage.backends.hf import HFBackend
from comfy_sidecar.storage.backends.http import HTTPBackend
from comfy_sidecar.storage.backends.s3 import S3Backend, parse_s3_url
from comfy_sidecar.storage.cache import DownloadCache, EventFn, Lease
from comfy_sidecar.storage.errors import (
    AuthError,
    BackendError,
    BadRequestError,
    CacheConflictError,
    DiskFullError,
    NotFoundError,
    OutputMissingError,
    StorageError,
    SupersededError,
    URLRefused,
)
from comfy_sidecar.storage.globs import compile_glob, glob_problem

if TYPE_CHECKING:
    from comfy_sidecar.config import Settings

log = logging.getLogger("comfy_sidecar.storage")

UploadSpec = S3Upload | HFUpload | AzureBlobUpload | HTTPUpload

#: Threads for HTTP download bodies: one per download in flight (threads are made on demand;
#: each blocks on its socket, holding a 256 KiB buffer).
HTTP_DOWNLOAD_THREADS = 64
#: How long a superseding upload waits for the one it aborted to stop, in seconds.
SUPERSEDE_WAIT_S = 120.0


@dataclass
class _ActiveUpload:
    cancel: CancelToken
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Storage:
    """The facade: cache + backends + uploads. One per process; call :meth:`start` first.

    ``on_event(name, data)`` receives ``file_downloaded``, ``file_uploaded`` and
    ``file_deleted`` with ``{url, local_path, size, duration}`` (url without credentials,
    bytes, seconds). ``env`` (default ``os.environ``) supplies the SDK variables: ``AWS_*``,
    ``HF_TOKEN``, ``HF_ENDPOINT``, ``AZURE_STORAGE_*``. ``max_workers`` bounds the threads
    for SDK calls and, separately, for HTTP download bodies. Every method raises a
    :class:`StorageError` subclass (see :mod:`comfy_sidecar.storage.errors`).
    """

    def __init__(
        self,
        settings: Settings,
        on_event: EventFn | None = None,
        env: Mapping[str, str] | None = None,
        *,
        max_workers: int = 8,
    ) -> None:
        env = os.environ if env is None else env
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="storage")
        # HTTP bodies get their own threads so long downloads never queue SDK calls, and one
        # thread per download (up to HTTP_DOWNLOAD_THREADS): a slow server can hold its own
        # thread, never another job's turn; the watchdog frees it when the body stalls for
        # DOWNLOAD_IDLE_TIMEOUT_S or the download is cancelled.
        self._http_executor = ThreadPoolExecutor(
            HTTP_DOWNLOAD_THREADS, thread_name_prefix="storage-http"
        )
        #: The SSRF guard every caller's URL passes (see :mod:`comfy_sidecar.storage.netguard`).
        self.guard = netguard.NetGuard(settings)
        self.http = HTTPBackend(settings, self._http_executor, self.guard)
        self.s3 = S3Backend(env, self._executor, settings.download_connections)
        self.hf = HFBackend(env, self._executor)
        self.azure = AzureBackend(env, self._executor)
        #: Download routing order (comfyui-api's provider order; HTTP is the catch-all).
        self.backends: list[Backend] = [self.s3, self.hf, self.azure, self.http]
        self.cache = DownloadCache(
            Path(settings.cache_dir),
            max_bytes=int(settings.lru_cache_size_gb * 1024**3),
            on_event=on_event,
        )
        self._uploads: dict[str, _ActiveUpload] = {}

    # --- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare ``CACHE_DIR`` (load the index, drop partials, evict to the limit)."""
        await self.cache.start()

    async def close(self) -> None:
        """Abort uploads and downloads in flight, write the index, close clients."""
        for active in list(self._uploads.values()):
            active.cancel.cancel()
        pending = [a.done for a in self._uploads.values()]
        if pending:
            await asyncio.wait(pending, timeout=10)
        await self.cache.close()
        await self.http.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._http_executor.shutdown(wait=False, cancel_futures=True)

    # --- routing -------------------------------------------------------------------------

    def backend_for(self, url: str) -> Backend:
        """The backend that downloads ``url``. Raises :class:`BadRequestError`."""
        if not isinstance(url, str) or "\x00" in url:
            raise BadRequestError("invalid URL")
        for backend in self.backends:
            if backend.handles(url):
                return backend
        raise BadRequestError("no storage backend for this URL (use http(s):// or s3://)")

    # --- downloads -----------------------------------------------------------------------
    async def _route(self, url: str, auth: DownloadAuth | None) -> Backend:
        """:meth:`backend_for` after :meth:`check_url` (skipped inside
        :func:`~comfy_sidecar.storage.netguard.trusted`)."""
        backend = self.backend_for(url)
        if not netguard.is_trusted():
            await self.check_url(url, auth, backend)
        return backend

    async def check_url(
        self, url: str, auth: DownloadAuth | None = None, backend: Backend | None = None
    ) -> None:
        """Refuse a caller's download URL the guard forbids: a scheme other than http(s)/s3,
        or a host the caller chose (HTTP, an Azure account other than the configured one; not
        Hugging Face's or S3's endpoints, which the operator chose) resolving to a refused
        address; an ``s3`` auth ``endpoint`` is
        checked the same way. Raises :class:`URLRefused` (a :class:`BadRequestError`)."""
        backend = backend or self.backend_for(url)
        caller_host = backend is self.http or (
            backend is self.azure and not self.azure.uses_configured_endpoint(url)
        )
        await self.guard.check_url(url, resolve=caller_host)
        if isinstance(auth, S3Auth) and auth.endpoint:
            await self.guard.check_url(auth.endpoint)

    async def check_webhook(self, url: str, location: str) -> None:
        """The check a caller's webhook URL gets before its job is accepted (``webhook``,
        ``webhook_v2``, the Modal jobs API's ``webhook_url``, ai-dock's ``input.webhook.url``):
        an http(s) URL whose host the SSRF guard lets through, directly or through
        HTTP(S)_PROXY (:meth:`~comfy_sidecar.storage.netguard.NetGuard.check_field`). Raises
        :class:`InputError` naming ``location`` (a 400)."""
        await self.guard.check_field(url, location, schemes=("http", "https"))

    async def check_request(self, options: PromptOptions) -> None:
        """Check a request's URLs before its job starts: ``webhook`` and ``webhook_v2``
        (:meth:`check_webhook`), ``http_upload.url_prefix``, each ``credentials[i]``'s
        ``url_pattern`` bounds and s3 ``auth.endpoint``. Raises :class:`InputError` naming
        the field (``webhook_v2``, ``credentials[0].url_pattern``, ...)."""
        web = ("http", "https")
        if options.webhook is not None:
            await self.check_webhook(options.webhook, "webhook")
        if options.webhook_v2 is not None:
            await self.check_webhook(options.webhook_v2, "webhook_v2")
        if options.http_upload is not None:
            await self.guard.check_field(
                options.http_upload.url_prefix, "http_upload.url_prefix", schemes=web
            )
        for index, cred in enumerate(options.credentials or ()):
            problem = glob_problem(cred.url_pattern)
            if problem is not None:
                where = f"credentials[{index}].url_pattern"
                raise InputError(f"{where}: {problem}", where)
            if isinstance(cred.auth, S3Auth) and cred.auth.endpoint:
                where = f"credentials[{index}].auth.endpoint"
                await self.guard.check_field(cred.auth.endpoint, where, schemes=web)

    def lease(self) -> Lease:
        """A lease for one job: pass it to the staging calls; release it when the job ends."""
        return self.cache.lease()

    async def fetch(self, url: str, auth: DownloadAuth | None, lease: Lease | None = None) -> Path:
        """Path of ``url``'s cache file (downloaded once). Read it; do not move it."""
        return await self.cache.get(url, auth, await self._route(url, auth), lease)

    async def stage_input(
        self,
        url: str,
        auth: DownloadAuth | None,
        input_dir: Path | str,
        name: str,
        lease: Lease | None = None,
    ) -> str:
        """Download ``url`` (cached) and hardlink it to ``input_dir/name`` (copy when hardlinks
        fail; never a symlink, ComfyUI >= 0.28 rejects those). Returns ``name``, the value for
        the ``LoadImage``/``LoadAudio``/... input. Raises :class:`StorageError`."""
        return await self.cache.stage_input(
            url, auth, await self._route(url, auth), Path(input_dir), name, lease
        )

    async def stage_model(
        self,
        url: str,
        auth: DownloadAuth | None,
        folder_dir: Path | str,
        lease: Lease | None = None,
    ) -> str:
        """Download ``url`` (cached) and link it into the model folder ``folder_dir`` (e.g.
        ``MODEL_DIR/upscale_models``) under its cache name. Returns that file name, e.g.
        ``Pk6VSKLStckZydwGhX0bM8TqaqHEW9yt.safetensors``, the loader input's new value."""
        return await self.cache.stage_model(
            url, auth, await self._route(url, auth), Path(folder_dir), lease
        )

    async def link(
        self,
        url: str,
        auth: DownloadAuth | None,
        dest_path: Path | str,
        lease: Lease | None = None,
    ) -> Path:
        """Download ``url`` (cached) and link it at exactly ``dest_path`` (manifest
        ``local_path``, ``POST /download`` ``filename``), replacing a link to another URL's
        entry; a foreign file there raises :class:`CacheConflictError`. The caller checks
        ``dest_path`` is where it may write. Returns ``dest_path``."""
        return await self.cache.link(
            url, auth, await self._route(url, auth), Path(dest_path), lease
        )

    @staticmethod
    def credentials_for(url: str, credentials: list[Credential] | None) -> DownloadAuth | None:
        """comfyui-api's credential resolver: the ``auth`` of the first entry whose
        ``url_pattern`` glob (``**`` any, ``*`` any but ``/``, ``?`` one character) matches
        the whole URL, else None. Matching is linear in the URL's length (see
        :class:`~comfy_sidecar.storage.backends.base.Glob`); a pattern over the bounds raises
        :class:`BadRequestError` (:meth:`check_request` refuses those at submission)."""
        for cred in credentials or ():
            if compile_glob(cred.url_pattern).match(url):
                return cred.auth
        return None

    # --- uploads -------------------------------------------------------------------------

    def _upload_backend(self, spec: UploadSpec) -> Backend:
        if isinstance(spec, S3Upload):
            return self.s3
        if isinstance(spec, HFUpload):
            return self.hf
        if isinstance(spec, AzureBlobUpload):
            return self.azure
        if isinstance(spec, HTTPUpload):
            return self.http
        raise BadRequestError("unknown upload spec")

    def upload_spec(self, prefix: str) -> UploadSpec:
        """The upload block that puts files under the URL ``prefix`` (routed as downloads
        are): ``s3://bucket[/prefix]`` -> :class:`S3Upload`; a Hub
        ``https://huggingface.co/[datasets/]org/repo/resolve/<rev>[/dir]`` -> :class:`HFUpload`;
        an Azure ``https://<account>.blob.core.windows.net/<container>[/prefix]`` (the
        configured account) -> :class:`AzureBlobUpload`; any other http(s) URL ->
        :class:`HTTPUpload` (PUT). What ``JOB_OUTPUT_URL`` names. Raises
        :class:`BadRequestError` for anything else."""
        import urllib.parse

        base = prefix.rstrip("/")
        scheme = urllib.parse.urlsplit(base).scheme
        probe = f"{base}/_"  # the backends parse file URLs: the prefix holds a file "_"
        if scheme == "s3":
            bucket, key = parse_s3_url(probe)
            return S3Upload(bucket=bucket, prefix=key.rpartition("/")[0])
        if scheme not in ("http", "https"):
            raise BadRequestError("expected an s3://, http(s)://, Hugging Face or Azure URL")
        if "/resolve/" in probe and self.hf.handles(probe):
            target = self.hf.parse(probe)
            return HFUpload(
                repo=target.repo_id,
                repo_type="dataset" if target.repo_type == "dataset" else "model",
                revision=target.revision,
                directory=target.path.rpartition("/")[0],
            )
        if self.azure.handles(probe):
            _, container, blob = self.azure.parse(probe)
            return AzureBlobUpload(container=container, blob_prefix=blob.rpartition("/")[0])
        return HTTPUpload(url_prefix=base)

    def upload_url(self, spec: UploadSpec, filename: str) -> str:
        """Where :meth:`upload` puts ``filename``: ``s3://bucket/prefix/file``,
        ``https://huggingface.co/[datasets/]repo/resolve/rev/dir/file``,
        ``<account url>/<container>/<prefix>/file``, ``<url_prefix>/file`` (exactly one ``/``
        between prefix and file, unlike comfyui-api). Raises :class:`BadRequestError` for
        traversal (``..``, absolute, NUL) in the file name or prefix."""
        return self._upload_backend(spec).upload_url(spec, filename)

    async def upload(self, path: Path | str, spec: UploadSpec, filename: str) -> str:
        """Upload the file at ``path`` (streamed) as ``filename`` under ``spec``; returns the
        URL (see :meth:`upload_url`). Emits ``file_uploaded``.

        A later upload to the same URL aborts this one (comfyui-api's "latest wins"): this
        call then raises :class:`SupersededError` after the backend stopped. A missing
        ``path`` raises :class:`OutputMissingError`; a bad spec :class:`BadRequestError`; any
        backend failure :class:`BackendError` — never passes silently.
        """
        backend = self._upload_backend(spec)
        url = backend.upload_url(spec, filename)
        with tracing.span("upload") as span:
            if span.recording:
                span.set("url.full", scrub_url(url))
            return await self._upload(backend, url, Path(path), spec, filename, span)

    async def _upload(
        self,
        backend: Backend,
        url: str,
        path: Path,
        spec: UploadSpec,
        filename: str,
        span: tracing.Span | tracing.NoSpan,
    ) -> str:
        active = _ActiveUpload(CancelToken())
        previous = self._uploads.get(url)
        self._uploads[url] = active  # registered before any await
        clean = scrub_url(url)
        try:
            if previous is not None:
                previous.cancel.cancel()
                await asyncio.wait([previous.done], timeout=SUPERSEDE_WAIT_S)
            active.cancel.check()
            try:
                size = path.stat().st_size
            except OSError:
                raise OutputMissingError(f"{filename}: output file missing") from None
            span.set("upload.bytes", size)
            started = time.monotonic()
            try:
                await backend.upload(path, spec, filename, active.cancel)
            except (BadRequestError, SupersededError):
                raise
            except StorageError as exc:  # any backend refusal of an upload is a backend failure
                raise BackendError(str(exc)) from None
            except Exception as exc:
                raise BackendError(f"upload failed: {type(exc).__name__}") from None
            duration = time.monotonic() - started
            mbps = size / 1e6 / duration if duration > 0 else 0.0
            log.info("uploaded %s: %d bytes in %.2f s (%.1f MB/s)", clean, size, duration, mbps)
            self.cache.emit(
                "file_uploaded",
                {"url": clean, "local_path": str(path), "size": size, "duration": duration},
            )
            return url
        except SupersededError:
            log.info("upload to %s superseded by a later one", clean)
            raise
        finally:
            if self._uploads.get(url) is active:
                del self._uploads[url]
            if not active.done.done():
                active.done.set_result(None)


__all__ = [
    "AuthError",
    "Backend",
    "BackendError",
    "BadRequestError",
    "CacheConflictError",
    "DiskFullError",
    "Lease",
    "NotFoundError",
    "OutputMissingError",
    "Storage",
    "StorageError",
    "SupersededError",
    "URLRefused",
    "UploadSpec",
]
