"""Deliver a job's result: the sync 200 body, the 202 + webhooks, conversion, uploads.

Copies comfyui-api's rules for which requests are asynchronous: a ``webhook`` or ``webhook_v2``,
or an upload block with ``async: true``, answers 202 ``{"status": "ok", "id", "prompt"}`` once the
prompt is preprocessed (so a caller's mistake is still a 400), and the job finishes in the
background. Otherwise the caller waits for the 200. Unlike comfyui-api the request is never
echoed back whole: ``credentials`` stay out of every response and webhook.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import msgspec

from comfy_sidecar.convert import ConversionError, Converter, ImageTooLarge
from comfy_sidecar.errors import InputError, Interrupted, Overloaded, SidecarError, UpstreamFailed
from comfy_sidecar.jobs.runner import JobTracker, error_body, open_job
from comfy_sidecar.jobs.store import JobRecord, JobStore
from comfy_sidecar.pipeline.bounded import gather_bounded
from comfy_sidecar.pipeline.outputs import (
    INLINE_LIMIT,
    OutputFile,
    result_body,
    stream_result,
)
from comfy_sidecar.pipeline.run import JobResult, PendingJob, Pipeline
from comfy_sidecar.schemas import (
    AcceptedResponse,
    Echoed,
    PromptOptions,
    PromptRequest,
    PromptResponse,
    ResultHead,
    Stats,
)

if TYPE_CHECKING:
    from comfy_sidecar.instance import ComfyInstance
    from comfy_sidecar.webhooks import WebhookDispatcher

log = logging.getLogger("comfy_sidecar.deliver")

ECHOED = tuple(name for name in Echoed.__struct_fields__ if name != "input")
UPLOAD_KEYS = ("s3", "hf_upload", "azure_blob_upload", "http_upload")

Spill = Callable[[JobResult], "tuple[str, Any] | None"]
"""``spill(result) -> (location, upload spec) | None``: where a shared-queue job without an
upload target sends outputs too large to keep inline (None: keep them); raises a
:class:`~comfy_sidecar.errors.SidecarError` (the job fails) when they have nowhere to go."""

Gate = Callable[[], Awaitable[bool]]
"""``gate() -> bool``: may this run deliver its outcome (webhooks, result)? See
:meth:`Delivery.run_claimed`."""


class Superseded(Exception):
    """Another replica ended this shared-queue job first: this run's outcome is discarded."""


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
"""What :meth:`Delivery.handle` decided to answer; the route makes it a response."""


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


