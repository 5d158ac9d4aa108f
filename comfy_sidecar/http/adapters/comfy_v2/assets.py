"""Comfy API v2 assets (``/api/v2/assets``), as comfy-sdk 0.5.0 calls them
(``comfy_low/transport.py``: ``post_assets``, ``asset_from_hash``, ``head_asset_by_hash``,
``get_asset``, ``delete_asset``, ``get_asset_content`` with ``Range``), and the resolution of
``core/ASSET`` references in a submitted workflow (:func:`resolve_assets`, for
``POST /api/v2/jobs``).

- ``POST /assets``: a streamed ``multipart/form-data`` upload (fields ``file``,
  ``content_type``, ``file_path``, ``expected_hash``, ``tags`` repeated, in any order), never
  read whole: the body is parsed as it arrives (the ``multipart`` package's push parser, the
  one Litestar's own form parsing uses) and the file part streams to disk through blake3.
  201 with ``created_new: true`` for new bytes, 200 with ``created_new: false`` for bytes
  kept already. ``Idempotency-Key`` is single-use (:mod:`comfy_sidecar.http.idempotency`).
  MAX_BODY_SIZE_MB does not bound it; ASSET_MAX_UPLOAD_MB does (413 ``payload_too_large``,
  at once when ``Content-Length`` says so).
- ``POST /assets/from-hash`` ``{hash, file_path?, tags?}``: a new asset over kept bytes (200),
  404 ``blob_not_found`` otherwise. ``HEAD /assets/by-hash/{hash}``: 200 kept, 404 not.
- ``GET /assets/{id}``: the asset with a fresh signed ``url``; ``DELETE /assets/{id}``: 204.
- ``GET /assets/{id}/content``: the bytes, streamed, one ``Range`` honoured (206). Answered
  without an API key when ``exp`` and ``sig`` (the signed ``url``'s query) verify; a wrong
  or expired signature is 403 ``forbidden`` (:class:`~comfy_sidecar.assets.signing.UrlSigner`).

A job's outputs are assets too: the id :func:`output_asset_id` ``(job_id, n)`` names output
``n`` of a retained job, read through the job backend (``JobBackend.get`` /
``JobBackend.output``) from any replica, wherever the backend keeps it; ``GET`` and
``.../content`` answer for it as for an upload.

Every answer's errors are the v2 envelope (:mod:`.errors`); statuses come from
:data:`comfy_sidecar.http.errors.STATUS`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, head, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.response import Stream
from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header

from comfy_sidecar.assets import (
    ASSET_TYPE,
    AssetReference,
    Received,
    UrlSigner,
    check_upload,
    find_asset_references,
    missing_assets,
    parse_hash,
    replace_asset_references,
)
from comfy_sidecar.assets import Asset as StoredAsset
from comfy_sidecar.assets.service import AssetService
from comfy_sidecar.errors import AssetNotFound, InputError, MissingAsset, PayloadTooLarge
from comfy_sidecar.http.adapters.comfy_v2.models import Asset, ErrorEnvelope
from comfy_sidecar.http.auth import SIGNED_CONTENT
from comfy_sidecar.http.errors import envelope
from comfy_sidecar.http.idempotency import IdempotencyKeys, idempotency_key, single_use
from comfy_sidecar.http.ranges import Unsatisfiable, parse_range
from comfy_sidecar.http.routes.jobs import content_disposition
from comfy_sidecar.jobs.backend import JobBackend
from comfy_sidecar.jobs.model import JobView, ms_of
from comfy_sidecar.pipeline.preprocess import media_dir
from comfy_sidecar.pipeline.staging import Staging

__all__ = [
    "ROUTES",
    "AssetInputs",
    "asset_body",
    "origin_of",
    "output_asset_id",
    "parse_output_asset_id",
    "resolve_assets",
]

TAGS = ["comfy api v2"]
#: Room for the multipart framing and the text fields on top of the file's bytes, when an
#: upload's ``Content-Length`` is checked before reading.
FRAMING_ALLOWANCE = 1024 * 1024
#: Most parts of an upload (fields, tags, the file).
MAX_PARTS = 128
#: Most bytes of one text field.
MAX_FIELD_BYTES = 64 * 1024
#: The text fields of an upload (any other part is skipped).
FIELDS = ("content_type", "file_path", "expected_hash")


def origin_of(request: Request[Any, Any, Any]) -> str:
    """``scheme://host[:port]`` the request was sent to (from the ``Host`` header): what a
    signed URL is made absolute against (comfy-sdk types ``url`` as ``AnyUrl``)."""
    return f"{request.url.scheme}://{request.url.netloc}"


def asset_body(
    asset: StoredAsset, signer: UrlSigner, origin: str, *, created_new: bool | None = None
) -> Asset:
    """The v2 ``Asset`` of a kept asset, with a content ``url`` signed now (absolute against
    ``origin``) and its ``url_expires_at``."""
    signed = signer.sign(asset.id)
    return Asset(
        id=asset.id,
        hash=asset.hash,
        size_bytes=asset.size_bytes,
        content_type=asset.content_type,
        created_at=asset.created_at.isoformat(),
        url=signed.absolute(origin),
        url_expires_at=signed.expires_at_text,
        file_path=asset.file_path,
        created_new=created_new,
        expires_at=asset.expires_at.isoformat() if asset.expires_at is not None else None,
        job_id=asset.job_id,
    )


# --- job outputs as assets ------------------------------------------------------------------

#: Between the job id and the output's index in an output's asset id (a job id never holds
#: it, an upload's UUID neither).
OUTPUT_SEPARATOR = "."


def output_asset_id(job_id: str, index: int) -> str:
    """The asset id of output ``index`` of job ``job_id`` (``<job id>.<index>``): the v2
    ``Output.id``, read by ``GET /api/v2/assets/{id}[/content]`` on any replica through the
    job backend."""
    return f"{job_id}{OUTPUT_SEPARATOR}{index}"


def parse_output_asset_id(asset_id: str) -> tuple[str, int] | None:
    """``(job id, index)`` of an :func:`output_asset_id`, else None."""
    job_id, sep, index = asset_id.rpartition(OUTPUT_SEPARATOR)
    if not sep or not job_id or not index.isascii() or not index.isdigit() or len(index) > 9:
        return None
    return job_id, int(index)


async def _output(jobs: JobBackend, asset_id: str) -> tuple[JobView, int]:
    """The retained job and index an output asset id names. Raises AssetNotFound."""
    parsed = parse_output_asset_id(asset_id)
    view = await jobs.get(parsed[0]) if parsed is not None else None
    if parsed is None or view is None or not 0 <= parsed[1] < len(view.outputs):
        raise AssetNotFound(f"no asset with id {asset_id!r}", location="id")
    return view, parsed[1]


def _iso_of(text: str | None) -> str | None:
    """A job body's time as RFC 3339 with its zone (the v2 form)."""
    ms = ms_of(text)
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _output_body(view: JobView, index: int, asset_id: str, signer: UrlSigner, origin: str) -> Asset:
    info = view.outputs[index]
    signed = signer.sign(asset_id)
    digest = getattr(info, "hash", None)  # the job backend's blake3 of a retained file, if any
    return Asset(
        id=asset_id,
        hash=digest if isinstance(digest, str) else None,
        size_bytes=info.size_bytes,
        content_type=info.mime_type,
        created_at=_iso_of(view.completed_at) or _iso_of(view.created_at) or "",
        url=signed.absolute(origin),
        url_expires_at=signed.expires_at_text,
        file_path=info.filename,
        job_id=view.id,
    )


