"""Run one prompt through ComfyUI: preprocess, queue with a known prompt_id, wait, collect.

Callable in-process (the ``/prompt`` route, the warmup and workflow endpoints all call
:meth:`Pipeline.run`). The job is registered *before* ``POST /prompt`` so no frame can be missed
(comfyui-api's lost-event hang, its issue #186), every wait has a timeout, and a lost websocket
is covered by reconciliation through ``/queue`` and ``/history``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgspec

from comfy_sidecar.comfy.client import ComfyClient, ComfyUnavailable, PromptRejected
from comfy_sidecar.comfy.executions import (
    Job,
    JobOutcome,
    JobState,
    OutcomeKind,
    now_ms,
)
from comfy_sidecar.config import Settings
from comfy_sidecar.errors import (
    Conflict,
    ExecutionFailed,
    InputError,
    Interrupted,
    SidecarError,
    TimedOut,
    Unavailable,
    UpstreamFailed,
    ValidationFailed,
)
from comfy_sidecar.net.urls import scrub_url
from comfy_sidecar.observability import tracing
from comfy_sidecar.observability.logs import bind_job, job_scope
from comfy_sidecar.pipeline.outputs import (
    OutputError,
    OutputFile,
    collect_outputs,
    remove_job_outputs,
    remove_outputs,
)
from comfy_sidecar.pipeline.preprocess import Prepared, Preprocessor
from comfy_sidecar.pipeline.serverpaths import ServerPaths
from comfy_sidecar.schemas import Credential, PromptRequest
from comfy_sidecar.schemas.secret import Secret

if TYPE_CHECKING:
    from comfy_sidecar.comfy.dispatch import Dispatcher
    from comfy_sidecar.comfy.instance import ComfyInstance
    from comfy_sidecar.storage import Storage
    from comfy_sidecar.storage.cache import Lease

log = logging.getLogger("comfy_sidecar.pipeline")


@dataclass
class JobResult:
    """A finished job whose output files are still on disk until :meth:`release` runs."""

    job: Job
    prompt: dict[str, Any]
    files: list[OutputFile]
    started: float
    preprocessed: float
    finished: float
    output_dir: str
    on_release: Callable[[], None] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    conversion_errors: dict[str, str] = field(default_factory=dict)
    released: bool = False

    def stats(self) -> dict[str, Any]:
        """comfyui-api's ``stats``: ms durations and ComfyUI's ms-since-epoch timestamps."""
        job = self.job
        start = job.exec_start_ms or job.queued_ms or job.created_ms
        end = job.exec_end_ms or now_ms()
        now = time.monotonic()
        post = self.timings.get("postprocess", 0.0)
        upload = self.timings.get("upload", 0.0)
        return {
            "comfy_execution": {
                "start": start,
                "end": end,
                "duration": max(0, end - start),
                "nodes": {node: {"start": t} for node, t in job.node_starts.items()},
            },
            "preprocess_time": _ms(self.preprocessed - self.started),
            "comfy_round_trip_time": _ms(self.finished - self.preprocessed),
            "postprocess_time": _ms(post),
            "upload_time": _ms(upload),
            "total_time": _ms(now - self.started),
        }

    def release(self) -> None:
        """Remove the output files and end the job (idempotent)."""
        if self.released:
            return
        self.released = True
        remove_outputs(self.files, self.output_dir)
        if self.on_release is not None:
            self.on_release()


class JobStaging:
    """Downloads for one job through the storage facade: credentials matched per URL
    (``credentials``, first glob wins), files leased from eviction until the job ends.
    A download that fails is the request's problem, as in comfyui-api: :class:`InputError`
    naming the prompt field and saying why (not found, refused, unreachable, cut). A full
    disk is the sidecar's: :class:`UpstreamFailed` naming the field, with the
    :class:`~comfy_sidecar.storage.DiskFullError` as its cause (answered 507)."""

    def __init__(
        self,
        storage: Storage,
        credentials: list[Credential] | None,
        lease: Lease,
        settings: Settings,
    ) -> None:
        self.storage = storage
        self.credentials = credentials
        self.lease = lease
        self.input_dir = settings.input_dir
        self.model_dir = Path(settings.model_dir)

    async def input(self, url: str, stem: str, location: str) -> str:
        """Download ``url``; link it into INPUT_DIR as ``<stem><cache file extension>``."""
        from comfy_sidecar.storage import StorageError

        auth = self.storage.credentials_for(url, self.credentials)
        with self._traced(url, location) as span:
            try:
                cached = await self.storage.fetch(url, auth, self.lease)
                name = f"{stem}{cached.suffix}"
                staged = await self.storage.stage_input(url, auth, self.input_dir, name, self.lease)
            except StorageError as exc:  # a full disk is the sidecar's (507), naming the field
                raise _download_failed(url, exc, location) from None
            self._sized(span, url)
            return staged

    async def model(self, url: str, folder: str, location: str) -> str:
        """Download ``url`` into ``MODEL_DIR/<folder>``; returns the name ComfyUI lists."""
        from comfy_sidecar.storage import StorageError

        auth = self.storage.credentials_for(url, self.credentials)
        with self._traced(url, location) as span:
            try:
                staged = await self.storage.stage_model(
                    url, auth, self.model_dir / folder, self.lease
                )
            except StorageError as exc:  # a full disk is the sidecar's (507), naming the field
                raise _download_failed(url, exc, location) from None
            self._sized(span, url)
            return staged

    def _traced(self, url: str, location: str) -> tracing.Span | tracing.NoSpan:
        """The ``download`` span of one URL input (its URL scrubbed of credentials, the
        prompt field, whether the cache had it before this job asked)."""
        span = tracing.span("download")
        if span.recording:
            span.set("url.full", scrub_url(url))
            span.set("comfy_sidecar.input", location)
            span.set("cache.hit", self.storage.cache.entry(url) is not None)
        return span

    def _sized(self, span: tracing.Span | tracing.NoSpan, url: str) -> None:
        """Note the size of ``url``'s cache file on its ``download`` span."""
        if span.recording:
            entry = self.storage.cache.entry(url)
            span.set("download.bytes", entry.size if entry is not None else 0)


