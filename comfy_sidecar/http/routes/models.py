"""``POST /download``, ``GET /download/{key}`` and ``GET /models`` (comfyui-api's E6/E3).

Differences from comfyui-api: ``model_type`` is checked against ComfyUI's folders at request
time (comfyui-api freezes an enum at boot, W-B10); the download goes through the cache under its
URL-hash name and only the *link* is called ``filename`` (W-B1), so a restart hits the cache; a
URL without an extension gets the cache file's extension so ComfyUI lists it; ``filename`` with a
path is refused (comfyui-api allows ``../``); ``GET /download/{key}`` reports async downloads
(comfyui-api has no status endpoint); ``GET /models`` is live and never 500s on new folders.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from litestar import Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from msgspec import Meta

from comfy_sidecar.errors import (
    Conflict,
    InputError,
    NotFound,
    SidecarError,
    Unavailable,
)
from comfy_sidecar.schemas import DownloadAuth, ErrorResponse

if TYPE_CHECKING:
    from comfy_sidecar.comfy.client import ComfyClient
    from comfy_sidecar.storage import Storage

log = logging.getLogger("comfy_sidecar.routes.models")

#: Download records kept for ``GET /download/{key}`` (oldest finished ones dropped first).
MAX_RECORDS = 512

#: Extensions ComfyUI lists in its model folders (``folder_paths.supported_pt_extensions``
#: plus the extra ones some folders use); a name ending otherwise gets the cache file's one.
MODEL_EXTENSIONS = frozenset(
    {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft", ".gguf", ".onnx"}
    | {".yaml", ".json", ".txt", ".csv", ".npz", ".patch"}
)


class DownloadRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /download`` body (comfyui-api's, plus nothing)."""

    url: Annotated[
        str, Meta(description="Model URL: http(s)://, s3://, a Hugging Face or Azure Blob URL.")
    ]
    model_type: Annotated[
        str,
        Meta(description="ComfyUI model folder, e.g. `checkpoints`, `loras` (see GET /models)."),
    ]
    filename: Annotated[
        str | None,
        Meta(
            description="Link name in the folder (no `/`). Default: the URL's file name; the "
            "cache file's extension is added when that has none ComfyUI lists."
        ),
    ] = None
    wait: Annotated[
        bool, Meta(description="Answer 200 when the file is in place (else 202 at once).")
    ] = False
    auth: Annotated[
        DownloadAuth | None, Meta(description="Credentials for this URL (not cached).")
    ] = None


class DownloadResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A download's state: the ``POST /download`` answer and ``GET /download/{key}``."""

    url: Annotated[str, Meta(description="The URL, credentials removed.")]
    model_type: str
    filename: Annotated[
        str, Meta(description="Link name in MODEL_DIR/<model_type>, what loaders take.")
    ]
    status: Annotated[
        Literal["started", "completed", "failed"],
        Meta(description="`started` (running), `completed` or `failed`."),
    ]
    key: Annotated[
        str, Meta(description="Cache key of the URL; GET /download/{key} reports progress.")
    ]
    size: Annotated[int | None, Meta(description="Bytes, when completed.")] = None
    duration: Annotated[float | None, Meta(description="Seconds, when finished.")] = None
    bytes_done: Annotated[
        int | None, Meta(description="Bytes downloaded so far, while started.")
    ] = None
    error: Annotated[str | None, Meta(description="Why it failed.")] = None


ModelsResponse = dict[str, list[str]]

ERRORS = {
    400: ResponseSpec(
        ErrorResponse,
        description="Bad URL, unknown model_type, filename with a path, or (with wait) a "
        "failed download; `location` names the field.",
    ),
    409: ResponseSpec(ErrorResponse, description="A file not made by the cache has that name."),
    503: ResponseSpec(ErrorResponse, description="ComfyUI is not answering."),
    507: ResponseSpec(ErrorResponse, description="(With wait) the sidecar's disk is full."),
}