# --- streamed multipart -----------------------------------------------------------------------


class _End:
    """The end of the multipart body."""


_END = _End()


class MultipartStream:
    """A ``multipart/form-data`` body parsed as ``chunks`` arrive (the ``multipart`` package's
    :class:`~multipart.PushMultipartParser`): :meth:`next_part` gives each part's headers,
    :meth:`body` / :meth:`text` its bytes. Only the events of one received chunk are buffered.
    Raises :class:`~comfy_sidecar.errors.InputError` (``body``) for a malformed body."""

    def __init__(self, chunks: AsyncIterator[bytes], boundary: str) -> None:
        self._chunks = chunks
        self._parser = PushMultipartParser(boundary, max_segment_count=MAX_PARTS)
        self._events: deque[MultipartSegment | bytes | None] = deque()

    async def _event(self) -> MultipartSegment | bytes | _End | None:
        while not self._events:
            if self._parser.closed:
                return _END
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                chunk = b""
            try:
                self._events.extend(self._parser.parse(chunk))
            except MultipartError as exc:
                raise InputError(f"malformed multipart/form-data body: {exc}", "body") from None
        return self._events.popleft()

    async def next_part(self) -> MultipartSegment | None:
        """The next part's headers (after the previous part's body was read), or None at
        the end."""
        event = await self._event()
        if isinstance(event, _End):
            return None
        if not isinstance(event, MultipartSegment):  # the parser's own order forbids it
            raise InputError("malformed multipart/form-data body", "body")
        return event

    async def body(self) -> AsyncIterator[bytes]:
        """The current part's bytes, as they arrive."""
        while True:
            event = await self._event()
            if event is None:
                return
            if not isinstance(event, bytes | bytearray | memoryview):
                raise InputError("malformed multipart/form-data body", "body")
            yield bytes(event)

    async def text(self, name: str) -> str:
        """The current part as UTF-8 text, at most :data:`MAX_FIELD_BYTES`."""
        data = bytearray()
        async for chunk in self.body():
            data += chunk
            if len(data) > MAX_FIELD_BYTES:
                raise InputError(f"longer than {MAX_FIELD_BYTES} bytes", name)
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InputError("expected UTF-8 text", name) from None