def _download_failed(url: str, exc: Exception, location: str) -> SidecarError:
    """The error for a failed download of ``url`` at ``location`` (see
    :func:`download_error`)."""
    return download_error(f"could not download {scrub_url(url)}: {exc}", exc, location)


def download_error(message: str, cause: Exception | None, location: str) -> SidecarError:
    """The error for a failed download at ``location``: :class:`UpstreamFailed` caused by
    ``cause`` when it is a full disk (the sidecar's fault, 507), else :class:`InputError`
    (comfyui-api answers failed downloads with 400). Used by the pipeline and ``/download``."""
    from comfy_sidecar.storage import DiskFullError

    if isinstance(cause, DiskFullError):
        return UpstreamFailed(message, cause=cause, location=location)
    return InputError(message, location)


@dataclass
class PendingJob:
    """A registered, preprocessed job not yet queued on ComfyUI."""

    job: Job
    prepared: Prepared
    started: float
    preprocessed: float
    end: Callable[[], None]

    @property
    def prompt(self) -> dict[str, Any]:
        """The preprocessed prompt (what ComfyUI will get)."""
        return self.prepared.prompt

    def abandon(self) -> None:
        """Drop the job without running it: remove its input files and unregister it."""
        self.prepared.cleanup()
        self.end()


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class Pipeline:
    """Runs prompts for one sidecar on its ComfyUI instances.

    A prepared job waits in the sidecar's queue (the
    :class:`~comfy_sidecar.comfy.dispatch.Dispatcher`) for a slot on a ready instance, is queued
    there under a prompt_id chosen before queueing, and is followed through that instance's
    job registry. A job the instance lost before it
    started running (the instance died or was restarted with it still in ComfyUI's queue) is
    sent again, to whichever instance is ready next: nothing that did not start is lost.
    """

    def __init__(
        self,
        settings: Settings,
        instances: Sequence[ComfyInstance],
        dispatcher: Dispatcher,
        storage: Storage,
    ) -> None:
        self.settings = settings
        self.instances = list(instances)
        self.dispatcher = dispatcher
        self.storage = storage
        #: Scrubs server paths from ComfyUI's text before it goes into an error body.
        self.server_paths = ServerPaths.from_settings(settings)
        self.preprocessor = Preprocessor(
            settings.input_dir,
            settings.prepend_filenames,
            self._is_output_node,
            output_dir=settings.output_dir,
            temp_dir=settings.temp_dir,
        )
        self._active: dict[str, Job] = {}
        self._where: dict[str, ComfyInstance] = {}
        self.active = 0
        #: Preprocess tasks of jobs still downloading their inputs, by job id.
        self._preparing: dict[str, asyncio.Task[Prepared]] = {}
        #: Interrupts of timed-out jobs still being sent to ComfyUI (held until done).
        self._stops: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def client(self) -> ComfyClient:
        """A ComfyUI client for questions any instance can answer (object_info, models): a
        ready instance's, else the first instance's."""
        for instance in self.instances:
            if instance.accepting:
                return instance.client
        return self.instances[0].client

    def output_nodes(self, prompt: dict[str, Any]) -> set[str]:
        """Ids of the nodes of a preprocessed ``prompt`` known to be output nodes: those with a
        ``filename_prefix``, and those whose class_type ComfyUI already said is an output node
        (from the clients' caches: no request is made)."""
        found: set[str] = set()
        for node_id, node in prompt.items():
            if not isinstance(node, dict):
                continue
            inputs = node.get("inputs")
            saves = isinstance(inputs, dict) and isinstance(inputs.get("filename_prefix"), str)
            class_type = str(node.get("class_type", ""))
            if saves or self.output_node_verdict(class_type):
                found.add(node_id)
        return found

    def output_node_verdict(self, class_type: str) -> bool | None:
        """What any instance's ComfyUI already said of ``class_type`` (True: an output node;
        None: never asked); no request is made."""
        verdicts = [i.client.output_node_verdict(class_type) for i in self.instances]
        if any(verdicts):
            return True
        return False if False in verdicts else None

    async def _is_output_node(self, class_type: str) -> bool:
        try:
            return await self.client().is_output_node(class_type)
        except ComfyUnavailable:
            return False

    async def check(self, request: PromptRequest) -> None:
        """Refuse what :meth:`prepare` would refuse, with no side effect: nothing downloaded,
        written or asked of ComfyUI (a job of the shared queue, checked on the replica that
        takes the request; :meth:`Preprocessor.check`). URLs pass the SSRF guard (their host
        resolved and checked, nothing fetched). Raises :class:`InputError` naming the field,
        with the job's ``id``."""
        job_id = request.id or str(uuid.uuid4())
        storage = self.storage

        async def check_url(url: str, location: str) -> None:
            from comfy_sidecar.storage import StorageError

            try:
                await storage.check_url(url, storage.credentials_for(url, request.credentials))
            except StorageError as exc:
                raise _download_failed(url, exc, location) from None

        try:
            await storage.check_request(request)
            prompt: dict[str, Any] = msgspec.to_builtins(request.prompt)
            await self.preprocessor.check(prompt, job_id, check_url, self.output_node_verdict)
        except InputError as exc:
            raise InputError(exc.message, exc.location, id=job_id) from None

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no job is in flight (results delivered); False after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _begin(self) -> None:
        self.active += 1
        self._idle.clear()

    def _end(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def run(self, request: PromptRequest) -> JobResult:
        """Run ``request.prompt``; returns a :class:`JobResult` whose files the caller must
        :meth:`~JobResult.release`. Raises the :mod:`comfy_sidecar.errors` classes:
        :class:`InputError` (a caller's mistake; :class:`ValidationFailed` when ComfyUI's
        validation refuses the prompt), :class:`Conflict` (id in use), :class:`Interrupted`,
        :class:`ExecutionFailed`, :class:`Unavailable` (ComfyUI down or gone) and
        :class:`TimedOut` (PROMPT_TIMEOUT_S)."""
        with job_scope():  # the caller's log records go back to its own job ids after
            return await self.complete(await self.prepare(request))

    async def prepare(
        self, request: PromptRequest, priority: int = 0, partner_key: Secret | None = None
    ) -> PendingJob:
        """Register the job and preprocess its prompt (media inputs, prefixes, output check).
        ``priority``: its place in the sidecar's queue (higher gets an instance slot first).
        ``partner_key`` goes to ComfyUI with the prompt (``extra_data.api_key_comfy_org``).

        Raises :class:`InputError` (with the job's ``id``) and :class:`Conflict`; on success the
        caller must pass the result to :meth:`complete` (or call its ``abandon``). Traced as
        the job's ``prepare`` span."""
        with tracing.span("prepare"):
            return await self._prepare(request, priority, partner_key)

    async def _prepare(
        self, request: PromptRequest, priority: int, partner_key: Secret | None
    ) -> PendingJob:
        started = time.monotonic()
        job_id = request.id or str(uuid.uuid4())
        try:
            await self.storage.check_request(request)  # SSRF guard: webhooks, uploads, creds
        except InputError as exc:
            raise InputError(exc.message, exc.location, id=job_id) from None
        prompt: dict[str, Any] = msgspec.to_builtins(request.prompt)
        job = Job(
            id=job_id, prompt_id=str(uuid.uuid4()), priority=priority, partner_key=partner_key
        )
        bind_job(job.id, job.prompt_id)
        if job_id in self._active:
            raise Conflict(f"a job with id {job_id!r} is already running", location="id", id=job_id)
        self._active[job_id] = job
        self._begin()
        ended = False
        lease = self.storage.lease()
        staging = JobStaging(self.storage, request.credentials, lease, self.settings)

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                lease.release()
                self._active.pop(job_id, None)
                self._where.pop(job_id, None)
                self._end()

        try:
            prepared = await self._preprocess(job, prompt, staging)
        except InputError as exc:
            end()
            raise InputError(exc.message, exc.location, id=job_id) from None
        except UpstreamFailed as exc:  # a full disk while downloading
            end()
            raise UpstreamFailed(
                exc.message, cause=exc.cause, location=exc.location, id=job_id
            ) from None
        except BaseException:
            end()
            raise
        return PendingJob(job, prepared, started, time.monotonic(), end)

    async def _preprocess(self, job: Job, prompt: dict[str, Any], staging: JobStaging) -> Prepared:
        """Preprocess under the job's deadline (PROMPT_TIMEOUT_S) and :meth:`interrupt`:
        either stops the downloads' wait at once. Raises :class:`TimedOut`,
        :class:`Interrupted` and what :meth:`Preprocessor.prepare` raises."""
        task = asyncio.ensure_future(self.preprocessor.prepare(prompt, job.id, staging))
        self._preparing[job.id] = task
        try:
            done, _ = await asyncio.wait({task}, timeout=self.settings.prompt_timeout_s or None)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self._preparing.pop(job.id, None)
        if not done:
            task.cancel()
            raise TimedOut(
                f"preprocessing (downloads) took longer than PROMPT_TIMEOUT_S "
                f"({self.settings.prompt_timeout_s:g} s)",
                id=job.id,
            )
        if task.cancelled():
            raise Interrupted("the job was interrupted while its inputs downloaded", id=job.id)
        return task.result()

    async def complete(
        self, pending: PendingJob, instance: ComfyInstance | None = None
    ) -> JobResult:
        """Queue a prepared job, wait for ComfyUI and collect its outputs (see :meth:`run`).
        ``instance`` pins the job to one instance, past the dispatcher (the warmup)."""
        prepared = pending.prepared
        try:
            outcome, ran_on = await self._run_somewhere(pending, instance)
            job = pending.job
            finished = time.monotonic()
            log.debug(
                "job %s: preprocess %.1f ms, queue+run %.1f ms (queued after %.1f ms)",
                job.id,
                (pending.preprocessed - pending.started) * 1000,
                (finished - pending.preprocessed) * 1000,
                (job.queued_at - pending.preprocessed) * 1000,
            )
            prepared.cleanup()
            self._raise_for(job, outcome, ran_on)
            with tracing.span("outputs.collect") as span:
                try:
                    files = collect_outputs(outcome.outputs, self.settings.output_dir)
                except OutputError as exc:
                    log.warning("job %s: %s", job.id, exc)
                    raise ExecutionFailed(
                        self.server_paths.scrub_text(str(exc)), id=job.id
                    ) from None
                span.set("comfy_sidecar.outputs", len(files))
            return JobResult(
                job,
                prepared.prompt,
                files,
                pending.started,
                pending.preprocessed,
                finished,
                self.settings.output_dir,
                on_release=pending.end,
            )
        except BaseException:
            pending.abandon()
            await self._remove_outputs_of(pending)
            raise

    async def _remove_outputs_of(self, pending: PendingJob) -> None:
        """A job that failed, timed out or was interrupted keeps no output files: remove what
        ComfyUI already wrote for it, off the event loop (it may list OUTPUT_DIR; logged,
        never raises)."""
        try:
            await asyncio.to_thread(
                remove_job_outputs, pending.job.outputs, pending.prompt, self.settings.output_dir
            )
        except OSError as exc:
            log.warning("job %s: could not remove its output files: %s", pending.job.id, exc)

    async def _run_somewhere(
        self, pending: PendingJob, pinned: ComfyInstance | None
    ) -> tuple[JobOutcome, ComfyInstance | None]:
        """Run the job on ``pinned`` or on the instances the dispatcher hands out, again
        elsewhere when an instance lost it before it started, and once more after an
        out-of-memory error with OOM_RETRY=true (after ``POST /free`` on that instance);
        (outcome, instance)."""
        oom_retried = False
        while True:
            job = pending.job
            instance = pinned or await self._acquire(job)
            if instance is None:
                return JobOutcome(
                    OutcomeKind.INTERRUPTED, error={"message": "interrupted before it ran"}
                ), None
            try:
                outcome = await self._execute(instance, job, pending.prompt)
            finally:
                if pinned is None:
                    instance.job_ended()  # before its slot is handed on: recycling limits
                    self.dispatcher.release(instance)
            if is_out_of_memory(outcome):
                await self._free(instance, job)
                if self.settings.oom_retry and not oom_retried and not job.interrupt_requested:
                    oom_retried = True
                    log.warning("job %s ran out of memory; running it once more", job.id)
                    await self._remove_outputs_of(pending)  # what the failed attempt saved
                    pending.job = job.again(str(uuid.uuid4()))
                    self._active[job.id] = pending.job
                    continue
            lost_unstarted = (
                outcome.kind is OutcomeKind.COMFY_LOST
                and job.exec_start_ms is None
                and not job.interrupt_requested
            )
            if not lost_unstarted or pinned is not None:
                return outcome, instance
            log.warning(
                "job %s had not started when instance %s lost it; queueing it again",
                job.id,
                instance.name,
            )
            pending.job = job.again(str(uuid.uuid4()))
            self._active[job.id] = pending.job

    async def _free(self, instance: ComfyInstance, job: Job) -> None:
        """``POST /free`` on ``instance`` after ``job`` ran out of memory (logged, never
        raises)."""
        log.warning("job %s ran out of memory; POST /free on instance %s", job.id, instance.name)
        try:
            await instance.client.free()
        except ComfyUnavailable as exc:
            log.warning("job %s: POST /free after out of memory failed: %s", job.id, exc)

    async def _acquire(self, job: Job) -> ComfyInstance | None:
        """Wait for a slot on a ready instance; None when the job is interrupted first."""
        if job.interrupt_requested:
            return None
        with tracing.span("queue.wait"):
            return await self._wait_for_slot(job)

    async def _wait_for_slot(self, job: Job) -> ComfyInstance | None:
        listener = job.listener

        def waiting() -> None:
            if listener is not None:
                listener("sidecar_waiting", {})

        slot = asyncio.ensure_future(self.dispatcher.acquire(job.priority, waiting))
        stop = asyncio.ensure_future(job.stop_requested.wait())
        try:
            await asyncio.wait({slot, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not slot.done():
                slot.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await slot
        if slot.cancelled():
            return None
        instance = cast("ComfyInstance", slot.result())
        if job.interrupt_requested:
            self.dispatcher.release(instance)
            return None
        return instance

    async def _execute(
        self, instance: ComfyInstance, job: Job, prompt: dict[str, Any]
    ) -> JobOutcome:
        if job.interrupt_requested:
            return JobOutcome(
                OutcomeKind.INTERRUPTED, error={"message": "interrupted before it was queued"}
            )
        with tracing.span("comfyui.execute") as span:
            if span.recording:
                span.set("comfyui.prompt_id", job.prompt_id)
                span.set("comfyui.instance", instance.name)
                job.timeline = []
            instance.registry.add(job)
            self._where[job.id] = instance
            try:
                outcome = await self._queue_and_wait(instance, job, prompt)
            finally:
                instance.registry.remove(job)
                if span.recording:
                    self._trace_nodes(span, job, prompt)
            if span.recording and outcome.kind is not OutcomeKind.SUCCESS:
                error = outcome.error or {}
                text = error.get("exception_message") or error.get("message") or ""
                span.error(self.server_paths.scrub_text(f"{outcome.kind}: {text}".strip()))
            return outcome

    def _trace_nodes(self, parent: tracing.Span | tracing.NoSpan, job: Job, prompt: Any) -> None:
        """One ``comfyui.node`` span per node ``job``'s frames timed (see
        :attr:`Job.timeline`), children of its ``comfyui.execute`` span ``parent``; the node
        ComfyUI's ``execution_error`` names is failed with its exception type and message
        (server paths scrubbed)."""
        end = time.time_ns()
        for node_id, start_ns, end_ns, cached, error in job.timeline or ():
            node = prompt.get(node_id) if isinstance(prompt, dict) else None
            class_type = str(node.get("class_type", "")) if isinstance(node, dict) else ""
            span = tracing.start(
                "comfyui.node",
                {
                    "comfyui.node.id": node_id,
                    "comfyui.node.class_type": class_type,
                    "comfyui.node.cached": cached,
                },
                parent=parent,
                start_ns=start_ns,
            )
            if error is not None:
                message = self.server_paths.scrub_text(str(error.get("exception_message", "")))
                span.error(message.strip(), exception_type=str(error.get("exception_type", "")))
            span.end(end_ns or end)

    async def _queue_and_wait(
        self, instance: ComfyInstance, job: Job, prompt: dict[str, Any]
    ) -> JobOutcome:
        if job.listener is not None:
            job.listener("sidecar_queued", {"prompt_id": job.prompt_id, "instance": instance.name})
        # PROMPT_TIMEOUT_S counts from here: a ComfyUI that froze before it took the POST
        # (whose own timeout outlasts the hang verdict) still answers 504 in time.
        limit = self.settings.prompt_timeout_s or None
        deadline = None if limit is None else time.monotonic() + limit
        try:
            await asyncio.wait_for(
                instance.client.queue_prompt(
                    bust_output_cache(prompt, job.prompt_id),
                    job.prompt_id,
                    instance.client_id,
                    job.partner_key,
                    tracing.traceparent(),
                ),
                limit,
            )
        except TimeoutError:
            raise self._timed_out(instance, job) from None
        except PromptRejected as exc:
            log.info("job %s: ComfyUI refused the prompt: %s", job.id, exc.body)
            raise _validation_failed(job.id, self.server_paths.scrub(exc.body)) from None
        except ComfyUnavailable as exc:
            if await _going_down(instance, 2.0):  # killed, crashed, recycling: what it took dies
                log.warning(
                    "job %s: POST /prompt failed as instance %s went down: %s",
                    job.id,
                    instance.name,
                    exc,
                )
                return JobOutcome(OutcomeKind.COMFY_LOST, error={"message": str(exc)})
            raise Unavailable(f"ComfyUI is not answering: {exc}", id=job.id) from None
        if job.listener is not None:
            job.listener("sidecar_accepted", {"prompt_id": job.prompt_id})
        if job.state is JobState.PREPROCESSING:
            job.state = JobState.QUEUED
        job.queued_ms = now_ms()
        job.queued_at = time.monotonic()
        if job.interrupt_requested:
            await self._stop_in_comfy(instance, job)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(job.done), remaining)
        except TimeoutError:
            raise self._timed_out(instance, job) from None

    def _timed_out(self, instance: ComfyInstance, job: Job) -> TimedOut:
        """The 504 for ``job`` past PROMPT_TIMEOUT_S; its removal from ComfyUI's queue or its
        interrupt is sent in the background, so a frozen ComfyUI does not hold the caller."""
        log.warning("job %s exceeded PROMPT_TIMEOUT_S; interrupting it", job.id)
        job.interrupt_requested = True
        stop = asyncio.get_running_loop().create_task(self._stop_in_comfy(instance, job))
        self._stops.add(stop)
        stop.add_done_callback(self._stops.discard)
        return TimedOut(
            f"the job ran longer than PROMPT_TIMEOUT_S "
            f"({self.settings.prompt_timeout_s:g} s) and was interrupted",
            id=job.id,
        )

    def _raise_for(self, job: Job, outcome: JobOutcome, instance: ComfyInstance | None) -> None:
        """Raise the error ``outcome`` ends ``job`` with (nothing for a success). ComfyUI's
        text in it (exception message, traceback, log tail) names server paths: they are
        logged in full here and scrubbed from the error (:class:`ServerPaths`)."""
        error = outcome.error or {}
        if outcome.kind is OutcomeKind.SUCCESS:
            return
        if outcome.kind is OutcomeKind.INTERRUPTED:
            where: dict[str, Any] = {}
            if error.get("node_id") is not None:
                where = {"node_id": error.get("node_id"), "node_type": error.get("node_type")}
            raise Interrupted("the job was interrupted", id=job.id, **where)
        scrub = self.server_paths.scrub
        tail = scrub(instance.log_tail(30)) if instance is not None else []
        if outcome.kind is OutcomeKind.COMFY_LOST:
            raise Unavailable(
                scrub(
                    "ComfyUI went away while the job was running: "
                    f"{error.get('message', 'unknown')}"
                ),
                id=job.id,
                comfyui_log_tail=tail,
                **({"reason": outcome.reason} if outcome.reason else {}),
            )
        exc_type = error.get("exception_type", "")
        raw_msg = str(error.get("exception_message", error.get("message", ""))).strip()
        where_text = f"node {error.get('node_id')} ({error.get('node_type')})"
        log.warning(
            "job %s: ComfyUI's execution error in %s: %s: %s", job.id, where_text, exc_type, raw_msg
        )
        exc_msg = scrub(raw_msg)
        if is_out_of_memory(outcome):
            raise Unavailable(
                f"ComfyUI ran out of memory in {where_text}: {exc_type}: {exc_msg}",
                id=job.id,
                reason="out_of_memory",
                node_id=error.get("node_id"),
                node_type=error.get("node_type"),
                exception_type=exc_type,
                exception_message=exc_msg,
                comfyui_log_tail=tail,
            )
        raise ExecutionFailed(
            f"Prompt execution failed in {where_text}: {exc_type}: {exc_msg}",
            id=job.id,
            node_id=error.get("node_id"),
            node_type=error.get("node_type"),
            exception_type=exc_type,
            exception_message=exc_msg,
            traceback=scrub(error.get("traceback", [])),
            comfyui_log_tail=tail,
        )

    async def _stop_in_comfy(self, instance: ComfyInstance, job: Job) -> None:
        """Remove ``job`` from ComfyUI's pending queue, or interrupt it if it is running."""
        try:
            await instance.client.delete_pending([job.prompt_id])
            await instance.client.interrupt(job.prompt_id)
        except ComfyUnavailable as exc:
            log.warning("could not stop job %s in ComfyUI: %s", job.id, exc)
            return
        await instance.registry.reconcile()

    def unstarted(self, job_id: str) -> bool:
        """True while job ``job_id`` is in flight but has not begun executing: preprocessing,
        waiting for a slot, or pending in an instance's ComfyUI queue."""
        job = self._active.get(job_id)
        return (
            job is not None
            and not job.done.done()
            and job.exec_start_ms is None
            and job.state in (JobState.PREPROCESSING, JobState.QUEUED)
        )

    async def interrupt(self, job_id: str) -> bool:
        """Stop job ``job_id`` wherever it is: still downloading its inputs (its preprocessing
        is cancelled, and with it each download no other caller waits for: see
        :meth:`~comfy_sidecar.storage.cache.DownloadCache.get`), waiting in the sidecar's
        queue, pending in an instance's ComfyUI queue (removed), or running (interrupted by
        prompt_id, effective at the next node boundary). False when no such job is in flight
        or its result is already decided (:meth:`Job.cancel`): True means the job ends
        interrupted, never with its outputs, even when ComfyUI finished it before the
        interrupt arrived."""
        job = self._active.get(job_id)
        if job is None or not job.cancel():
            return False
        job.stop_requested.set()
        preparing = self._preparing.get(job_id)
        instance = self._where.get(job_id)
        if preparing is not None:
            preparing.cancel()  # releases the caller now, even mid-download
        elif instance is not None and job.state is not JobState.PREPROCESSING:
            await self._stop_in_comfy(instance, job)
        return True


#: Words in ComfyUI's execution_error (exception_type or exception_message) that mean the
#: node ran out of memory (torch raises ``torch.OutOfMemoryError``, "CUDA out of memory";
#: ComfyUI's message starts "Allocation on device").
OUT_OF_MEMORY_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "Allocation on device")


def is_out_of_memory(outcome: JobOutcome) -> bool:
    """True when ``outcome`` is ComfyUI's out-of-memory execution error."""
    if outcome.kind is not OutcomeKind.EXECUTION_ERROR or not outcome.error:
        return False
    text = f"{outcome.error.get('exception_type', '')} {outcome.error.get('exception_message', '')}"
    return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)