class ModelDownloads:
    """``POST /download``'s service: runs downloads into model folders (``storage``, under
    ``model_dir``, as tasks owned by ``spawn``) and keeps a bounded record of them by cache key
    (one per URL at a time). ``client()`` is the ComfyUI client that lists model folders."""

    def __init__(
        self,
        storage: Storage,
        model_dir: str,
        client: Callable[[], ComfyClient],
        spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]],
    ) -> None:
        self.storage = storage
        self.model_dir = Path(model_dir)
        self.client = client
        self.spawn = spawn
        self.records: OrderedDict[str, DownloadResponse] = OrderedDict()

    def put(self, record: DownloadResponse) -> None:
        """Keep ``record`` (dropping the oldest finished ones past :data:`MAX_RECORDS`)."""
        self.records[record.key] = record
        self.records.move_to_end(record.key)
        while len(self.records) > MAX_RECORDS:
            oldest = next(
                (k for k, r in self.records.items() if r.status != "started"),
                next(iter(self.records)),
            )
            del self.records[oldest]

    async def known_folders(self) -> list[str]:
        """ComfyUI's model folders; :class:`Unavailable` when it does not answer."""
        from comfy_sidecar.comfy.client import ComfyUnavailable

        try:
            return await self.client().model_folders()
        except ComfyUnavailable as exc:
            raise Unavailable(f"ComfyUI is not answering: {exc}") from None


def _default_name(url: str) -> str:
    """The URL path's last segment, percent-decoded (comfyui-api's ``basename(pathname)``)."""
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(path.rstrip("/").rsplit("/", 1)[-1])