@dataclass
class _Upload:
    """What an upload's parts said."""

    fields: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    filename: str | None = None
    part_type: str | None = None
    received: Received | None = None

    @property
    def file_path(self) -> str | None:
        return self.fields.get("file_path") or self.filename or None

    @property
    def content_type(self) -> str | None:
        return self.fields.get("content_type") or self.part_type or None


def _boundary(request: Request[Any, Any, Any]) -> str:
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get("boundary")
    if kind.lower() != "multipart/form-data" or not boundary:
        raise InputError("expected a multipart/form-data body with a boundary", "body")
    return str(boundary)


async def _receive_upload(
    request: Request[Any, Any, Any], assets: AssetService
) -> tuple[_Upload, Received]:
    """Read the upload's parts as they stream in; the ``file`` part goes straight through
    :meth:`AssetService.receive`. Fields that come before the file are checked before any of
    its bytes are read."""
    form = MultipartStream(request.stream(), _boundary(request))
    upload = _Upload()
    try:
        while (part := await form.next_part()) is not None:
            if part.name == "file":
                if upload.received is not None:
                    raise InputError("more than one file part", "file")
                fields = upload.fields
                check_upload(  # what came before the file, before any of its bytes are read
                    fields.get("file_path") or None,
                    fields.get("content_type") or None,
                    fields.get("expected_hash") or None,
                    upload.tags,
                )
                upload.filename = part.filename or None
                upload.part_type = part.content_type or None
                upload.received = await assets.receive(form.body())
            elif part.name in FIELDS:
                upload.fields[part.name] = await form.text(part.name)
            elif part.name == "tags":
                upload.tags.append(await form.text("tags"))
            else:
                async for _ in form.body():  # a part this API does not know: skipped
                    pass
    except BaseException:
        if upload.received is not None:
            await assets.discard(upload.received)
        raise
    if upload.received is None:
        raise InputError("the body has no file part", "file")
    return upload, upload.received


@dataclass
class _UploadOperation(Operation):
    """The OpenAPI operation of ``POST /api/v2/assets``: its multipart body (the handler
    reads the stream itself, so Litestar cannot infer it)."""

    def __post_init__(self) -> None:
        text = Schema(type=OpenAPIType.STRING)
        self.request_body = RequestBody(
            required=True,
            content={
                "multipart/form-data": OpenAPIMediaType(
                    schema=Schema(
                        type=OpenAPIType.OBJECT,
                        required=["file"],
                        properties={
                            "file": Schema(
                                type=OpenAPIType.STRING,
                                format=OpenAPIFormat.BINARY,
                                description="The bytes (streamed to disk, hashed with blake3).",
                            ),
                            "file_path": Schema(
                                type=OpenAPIType.STRING,
                                description="The file's name; default the part's filename.",
                            ),
                            "content_type": Schema(
                                type=OpenAPIType.STRING,
                                description="Media type; default the part's, else guessed "
                                "from file_path.",
                            ),
                            "expected_hash": Schema(
                                type=OpenAPIType.STRING,
                                description="`blake3:<hex>` the bytes must have (409 "
                                "`hash_mismatch` otherwise).",
                            ),
                            "tags": Schema(type=OpenAPIType.ARRAY, items=text),
                        },
                    )
                )
            },
        )