CACHE_BUSTER = "comfy_sidecar_job"


def bust_output_cache(prompt: dict[str, Any], prompt_id: str) -> dict[str, Any]:
    """A copy of ``prompt`` in which every node with a ``filename_prefix`` has one extra input,
    ``comfy_sidecar_job: <prompt_id>``.

    ComfyUI keys its node cache on every input, so a saving node is never served from the
    cache: a cached SaveImage would point at files the sidecar already removed (a job id used
    twice with the same prompt). ComfyUI passes a node only the inputs it declares, so the
    extra one never reaches the node itself. Upstream nodes stay cached.
    """
    copy = dict(prompt)
    for node_id, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict) and isinstance(inputs.get("filename_prefix"), str):
            copy[node_id] = {**node, "inputs": {**inputs, CACHE_BUSTER: prompt_id}}
    return copy


async def _going_down(instance: ComfyInstance, within_s: float) -> bool:
    """Whether ``instance``'s child is being replaced now or within ``within_s`` seconds (a
    killed child's connections fail a moment before its exit is noticed)."""
    end = time.monotonic() + within_s
    while not instance.going_down:
        if time.monotonic() >= end:
            return False
        await asyncio.sleep(0.05)
    return True


def _validation_failed(job_id: str, comfy: dict[str, Any]) -> ValidationFailed:
    """Our error for ComfyUI's validation failure (``comfy`` is its 400 body); ``location`` is
    as precise as ComfyUI's ``node_errors`` allow (``prompt.<node>.inputs.<input>``,
    ``prompt.<node>``, ``prompt``)."""
    error = comfy.get("error")
    node_errors = comfy.get("node_errors") or {}
    if isinstance(error, dict):
        message = str(error.get("message") or "ComfyUI rejected the prompt")
        details = error.get("details")
        if details:
            message = f"{message}: {details}"
    else:
        message = str(error or "ComfyUI rejected the prompt")
    location = "prompt"
    if isinstance(node_errors, dict) and len(node_errors) == 1:
        node_id, node_error = next(iter(node_errors.items()))
        location = f"prompt.{node_id}"
        errors = node_error.get("errors") if isinstance(node_error, dict) else None
        if isinstance(errors, list) and len(errors) == 1 and isinstance(errors[0], dict):
            first = errors[0]
            input_name = (first.get("extra_info") or {}).get("input_name")
            if input_name:
                location = f"prompt.{node_id}.inputs.{input_name}"
            message = f"{message}; node {node_id}: {first.get('message')}: {first.get('details')}"
    return ValidationFailed(
        message, location, id=job_id, comfyui_error=error, node_errors=node_errors
    )