def _check_filename(name: str, location: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise InputError("filename: must be a plain file name (no path)", location)


def _final_name(name: str, cache_file: Path) -> str:
    """``name``, or ``name`` + the cache file's extension when ``name`` has none ComfyUI
    lists (``128713`` + ``.safetensors``)."""
    if os.path.splitext(name)[1].lower() in MODEL_EXTENSIONS:
        return name
    ext = os.path.splitext(cache_file.name)[1]
    return name + ext if ext and not name.endswith(ext) else name


async def _run_download(
    downloads: NamedDependency[ModelDownloads],
    record: DownloadResponse,
    auth: DownloadAuth | None,
    url: str,
    name: str,
) -> tuple[DownloadResponse, Exception | None]:
    """Fetch ``url`` into the cache and link it as ``name`` (extension fixed) in the folder;
    updates ``record`` and returns it with the storage error that failed it, if any (a
    waiting caller then gets :func:`_failure`). Never raises."""
    from comfy_sidecar.storage import StorageError

    storage = downloads.storage
    folder = downloads.model_dir / record.model_type
    started = time.monotonic()
    cause: Exception | None = None
    try:
        with storage.lease() as lease:
            cached = await storage.fetch(url, auth, lease)
            record.filename = _final_name(name, cached)
            dest = await storage.link(url, auth, folder / record.filename, lease)
            record.size = os.stat(dest).st_size
        record.status = "completed"
        log.info("download %s -> %s (%d bytes)", record.url, dest, record.size)
    except StorageError as exc:
        record.status, record.error = "failed", str(exc)
        cause = exc
    except Exception as exc:
        # an OSError's str() names the file: only its reason reaches the caller
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        record.status, record.error = "failed", f"{type(exc).__name__}: {reason}"
    record.duration = time.monotonic() - started
    if record.error is not None:
        log.warning("download %s failed: %s", record.url, record.error)
    return record, cause


def _failure(message: str, cause: Exception | None) -> SidecarError:
    """What a waiting ``POST /download`` raises: :class:`Conflict` when a file the cache did
    not make is in the way, :class:`UpstreamFailed` (507) on a full disk, else
    :class:`InputError` naming ``url`` (comfyui-api answers failed downloads with 400)."""
    from comfy_sidecar.pipeline.run import download_error
    from comfy_sidecar.storage import CacheConflictError

    if isinstance(cause, CacheConflictError):
        return Conflict(message, location="url")
    return download_error(message, cause, "url")


@post(
    "/download",
    summary="Download a model into a ComfyUI model folder",
    tags=["models"],
    status_code=202,
    responses={
        200: ResponseSpec(DownloadResponse, description="With `wait`: the file is in place."),
        **ERRORS,
    },
    description="Download `url` through the cache (once per URL) and link it as "
    "MODEL_DIR/`model_type`/`filename`. Answers 202 `status: started` at once, or with "
    "`wait: true` 200 `status: completed` with `size` (bytes) and `duration` (s). "
    "GET /download/{key} reports an async download.",
)
async def download(
    data: DownloadRequest, downloads: NamedDependency[ModelDownloads]
) -> Response[DownloadResponse]:
    """Start (or join) a model download."""
    from comfy_sidecar.net.urls import is_url, scrub_url
    from comfy_sidecar.storage.cache import cache_key

    if not is_url(data.url):
        raise InputError("url: not a URL (http://, https:// or s3://)", "url")
    try:
        await downloads.storage.check_url(data.url, data.auth)  # the SSRF guard
    except Exception as exc:
        raise InputError(f"url: {exc}", "url") from None
    if data.filename is not None:
        _check_filename(data.filename, "filename")
        name = data.filename
    else:
        name = _default_name(data.url)
        if not name or name in (".", ".."):
            name = cache_key(data.url)
        _check_filename(name, "url")
    folders = await downloads.known_folders()
    if data.model_type not in folders:
        raise InputError(
            f"model_type: ComfyUI has no model folder {data.model_type!r} "
            f"(it has: {', '.join(sorted(folders)) or 'none'})",
            "model_type",
        )
    key = cache_key(data.url)
    record = DownloadResponse(
        url=scrub_url(data.url),
        model_type=data.model_type,
        filename=name,
        status="started",
        key=key,
    )
    downloads.put(record)
    task = downloads.spawn(_run_download(downloads, record, data.auth, data.url, name))
    if not data.wait:
        return Response(record, status_code=202)
    done, cause = await asyncio.shield(task)
    if done.status == "failed":
        raise _failure(done.error or "the download failed", cause)
    return Response(done, status_code=200)


@get(
    "/download/{key:str}",
    summary="State of a model download",
    tags=["models"],
    sync_to_thread=False,
    responses={404: ResponseSpec(ErrorResponse, description="No download with this key.")},
    description="`status` `started` (with `bytes_done`), `completed` (with `size`, `duration`) "
    "or `failed` (with `error`) for the download whose `key` POST /download returned.",
)
def download_status(key: str, downloads: NamedDependency[ModelDownloads]) -> DownloadResponse:
    """Report one download."""
    record = downloads.records.get(key)
    if record is None:
        raise NotFound(f"no download with key {key!r}", location="key")
    if record.status == "started":
        done = downloads.storage.cache.progress_by_key(key) or 0
        return msgspec.structs.replace(record, bytes_done=done)
    return record


@get(
    "/models",
    summary="ComfyUI's model folders and their files",
    tags=["models"],
    responses={503: ResponseSpec(ErrorResponse, description="ComfyUI is not answering.")},
    description="`{folder: [file, ...]}`, asked of ComfyUI on every call (`GET /models`, then "
    "`GET /models/{folder}` for each, concurrently).",
)
async def models(downloads: NamedDependency[ModelDownloads]) -> ModelsResponse:
    """List model folders and files, live."""
    from comfy_sidecar.comfy.client import ComfyUnavailable

    folders = await downloads.known_folders()
    client = downloads.client()
    try:
        listed = await asyncio.gather(*(client.models_in(f) for f in folders))
    except ComfyUnavailable as exc:
        raise Unavailable(f"ComfyUI is not answering: {exc}") from None
    pairs = zip(folders, listed, strict=True)
    return {folder: files for folder, files in pairs if files is not None}


route_handlers = [download, download_status, models]