def _error(description: str) -> ResponseSpec:
    return ResponseSpec(ErrorEnvelope, description=description)


ERRORS = {
    401: _error("No API key, or a wrong one (`unauthorized`)."),
    404: _error("No such asset (`not_found`)."),
    422: _error("A bad field (`invalid_request`, `details.location` names it)."),
}


@post(
    "/assets",
    summary="Upload an asset (Comfy API v2)",
    tags=TAGS,
    status_code=201,
    request_max_body_size=None,  # bounded by ASSET_MAX_UPLOAD_MB as it streams
    operation_class=_UploadOperation,
    responses={
        200: ResponseSpec(Asset, description="The bytes were kept already (`created_new` false)."),
        409: _error("The bytes do not match `expected_hash` (`hash_mismatch`)."),
        413: _error("Larger than ASSET_MAX_UPLOAD_MB (`payload_too_large`)."),
        401: ERRORS[401],
        422: ERRORS[422],
    },
    description="Streamed `multipart/form-data` (never held in memory); the bytes are hashed "
    "with blake3 as they arrive and deduplicated by hash: 201 `created_new: true` for new "
    "bytes, 200 `created_new: false` for bytes kept already (each upload is its own asset). "
    "`Idempotency-Key` is single-use for 24 h (a reuse is 422 `idempotency_key_reuse`).",
)
async def upload_asset(
    request: Request[Any, Any, Any],
    assets: NamedDependency[AssetService],
    signer: NamedDependency[UrlSigner],
    idempotency: NamedDependency[IdempotencyKeys],
) -> Response[Asset]:
    """``POST /api/v2/assets``."""
    key = idempotency_key(request.headers)
    _boundary(request)
    limit = assets.max_upload_bytes
    declared = request.content_length
    if declared is not None and declared > limit + FRAMING_ALLOWANCE:
        raise PayloadTooLarge(
            f"the upload is larger than {limit} bytes ({declared} announced)", limit_bytes=limit
        )
    async with single_use(idempotency, "assets", key):
        upload, received = await _receive_upload(request, assets)
        created = await assets.add(
            received,
            file_path=upload.file_path,
            content_type=upload.content_type,
            expected_hash=upload.fields.get("expected_hash") or None,
            tags=upload.tags,
        )
    body = asset_body(created.asset, signer, origin_of(request), created_new=created.created_new)
    return Response(body, status_code=201 if created.created_new else 200)


