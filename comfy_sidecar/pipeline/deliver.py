"""A finished job's result, delivered: the sync 200 body (built or streamed), the 202's
shape, conversion of image outputs, and uploads through the storage facade.

Copies comfyui-api's rules for which requests are asynchronous (:func:`is_async`) and which
request fields its bodies echo (:func:`echo`; never ``credentials``). The job lifecycle
(:mod:`comfy_sidecar.jobs.lifecycle`) decides when each is used.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from comfy_sidecar.errors import InputError, UpstreamFailed
from comfy_sidecar.net.bounded import gather_bounded
from comfy_sidecar.observability import tracing
from comfy_sidecar.pipeline.convert import ConversionError, Converter, ImageTooLarge
from comfy_sidecar.pipeline.outputs import (
    INLINE_LIMIT,
    OutputFile,
    result_body,
    stream_result,
)
from comfy_sidecar.pipeline.run import JobResult
from comfy_sidecar.schemas import (
    AcceptedResponse,
    Echoed,
    PromptOptions,
    PromptResponse,
    ResultHead,
    Stats,
)

log = logging.getLogger("comfy_sidecar.deliver")

ECHOED = tuple(name for name in Echoed.__struct_fields__ if name != "input")
UPLOAD_KEYS = ("s3", "hf_upload", "azure_blob_upload", "http_upload")

Uploader = Callable[[JobResult, str, Any], Awaitable[list[str]]]
"""``upload(result, key, spec) -> URLs``, one per output file (``key`` is the request field,
e.g. ``s3``); raises :class:`~comfy_sidecar.errors.UpstreamFailed`."""


def echo(options: PromptOptions) -> dict[str, Any]:
    """The request fields comfyui-api echoes in its bodies (:class:`Echoed`'s), minus
    ``credentials``: ``{field: value}`` for those the request gave."""
    return {name: value for name in ECHOED if (value := getattr(options, name)) is not None}


@dataclass(frozen=True)
class Accepted:
    """Answer 202 with ``body`` now; the job goes on in the background."""

    body: AcceptedResponse


@dataclass(frozen=True)
class Answered:
    """Answer 200 with ``body`` (small outputs, or uploaded URLs)."""

    body: PromptResponse


@dataclass(frozen=True)
class Streamed:
    """Answer 200 with the JSON ``chunks`` of a :class:`PromptResponse` (outputs above
    INLINE_LIMIT bytes, base64-encoded while they are written)."""

    chunks: AsyncIterator[bytes]


Delivered = Accepted | Answered | Streamed
"""What :meth:`~comfy_sidecar.jobs.lifecycle.JobLifecycle.answer` decided to answer; the route
makes it a response."""


def upload_target(options: PromptOptions) -> tuple[str, Any] | None:
    """``(field, spec)`` of the first upload block present (comfyui-api's order: s3, hf,
    azure, http), or None for base64 output."""
    for name in UPLOAD_KEYS:
        value = getattr(options, name)
        if value is not None:
            return name, value
    return None


def is_async(options: PromptOptions) -> bool:
    """comfyui-api's test: a webhook, or an upload block with ``async: true``."""
    target = upload_target(options)
    return bool(options.webhook or options.webhook_v2 or (target and target[1].async_))


def answer(result: JobResult, echoed: Echoed, urls: list[str] | None) -> Delivered:
    """The 200 body: built at once when the outputs are small (at most INLINE_LIMIT
    bytes) or uploaded, else streamed; output files are removed once it is written."""
    body_head = ResultHead(
        **msgspec.structs.asdict(echoed),
        id=result.job.id,
        prompt=result.prompt,
        conversion_errors=result.conversion_errors or None,
    )

    def stats() -> Stats:
        return msgspec.convert(result.stats(), Stats)

    if urls is not None or sum(item.size for item in result.files) <= INLINE_LIMIT:
        try:
            return Answered(result_body(body_head, result.files, urls, stats()))
        finally:
            result.release()
    return Streamed(stream_result(body_head, result.files, stats, result.release))


async def postprocess(result: JobResult, options: PromptOptions, converter: Converter) -> None:
    """Convert image outputs (``convert_output``) off the event loop, one output at a time
    in the whole sidecar (``converter``); a file that cannot be converted is kept as it is
    and named in ``result.conversion_errors``. Raises
    :class:`~comfy_sidecar.errors.InputError` (400, ``location: convert_output``) for an
    output of more than CONVERT_MAX_PIXELS pixels: the conversion asked for cannot be made,
    and the same request would fail again (not a 5xx a queue retries)."""
    spec = options.convert_output
    if spec is None or not result.files:
        return
    with tracing.span("convert") as span:
        if span.recording:
            span.set("convert.format", str(type(spec).__struct_config__.tag))
        await _convert(result, spec, converter)
        if span.recording and result.conversion_errors:
            span.set("convert.errors", len(result.conversion_errors))


async def _convert(result: JobResult, spec: Any, converter: Converter) -> None:
    started = time.monotonic()
    files = result.files
    converted: list[OutputFile] = []
    try:
        for item in files:
            if item.animated or not await converter.convertible(item.path):
                converted.append(item)
                continue
            try:
                new_path = await converter.convert(item.path, spec)
            except ConversionError as exc:
                result.conversion_errors[item.filename] = str(exc)
                converted.append(item)
                continue
            except ImageTooLarge as exc:
                raise InputError(str(exc), "convert_output", id=result.job.id) from None
            if new_path != item.path:
                item.path.unlink(missing_ok=True)
            converted.append(OutputFile(new_path, new_path.name, item.node_id, item.key, False))
    finally:  # what is converted so far and the rest: released (removed) on a failure too
        result.files = converted + files[len(converted) :]
    result.timings["postprocess"] = time.monotonic() - started


def storage_uploader(storage: Any, concurrency: int = 4) -> Uploader:
    """An :data:`Uploader` over the storage facade: every output file streamed from disk,
    ``concurrency`` at a time; any failure is an :class:`UpstreamFailed` naming the file,
    the request field (``location``) and the job, its ``cause`` the storage error (which
    says whose fault it was: a bad prefix, a failing backend, a later upload)."""
    from comfy_sidecar.storage import StorageError

    async def upload(result: JobResult, key: str, spec: Any) -> list[str]:
        async def one(item: OutputFile) -> str:
            try:
                url: str = await storage.upload(item.path, spec, item.filename)
            except StorageError as exc:
                raise UpstreamFailed(
                    f"upload of {item.filename} failed: {exc}",
                    cause=exc,
                    location=key,
                    id=result.job.id,
                ) from None
            return url

        return await gather_bounded(
            [functools.partial(one, item) for item in result.files], concurrency
        )

    return upload