class Delivery:
    """Runs requests through ``pipeline`` and delivers their results.

    Asynchronous jobs with a webhook (``webhook``, ``webhook_v2``) are admitted up to
    MAX_PENDING_DELIVERIES at once, counted from their 202 until every webhook of theirs was
    delivered or given up (:attr:`pending_deliveries`); beyond it :class:`Overloaded` (429).
    A webhook that carries output files streams them from a hard link (a copy on another
    filesystem) in ``OUTPUT_DIR/.comfy-sidecar-webhooks-<PORT>/``, removed once the webhook is
    delivered or given up: a waiting delivery holds a path, not an open file, and the job's
    own files are released (or kept under JOBS_DIR) as usual. :meth:`clear_spool` empties that
    folder at start-up (a killed predecessor's links).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        webhooks: WebhookDispatcher,
        spawn: Callable[[Awaitable[None]], Any],
        uploader: Uploader,
        store: JobStore,
    ) -> None:
        self.pipeline = pipeline
        self.webhooks = webhooks
        self.spawn = spawn
        self.uploader = uploader
        self.store = store
        settings = pipeline.settings
        self.max_pending = settings.max_pending_deliveries
        #: Asynchronous jobs with a webhook admitted and not yet delivered.
        self.pending_deliveries = 0
        self.spool = Path(settings.output_dir) / f".comfy-sidecar-webhooks-{settings.port}"
        #: Background jobs (:meth:`_background`) not yet ended: run, delivered or failed, and
        #: their webhooks queued.
        self.background = 0
        #: Output conversion (``convert_output``): one at a time, CONVERT_MAX_PIXELS at most.
        self.converter = Converter(settings.convert_max_pixels)
        self._idle = asyncio.Event()
        self._idle.set()

    def clear_spool(self) -> None:
        """Remove the webhook spool a killed predecessor left (at start-up, off the loop)."""
        shutil.rmtree(self.spool, ignore_errors=True)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every background job ended, its webhooks queued in the dispatcher (the
        shutdown closes the dispatcher only then); False after ``timeout_s`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
        except TimeoutError:
            return False
        return True

    def _admit_delivery(self, request: PromptRequest) -> bool:
        """Count an asynchronous job with a webhook (True), or raise :class:`Overloaded` at
        MAX_PENDING_DELIVERIES; False (not counted) for any other request."""
        if not (request.webhook or request.webhook_v2):
            return False
        limit = self.max_pending
        if limit and self.pending_deliveries >= limit:
            raise Overloaded(
                f"{self.pending_deliveries} asynchronous job(s) with a webhook are not "
                f"delivered yet (MAX_PENDING_DELIVERIES {limit}); try again later",
                location="webhook_v2" if request.webhook_v2 else "webhook",
            )
        self.pending_deliveries += 1
        return True

    def _delivered_when(self, futures: Sequence[asyncio.Future[bool]]) -> None:
        """Uncount one admitted job once all of its webhooks' ``futures`` resolved."""
        waiting = [f for f in futures if not f.done()]
        if not waiting:
            self.pending_deliveries -= 1
            return
        left = len(waiting)

        def one_done(_: asyncio.Future[bool]) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                self.pending_deliveries -= 1

        for future in waiting:
            future.add_done_callback(one_done)

    async def _spooled(self, path: Path) -> tuple[Path, Callable[[], None]]:
        """Output file ``path`` for a webhook body: a hard link to it in the spool (a copy when
        the spool is on another filesystem), and the call that removes it (for the body's
        ``on_close``). Raises ``OSError``."""
        link = self.spool / uuid.uuid4().hex  # the body names the file; a long name can't fail

        def make() -> None:
            self.spool.mkdir(exist_ok=True)
            try:
                os.link(path, link)
            except OSError:
                try:
                    shutil.copyfile(path, link)
                except BaseException:
                    link.unlink(missing_ok=True)
                    raise

        await asyncio.to_thread(make)
        return link, functools.partial(link.unlink, missing_ok=True)

    async def _open(
        self,
        request: PromptRequest,
        endpoint: str,
        fingerprint: bytes = b"",
        *,
        keep_interrupted: bool = True,
    ) -> tuple[JobTracker, PendingJob | None, PromptRequest]:
        """The job's record and, when it is new, the preprocessed pipeline job (None for a
        resubmission of a retained job). A request refused here leaves no record; one
        interrupted while its inputs downloaded (``POST /interrupt``, a cancel: the job was
        seen, by id) ends ``cancelled`` and is kept, unless ``keep_interrupted`` is False."""
        if request.id is None:
            request = msgspec.structs.replace(request, id=str(uuid.uuid4()))
        assert request.id is not None
        tracker, created = open_job(self.store, request.id, endpoint, fingerprint)
        if not created:
            return tracker, None, request
        try:
            pending = await self.pipeline.prepare(request)
        except Interrupted as exc:
            if keep_interrupted:
                tracker.failed(exc)
            else:
                tracker.forget()
            raise
        except BaseException:
            tracker.forget()
            raise
        tracker.attach(pending, self.pipeline.output_nodes(pending.prompt))
        return tracker, pending, request

    async def run(
        self, request: PromptRequest, endpoint: str, instance: ComfyInstance | None = None
    ) -> None:
        """Run a job for the sidecar itself (the warmup, on ``instance``): recorded like any
        job, its outputs removed at once. Raises what :meth:`Pipeline.run` raises."""
        tracker, pending, request = await self._open(request, endpoint)
        assert pending is not None
        try:
            result = await self.pipeline.complete(pending, instance)
        except BaseException as exc:
            tracker.failed(exc)
            raise
        tracker.completed(result.files, None, result.stats(), retain=False)
        result.release()

    async def submit(self, request: PromptRequest, endpoint: str, fingerprint: bytes) -> JobRecord:
        """A job of the job APIs: preprocessed now (a caller's mistake raises, and nothing is
        kept), then run in the background; outputs are kept under JOBS_DIR unless the request
        uploads them. Resubmitting a retained id with the same ``fingerprint`` returns that
        job; another body raises :class:`~comfy_sidecar.errors.Conflict`."""
        counted = self._admit_delivery(request)
        try:
            tracker, pending, request = await self._open(request, endpoint, fingerprint)
        except BaseException:
            self.pending_deliveries -= counted
            raise
        if pending is None:  # a resubmission: nothing new to deliver
            self.pending_deliveries -= counted
        else:
            echoed = Echoed(**echo(request), input=None)
            self.spawn(
                self._background(pending, request, echoed, tracker, retain=True, counted=counted)
            )
        return tracker.record

    async def run_claimed(
        self,
        request: PromptRequest,
        endpoint: str,
        bind: Callable[[JobRecord], None],
        gate: Gate,
        spill: Spill,
    ) -> JobRecord:
        """Run a job taken from the shared queue (``JOB_QUEUE_URL``) here, to its end, as
        :meth:`submit` would in the background; ``bind(record)`` is called once its record
        exists. ``gate()`` is awaited once the outcome is known, before any webhook: False
        (another replica ended the job first) discards the outcome, sends nothing, and ends
        the record :class:`Superseded`. ``spill(result)`` picks an upload target for a
        request that names none (its outputs are uploaded before the gate, so a failed upload
        is the job's failure). Raises what :meth:`Pipeline.prepare` raises (nothing is kept
        then)."""
        # Interrupted while it downloads: this replica's record goes (the worker reports).
        tracker, pending, request = await self._open(request, endpoint, keep_interrupted=False)
        assert pending is not None
        bind(tracker.record)
        echoed = Echoed(**echo(request), input=None)
        await self._background(
            pending, request, echoed, tracker, retain=True, gate=gate, spill=spill
        )
        return tracker.record

    async def handle(
        self,
        request: PromptRequest,
        workflow_input: dict[str, Any] | None = None,
        endpoint: str = "prompt",
    ) -> Delivered:
        """Answer one request: :class:`Answered` or :class:`Streamed` (200) once the job is
        done, or :class:`Accepted` (202) at once when it is asynchronous (:func:`is_async`).

        ``workflow_input`` (a workflow endpoint's ``input``) is added to every body as
        ``input``. Raises the :mod:`comfy_sidecar.errors` classes for everything that goes
        wrong before the answer (see :meth:`Pipeline.run`; :class:`UpstreamFailed` for an
        upload).
        """
        target = upload_target(request)
        counted = self._admit_delivery(request)
        try:
            tracker, pending, request = await self._open(request, endpoint)
        except BaseException:
            self.pending_deliveries -= counted
            raise
        assert pending is not None
        echoed = Echoed(**echo(request), input=workflow_input)
        if is_async(request):
            self.spawn(
                self._background(pending, request, echoed, tracker, retain=False, counted=counted)
            )
            fields = msgspec.structs.asdict(echoed)
            return Accepted(
                AcceptedResponse(**fields, status="ok", id=pending.job.id, prompt=pending.prompt)
            )
        result: JobResult | None = None
        try:
            result = await self.pipeline.complete(pending)
            await self.postprocess(result, request)
            urls = await self._upload(result, target)
        except BaseException as exc:
            tracker.failed(exc)
            if result is not None:
                result.release()
            raise
        tracker.completed(result.files, urls, result.stats(), retain=False)
        return self.answer(result, echoed, urls)

    @staticmethod
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

    async def postprocess(self, result: JobResult, options: PromptOptions) -> None:
        """Convert image outputs (``convert_output``) off the event loop, one output at a time
        in the whole sidecar (:class:`~comfy_sidecar.convert.Converter`); a file that cannot
        be converted is kept as it is and named in ``result.conversion_errors``.
        Raises :class:`~comfy_sidecar.errors.InputError` (400, ``location: convert_output``)
        for an output of more than CONVERT_MAX_PIXELS pixels: the conversion asked for cannot
        be made, and the same request would fail again (not a 5xx a queue retries)."""
        spec = options.convert_output
        if spec is None or not result.files:
            return
        started = time.monotonic()
        files = result.files
        converted: list[OutputFile] = []
        try:
            for item in files:
                if item.animated or not await self.converter.convertible(item.path):
                    converted.append(item)
                    continue
                try:
                    new_path = await self.converter.convert(item.path, spec)
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

    @staticmethod
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

    async def _upload(self, result: JobResult, target: tuple[str, Any] | None) -> list[str] | None:
        if target is None:
            return None
        started = time.monotonic()
        urls = await self.uploader(result, *target)
        result.timings["upload"] = time.monotonic() - started
        return urls

    async def _background(
        self,
        pending: PendingJob,
        request: PromptRequest,
        echoed: Echoed,
        tracker: JobTracker,
        *,
        retain: bool,
        counted: bool = False,
        gate: Gate | None = None,
        spill: Spill | None = None,
    ) -> None:
        """Finish a job in the background: run, convert, upload, the webhooks (success or
        failure), then its record (outputs kept under JOBS_DIR when ``retain``). ``counted``:
        the job holds a MAX_PENDING_DELIVERIES place until its webhooks are delivered. With a
        ``gate`` (see :meth:`run_claimed`) nothing is delivered unless it answers True."""
        result: JobResult | None = None
        sent: list[asyncio.Future[bool]] = []
        self.background += 1
        self._idle.clear()
        try:
            result = await self.pipeline.complete(pending)
            await self.postprocess(result, request)
            urls: list[str] | None = None
            target = upload_target(request)
            spilled = spill(result) if target is None and spill is not None else None
            if spilled is not None or not request.webhook:
                urls = await self._upload(result, spilled or target)
            if gate is not None and not await gate():
                raise Superseded(f"job {pending.job.id} was ended by another replica first")
            if request.webhook:
                sent += await self._send_v1(request.webhook, result)
            elif request.webhook_v2:
                sent.append(await self._send_v2(request.webhook_v2, result, echoed, urls))
            tracker.completed(result.files, urls, result.stats(), retain=retain)
        except Superseded as exc:
            tracker.failed(exc)
            log.warning("%s; its result here is discarded", exc)
        except BaseException as exc:
            tracker.failed(exc)
            if not isinstance(exc, Exception):
                raise
            if gate is None or await gate():
                sent += await self._report_failure(pending, request, exc)
        finally:
            if result is not None:
                result.release()
            if counted:
                self._delivered_when(sent)
            self.background -= 1
            if self.background == 0:
                self._idle.set()

    async def send_failure(self, request: PromptRequest, error: dict[str, Any]) -> None:
        """Send the failure webhook (``webhook_v2``'s ``prompt.failed``, or ``webhook``'s) of a
        job that failed before it could run: a shared-queue job whose preparation failed on
        the replica that claimed it, or that ran out of attempts. ``error``: its error body."""
        job_id = request.id or str(error.get("id", ""))
        await self._send_failure(request, job_id, msgspec.to_builtins(request.prompt), error)

    async def _report_failure(
        self, pending: PendingJob, request: PromptRequest, exc: Exception
    ) -> list[asyncio.Future[bool]]:
        """Log a background job's failure and send its failure webhook (its future)."""
        job_id = pending.job.id
        if isinstance(exc, SidecarError):
            log.warning("job %s failed (%s): %s", job_id, type(exc).__name__, exc.message)
        else:
            log.error("job %s failed", job_id, exc_info=exc)
        return await self._send_failure(request, job_id, pending.prompt, error_body(exc, job_id))

    async def _send_v1(self, url: str, result: JobResult) -> list[asyncio.Future[bool]]:
        from comfy_sidecar.webhooks import v1_output_body

        stats = result.stats()
        sent: list[asyncio.Future[bool]] = []
        for item in result.files:
            link, remove = await self._spooled(item.path)
            body = v1_output_body(
                id=result.job.id,
                filename=item.filename,
                prompt=result.prompt,
                stats=stats,
                image_path=link,
                on_close=remove,
            )
            # One webhook-id per output (a receiver deduplicates on it), header-safe whatever
            # the file name holds: its UTF-8 percent-encoded.
            webhook_id = f"{result.job.id}:{quote(item.filename, errors='surrogateescape')}"
            sent.append(
                await self.webhooks.send_prompt(url, body, webhook_id, order_key=result.job.id)
            )
        return sent

    async def _send_v2(
        self, url: str, result: JobResult, echoed: Echoed, urls: list[str] | None
    ) -> asyncio.Future[bool]:
        from comfy_sidecar.webhooks import Base64File, v2_complete_body

        images: list[Any] = []
        if urls is not None:
            images = list(urls)
        else:
            for item in result.files:
                images.append(Base64File(*await self._spooled(item.path)))
        body: dict[str, Any] = {
            **msgspec.to_builtins(echoed),
            "id": result.job.id,
            "prompt": result.prompt,
            "images": images,
            "filenames": [item.filename for item in result.files],
            "stats": result.stats(),
        }
        if result.conversion_errors:
            body["conversion_errors"] = result.conversion_errors
        return await self.webhooks.send_prompt(
            url, v2_complete_body(body), result.job.id, order_key=result.job.id
        )

    async def _send_failure(
        self, request: PromptRequest, job_id: str, prompt: Any, error: dict[str, Any]
    ) -> list[asyncio.Future[bool]]:
        from comfy_sidecar.webhooks import v1_failed_body, v2_failed_body

        if request.webhook_v2:
            body = v2_failed_body(id=job_id, prompt=prompt, error=error)
            url = request.webhook_v2
        elif request.webhook:
            body = v1_failed_body(id=job_id, prompt=prompt, error=error)
            url = request.webhook
        else:
            return []
        return [await self.webhooks.send_prompt(url, body, job_id, order_key=job_id)]