class FromHash(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """``POST /api/v2/assets/from-hash``: mint an asset over kept bytes."""

    hash: str
    file_path: str | None = None
    tags: list[str] | None = None


@post(
    "/assets/from-hash",
    summary="Mint an asset over kept bytes (Comfy API v2)",
    tags=TAGS,
    status_code=200,
    responses={**ERRORS, 404: _error("No such bytes (`blob_not_found`).")},
    description="A new asset over bytes the sidecar already keeps (no upload): what comfy-sdk "
    "does after `HEAD /assets/by-hash/{hash}` answered 200. `created_new` is false.",
)
async def asset_from_hash(
    data: FromHash,
    request: Request[Any, Any, Any],
    assets: NamedDependency[AssetService],
    signer: NamedDependency[UrlSigner],
) -> Asset:
    """``POST /api/v2/assets/from-hash``."""
    created = await assets.from_hash(data.hash, file_path=data.file_path, tags=data.tags or ())
    return asset_body(created.asset, signer, origin_of(request), created_new=False)


@head(
    "/assets/by-hash/{hash:str}",
    summary="Are these bytes kept? (Comfy API v2)",
    tags=TAGS,
    responses={404: ResponseSpec(None, description="Not kept.")},
    description="200 when bytes with this `blake3:<hex>` hash are kept, 404 when not (422 for "
    "a malformed hash).",
)
async def head_asset_by_hash(hash: str, assets: NamedDependency[AssetService]) -> Response[None]:
    """``HEAD /api/v2/assets/by-hash/{hash}``."""
    parse_hash(hash, "hash")
    return Response(None, status_code=200 if await assets.has_hash(hash) else 404)


@get(
    "/assets/{asset_id:str}",
    summary="An asset (Comfy API v2)",
    tags=TAGS,
    responses=ERRORS,
    description="The asset's record with a freshly signed content `url` (absolute) and its "
    "`url_expires_at`. A job's output (`<job id>.<n>`) answers too while its job is kept.",
)
async def get_asset(
    asset_id: str,
    request: Request[Any, Any, Any],
    assets: NamedDependency[AssetService],
    signer: NamedDependency[UrlSigner],
    jobs: NamedDependency[JobBackend],
) -> Asset:
    """``GET /api/v2/assets/{id}``."""
    try:
        return asset_body(await assets.get(asset_id), signer, origin_of(request))
    except AssetNotFound:
        view, index = await _output(jobs, asset_id)
    return _output_body(view, index, asset_id, signer, origin_of(request))


@delete(
    "/assets/{asset_id:str}",
    summary="Delete an asset (Comfy API v2)",
    tags=TAGS,
    status_code=204,
    responses=ERRORS,
    description="Removes the asset, and its bytes unless another asset or a job still "
    "referring to them uses them. A job's output goes with its job.",
)
async def delete_asset(
    asset_id: str, assets: NamedDependency[AssetService], jobs: NamedDependency[JobBackend]
) -> None:
    """``DELETE /api/v2/assets/{id}``."""
    try:
        await assets.delete(asset_id)
    except AssetNotFound:
        await _output(jobs, asset_id)  # AssetNotFound unless it is a kept job's output
        raise InputError(
            "a job's output is removed with its job (DELETE /api/v2/jobs/{id})", "id"
        ) from None


@dataclass
class _Bytes:
    """What ``.../content`` streams: an asset's :class:`~comfy_sidecar.assets.service.Content`
    or a job's :class:`~comfy_sidecar.jobs.backend.OutputBlob`."""

    size: int
    filename: str
    media_type: str
    source: Any  # has chunks(first, last)
    close: Any = None


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


@get(
    "/assets/{asset_id:str}/content",
    summary="An asset's bytes (Comfy API v2)",
    tags=TAGS,
    opt={SIGNED_CONTENT: True},
    responses={
        206: ResponseSpec(None, description="The requested byte range."),
        403: _error("A wrong or expired signature (`forbidden`)."),
        416: _error("The range starts past the end (`range_not_satisfiable`)."),
        **ERRORS,
    },
    description="The bytes, streamed with their content type and length; a single "
    "`Range: bytes=` range is answered 206. With the signed `url`'s `exp` and `sig` no API key "
    "is needed (a wrong or expired one is 403 `forbidden`).",
)
async def asset_content(
    asset_id: str,
    request: Request[Any, Any, Any],
    assets: NamedDependency[AssetService],
    signer: NamedDependency[UrlSigner],
    jobs: NamedDependency[JobBackend],
) -> Response[Any]:
    """``GET /api/v2/assets/{id}/content``."""
    query = request.query_params
    if "sig" in query or "exp" in query:
        signer.verify(asset_id, query.get("exp"), query.get("sig"))
    try:
        content = await assets.open(asset_id)
        found = _Bytes(
            content.size_bytes,
            content.asset.file_path or asset_id,
            content.asset.content_type,
            content,
            content.close,
        )
    except AssetNotFound:
        view, index = await _output(jobs, asset_id)
        blob = await jobs.output(view.id, index)
        if blob is None:
            raise AssetNotFound(
                f"the bytes of output {asset_id!r} are not kept here (see its job's url)",
                location="id",
            ) from None
        found = _Bytes(blob.size, blob.filename, blob.mime_type, blob)
    headers = {
        "accept-ranges": "bytes",
        "content-disposition": content_disposition(found.filename),
    }
    try:
        span = parse_range(request.headers.get("range"), found.size)
    except Unsatisfiable:
        if found.close is not None:
            found.close()
        return Response(
            envelope(
                "range_not_satisfiable",
                f"the range starts past the end ({found.size} bytes)",
                {"location": "range"},
            ),
            status_code=416,
            headers={"content-range": f"bytes */{found.size}"},
        )
    first, last = span if span is not None else (0, found.size - 1)
    if span is not None:
        headers["content-range"] = f"bytes {first}-{last}/{found.size}"
    headers["content-length"] = str(max(0, last - first + 1))
    if found.size:
        chunks: AsyncIterator[bytes] = found.source.chunks(first, last)
    else:
        if found.close is not None:
            found.close()
        chunks = _nothing()
    return Stream(
        chunks,
        media_type=found.media_type,
        status_code=206 if span is not None else 200,
        headers=headers,
    )


ROUTES = [upload_asset, asset_from_hash, head_asset_by_hash, get_asset, delete_asset, asset_content]


# --- core/ASSET references of a submitted workflow -------------------------------------------


async def resolve_assets(
    workflow: Mapping[str, Any],
    job_id: str,
    *,
    assets: AssetService,
    staging: Staging,
) -> dict[str, Any]:
    """``workflow`` (an API-format dict, not changed) with every ``core/ASSET`` reference
    (``{"__type": "core/ASSET", "info": {"id", "hash"?, "file_path"?}}``, at any depth of a
    node's ``inputs``) replaced by what the replica that runs job ``job_id`` reads: in-process,
    the asset hard-linked into ``INPUT_DIR/.comfy-sidecar/<job id>-media/`` and that name
    relative to INPUT_DIR (removed with the job's other inputs when the job ends); with
    ``JOB_QUEUE_URL``, a ``data:`` URL of bytes kept in Redis or the URL of the object in
    ASSET_STORE_URL, which the claiming replica's preprocessing writes or downloads (then only
    a media input may take one: ``image``, a video loader's ``video``/``file``, an audio
    loader's ``audio``). The same asset referenced twice is staged once. A workflow without
    references comes back as a copy.

    Call it for a **new** job id, before the job is submitted. Each referenced asset is held
    for ``job_id`` (never evicted, its bytes kept even if it is deleted or expires) until the
    job is no longer retained (the asset service asks the job backend), so call
    :meth:`AssetInputs.discard` (or :func:`discard_assets`) when the submission is then refused.

    Raises :class:`~comfy_sidecar.errors.MissingAsset` (422 ``missing_asset``; ``location``
    the first bad reference, ``workflow.<node>.inputs.<field>[...]``, field ``missing`` every
    one) for a malformed reference, an unknown, deleted or expired id, bytes no replica can
    read any more, a reference outside a node's ``inputs``, or one in an input the running
    replica could not read it from; :class:`~comfy_sidecar.storage.errors.DiskFullError`
    when INPUT_DIR is full; :class:`~comfy_sidecar.errors.Unavailable` while a shared store
    cannot be reached. Whatever it raises, nothing stays staged or held."""
    references = find_asset_references(workflow)
    if not references:
        return dict(workflow)
    folder = media_dir(job_id)
    names: dict[str, str] = {}
    try:
        unknown: list[AssetReference] = []
        for reference in references:
            if len(reference.path) < 3 or reference.path[1] != "inputs":
                raise MissingAsset(
                    f"a {ASSET_TYPE} reference belongs in a node's inputs",
                    reference.location,
                    missing=[reference.location],
                )
            if reference.id in names:
                continue
            try:
                asset = await assets.hold(reference.id, job_id)
                names[reference.id] = await assets.job_input(asset, folder)
            except AssetNotFound:
                unknown.append(reference)
        if unknown:
            raise missing_assets(unknown)
        resolved = replace_asset_references(workflow, names)
        staged = staging.for_job(job_id)
        for reference in references:
            node, name = str(reference.path[0]), str(reference.path[2])
            try:
                staged.check_feeds(resolved, node, name, reference.location, "an asset")
            except InputError as exc:
                raise MissingAsset(
                    exc.message, reference.location, missing=[reference.location]
                ) from None
    except BaseException:
        await discard_assets(job_id, assets=assets, staging=staging)
        raise
    return resolved


async def discard_assets(job_id: str, *, assets: AssetService, staging: Staging) -> None:
    """Undo :func:`resolve_assets` for job ``job_id`` whose submission was refused: what
    was staged for it is removed and its holds are released."""
    staging.for_job(job_id).discard()
    await assets.release(job_id)


class AssetInputs:
    """:func:`resolve_assets` and :func:`discard_assets` over this process's services: the
    ``asset_inputs`` dependency of the v2 job routes."""

    def __init__(self, assets: AssetService, staging: Staging) -> None:
        self.assets = assets
        self.staging = staging

    async def resolve(self, workflow: Mapping[str, Any], job_id: str) -> dict[str, Any]:
        """See :func:`resolve_assets`."""
        return await resolve_assets(workflow, job_id, assets=self.assets, staging=self.staging)

    async def discard(self, job_id: str) -> None:
        """See :func:`discard_assets`."""
        await discard_assets(job_id, assets=self.assets, staging=self.staging)
