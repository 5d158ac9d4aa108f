"""One job's life on the replica that runs it: admitted, recorded, prepared, run, completed or
failed, its webhooks sent and its adapter's after-end action run, whichever front door and
whichever backend it came through.

Every request runs through :class:`JobLifecycle`: ``/prompt`` and the workflow endpoints
(:meth:`~JobLifecycle.answer`: 200 with the outputs, or 202 with webhooks), the warmup
(:meth:`~JobLifecycle.warmup`), the job APIs in-process (:meth:`~JobLifecycle.submit`: run in
the background, outputs kept under JOBS_DIR) and the jobs a replica claims from the shared
queue (:meth:`~JobLifecycle.run`). A backend takes part in a run through an :class:`Attempt`:
it may mirror the record elsewhere, choose where large outputs go, forbid this run to end the
job (another replica ended it first), and persist the end.

There is one failure routine (:meth:`JobLifecycle.end_failed`) and one after-end hook
(the adapter's webhook, :data:`comfy_sidecar.webhooks.adapters.FORMATS`), in both modes.
Admission is decided in one place (:meth:`JobLifecycle.admit`).

Copies comfyui-api's rules for which requests are asynchronous: a ``webhook`` or ``webhook_v2``,
or an upload block with ``async: true``, answers 202 ``{"status": "ok", "id", "prompt"}`` once the
prompt is preprocessed (so a caller's mistake is still a 400), and the job finishes in the
background. Unlike comfyui-api the request is never echoed back whole: ``credentials`` stay out
of every response and webhook.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import msgspec

from comfy_sidecar.assets.hashing import hash_file
from comfy_sidecar.config.keys import KeyPolicy
from comfy_sidecar.errors import (
    Conflict,
    Interrupted,
    Overloaded,
    RateLimited,
    SidecarError,
    ValidationFailed,
)
from comfy_sidecar.jobs.model import (
    DifferentBody,
    JobStatus,
    JobView,
    OutputInfo,
    error_body,
    status_for,
)
from comfy_sidecar.jobs.progress import Progress, nodes_to_run
from comfy_sidecar.jobs.quotas import NO_HOLD, Hold, LocalQuotas, Quotas
from comfy_sidecar.jobs.record import JobRecord
from comfy_sidecar.jobs.spec import AfterEnd, JobSpec
from comfy_sidecar.jobs.store import JobStore
from comfy_sidecar.jobs.streaming import OutputStream, streams_outputs
from comfy_sidecar.observability import metrics, tracing
from comfy_sidecar.observability.logs import TRACEPARENT, bind_traceparent
from comfy_sidecar.pipeline.convert import Converter
from comfy_sidecar.pipeline.deliver import (
    Accepted,
    Delivered,
    Uploader,
    answer,
    echo,
    is_async,
    postprocess,
    upload_target,
)
from comfy_sidecar.pipeline.outputs import media_type_of, mime_type_of
from comfy_sidecar.pipeline.run import JobResult, PendingJob, Pipeline
from comfy_sidecar.schemas import AcceptedResponse, Echoed, PromptRequest
from comfy_sidecar.schemas.secret import Secret
from comfy_sidecar.storage.files import move
from comfy_sidecar.webhooks.spool import Spool

if TYPE_CHECKING:
    from comfy_sidecar.comfy.instance import ComfyInstance
    from comfy_sidecar.pipeline.outputs import OutputFile
    from comfy_sidecar.webhooks import WebhookDispatcher
    from comfy_sidecar.webhooks.adapters import Format

log = logging.getLogger("comfy_sidecar.jobs")

__all__ = ["Admission", "Attempt", "JobLifecycle", "LocalAttempt", "Superseded"]

#: Frames that move progress.
PROGRESS_FRAMES = frozenset(
    {"execution_cached", "executing", "executed", "progress", "progress_state"}
)

Spawn = Callable[[Awaitable[Any]], Any]
"""``spawn(coro)``: run ``coro`` as a task the process owns (cancelled at shutdown)."""


class Superseded(Exception):
    """Another replica ended this job first: this run's outcome is discarded."""


@dataclass(frozen=True, slots=True)
class Admission:
    """What :meth:`JobLifecycle.admit` took for one job: ``counted`` (a MAX_PENDING_DELIVERIES
    place, held until its webhooks are delivered) and ``hold`` (its places in its API key's
    quotas, held until it ends)."""

    counted: bool = False
    hold: Hold = NO_HOLD


#: Nothing taken (a resubmission, the warmup).
NOTHING = Admission()


class Attempt(Protocol):
    """What a backend adds to one run of a job on this replica (see the module docstring)."""

    def bind(self, record: JobRecord) -> None:
        """The run's record exists (``record``): mirror it from now on."""

    def spill(self, result: JobResult) -> tuple[str, Any] | None:
        """Where the outputs of a job that names no upload target go: ``(location, upload
        spec)``, or None to keep them. Raises a
        :class:`~comfy_sidecar.errors.SidecarError` (the job fails) when they have nowhere
        to go."""

    async def may_end(self) -> bool:
        """May this run end the job (deliver webhooks and write the end)? False: another
        run or a cancel ended it first."""

    async def keep(self, index: int, path: Path) -> bool:
        """Output ``index`` of the running job was written (``path``, its kept copy under
        JOBS_DIR): make it readable wherever the job's outputs are read, before its ``output``
        event is published (:mod:`comfy_sidecar.jobs.streaming`). False: not now (it is kept
        with the job's end instead)."""
        ...

    async def ended(self, view: JobView, files: Sequence[Path]) -> bool:
        """The job ended here with its final ``view`` and retained output ``files`` (one per
        output, in order; empty for uploaded outputs and failures): persist the end. False
        when another run's end was persisted instead (this one is discarded)."""
        ...


class Verdict:
    """ComfyUI's verdict on a job's prompt, which a submission with ``JobSpec.verdict`` waits
    for: :meth:`handed` once ComfyUI took the prompt, or the job waits for an instance slot,
    or ended otherwise; :meth:`refused` with ComfyUI's
    :class:`~comfy_sidecar.errors.ValidationFailed`."""

    def __init__(self) -> None:
        self._future: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )

    def handed(self) -> None:
        """The prompt is ComfyUI's (or waits for a slot): the submission is answered."""
        if not self._future.done():
            self._future.set_result(None)

    def refused(self, exc: BaseException) -> None:
        """ComfyUI refused the prompt with ``exc``."""
        if not self._future.done():
            self._future.set_result(exc)

    async def wait(self) -> BaseException | None:
        """None once handed, or the refusal."""
        return await asyncio.shield(self._future)


class LocalAttempt:
    """The in-process backend's part in a run: nothing to mirror, spill or persist (the
    local store holds the record and its retained files)."""

    def bind(self, record: JobRecord) -> None:
        """Nothing to mirror."""

    def spill(self, result: JobResult) -> tuple[str, Any] | None:
        """Outputs stay under JOBS_DIR."""
        return None

    async def may_end(self) -> bool:
        """Only this replica runs the job."""
        return True

    async def keep(self, index: int, path: Path) -> bool:
        """The file under JOBS_DIR is what ``GET /jobs/{id}/outputs/{n}`` serves."""
        return True

    async def ended(self, view: JobView, files: Sequence[Path]) -> bool:
        """The local store already keeps the end."""
        return True


class JobLifecycle:
    """Runs jobs on this replica: see the module docstring.

    ``admit()`` raises unless the process takes new work now (the runtime's health: draining,
    not ready, MAX_QUEUE_DEPTH); ``quotas`` counts the API keys' quotas (in memory unless the
    backend shares them); ``uploader`` uploads a result's files; ``formats`` builds the
    adapters' after-end webhook bodies; ``spawn`` owns background tasks.

    Asynchronous jobs with a webhook (``webhook``, ``webhook_v2``) are admitted up to
    MAX_PENDING_DELIVERIES at once, counted from their 202 until every webhook of theirs was
    delivered or given up (:attr:`pending_deliveries`); beyond it :class:`Overloaded` (429).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        store: JobStore,
        webhooks: WebhookDispatcher,
        uploader: Uploader,
        spawn: Spawn,
        *,
        admit: Callable[[], None],
        formats: Mapping[str, Format],
        quotas: Quotas | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.quotas: Quotas = quotas or LocalQuotas()
        self.store = store
        self.webhooks = webhooks
        self.uploader = uploader
        self.spawn = spawn
        self._admit = admit
        self.formats = dict(formats)
        settings = pipeline.settings
        self.max_pending = settings.max_pending_deliveries
        #: Asynchronous jobs with a webhook admitted and not yet delivered.
        self.pending_deliveries = 0
        self.spool = Spool(Path(settings.output_dir) / f".comfy-sidecar-webhooks-{settings.port}")
        #: Output conversion (``convert_output``): one at a time, CONVERT_MAX_PIXELS at most.
        self.converter = Converter(settings.convert_max_pixels)
        #: Jobs finishing in the background (:meth:`_finish_run`) not yet ended: run,
        #: delivered or failed, their webhooks queued.
        self.background = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every job finishing in the background ended, its webhooks queued in
        the dispatcher (the shutdown closes the dispatcher only then); False after
        ``timeout_s`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
        except TimeoutError:
            return False
        return True

    # --- admission ------------------------------------------------------------------------

    async def admit(
        self,
        request: PromptRequest,
        *,
        key: KeyPolicy | None = None,
        runs_here: bool = True,
    ) -> Admission:
        """Decide whether a new job (``request``, its ``id`` set) is taken, once for every front
        door. ``runs_here``: the job runs on this replica (``/prompt``, the in-process job APIs):
        the process must take work now (raises :class:`~comfy_sidecar.errors.Unavailable` (503)
        while draining or before ComfyUI is first ready, :class:`Overloaded` (429) at
        MAX_QUEUE_DEPTH), and an asynchronous job with a webhook takes one of
        MAX_PENDING_DELIVERIES places. A job for the shared queue (``runs_here`` False) is
        taken whatever this replica's state: any replica may run it. Either way the API
        ``key``'s quotas must admit it (:class:`~comfy_sidecar.errors.RateLimited`, 429,
        counted in ``comfyui_key_rejections_total``). Returns what was taken: give it back
        with :meth:`undo` when the job is refused after all."""
        assert request.id is not None
        if runs_here:
            self._admit()
        hold = NO_HOLD
        if key is not None:
            try:
                hold = await self.quotas.take(key, request.id, runs_here=runs_here)
            except RateLimited as exc:
                metrics.key_rejected(key.name, exc.reason)
                raise
        if not runs_here or not (request.webhook or request.webhook_v2):
            return Admission(False, hold)
        limit = self.max_pending
        if limit and self.pending_deliveries >= limit:
            hold.release()
            raise Overloaded(
                f"{self.pending_deliveries} asynchronous job(s) with a webhook are not "
                f"delivered yet (MAX_PENDING_DELIVERIES {limit}); try again later",
                location="webhook_v2" if request.webhook_v2 else "webhook",
            )
        self.pending_deliveries += 1
        return Admission(True, hold)

    async def check_after(self, spec: JobSpec) -> None:
        """Refuse a job whose adapter webhook (``spec.after``) the SSRF guard forbids: the
        check ``webhook_v2`` gets, a 400 naming the adapter's field. Every job of the job APIs
        passes it at submission, whichever backend takes it."""
        if spec.after is not None:
            await self.pipeline.storage.check_webhook(spec.after.url, spec.after.location)

    def admit_check(self) -> None:
        """Raise as :meth:`admit` does when the process takes no new work now, before a front
        door does work of its own for a request (a workflow endpoint asks ComfyUI)."""
        self._admit()

    def undo(self, admission: Admission) -> None:
        """Give back what :meth:`admit` took for a job that is refused after all (or was a
        resubmission): its MAX_PENDING_DELIVERIES place and its quota places."""
        self.pending_deliveries -= admission.counted
        admission.hold.release()

    def _delivered_when(self, futures: Sequence[asyncio.Future[bool]]) -> None:
        """Give back one admitted job's place once all of its webhooks' ``futures`` resolved."""
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

    def owner_of(self, job_id: str) -> str | None:
        """The name of the API key that submitted job ``job_id`` on this replica (None: no
        key, or no such job here)."""
        record = self.store.find(job_id)
        return None if record is None else record.owner

    # --- records --------------------------------------------------------------------------

    def open(
        self, job_id: str, endpoint: str, fingerprint: bytes = b"", key: KeyPolicy | None = None
    ) -> tuple[JobRecord, bool]:
        """The record of a new job ``job_id`` from ``endpoint``, submitted with the API
        ``key`` (its name owns the job, its priority places it); (record, created).

        With a ``fingerprint`` (the job APIs), a retained job with the same id and body is
        returned (created False) and another body raises :class:`Conflict`. Without one
        (``/prompt``, workflows, warmup) a job that has ended is replaced, as comfyui-api lets
        an id be reused, and one still running raises :class:`Conflict`.
        """
        record = JobRecord(
            id=job_id,
            endpoint=endpoint,
            fingerprint=fingerprint,
            owner=None if key is None else key.name,
            priority=0 if key is None else key.priority,
        )
        existing = self.store.find(job_id)
        if existing is not None and not fingerprint:
            if not existing.status.terminal:
                raise Conflict(
                    f"a job with id {job_id!r} is already running", location="id", id=job_id
                )
            self.store.drop(existing)
        try:
            return self.store.add(record)
        except DifferentBody:
            raise Conflict(
                f"a job with id {job_id!r} exists with a different body", location="id", id=job_id
            ) from None

    async def _prepare(
        self,
        record: JobRecord,
        request: PromptRequest,
        hold: Hold,
        priority: int,
        *,
        partner_key: Secret | None = None,
        stream: OutputStream | None = None,
        verdict: Verdict | None = None,
    ) -> PendingJob:
        """Prepare ``request`` (downloads, inputs) and follow its frames into ``record``
        (``hold``: told when it starts running; ``priority``: its place in the sidecar's
        queue; its outputs into ``stream`` as they are written, when given). A request refused
        here leaves no record; one interrupted while its inputs downloaded (``POST
        /interrupt``, a cancel: the job was seen, by id) ends ``cancelled`` and is kept.
        Raises what :meth:`Pipeline.prepare` raises."""
        try:
            pending = await self.pipeline.prepare(request, priority, partner_key)
        except Interrupted as exc:
            self.store.finish(record, status_for(exc), error=error_body(exc, record.id))
            raise
        except BaseException:
            self.store.drop(record)
            raise
        self._attach(record, pending, hold, stream, verdict)
        return pending

    def _stream(self, spec: JobSpec, record: JobRecord, attempt: Attempt) -> OutputStream | None:
        """The early-output stream of a job run for the job APIs, when its outputs are final
        as written (:func:`~comfy_sidecar.jobs.streaming.streams_outputs`)."""
        if not streams_outputs(spec.request):
            return None
        return OutputStream(record, self.store, attempt, self.pipeline.settings.output_dir)

    def _attach(
        self,
        record: JobRecord,
        pending: PendingJob,
        hold: Hold,
        stream: OutputStream | None = None,
        verdict: Verdict | None = None,
    ) -> None:
        """The job is registered and prepared: follow its frames from now on (``hold`` is
        told when it starts running)."""
        prompt = pending.prompt
        class_types = {
            node_id: str(node.get("class_type", ""))
            for node_id, node in prompt.items()
            if isinstance(node, Mapping)
        }
        record.prompt_id = pending.job.prompt_id
        output_nodes = self.pipeline.output_nodes(prompt)
        record.progress = Progress(class_types, nodes_to_run(prompt, output_nodes))
        pending.job.listener = lambda kind, data: self._on_frame(
            record, kind, data, hold, stream, verdict
        )

    def _on_frame(
        self,
        record: JobRecord,
        kind: str,
        data: Mapping[str, Any],
        hold: Hold = NO_HOLD,
        stream: OutputStream | None = None,
        verdict: Verdict | None = None,
    ) -> None:
        """One ComfyUI frame of ``record``'s job (``hold``: its quota places, told when it
        starts running)."""
        if record.status.terminal:
            return
        if verdict is not None and kind in ("sidecar_accepted", "sidecar_waiting"):
            verdict.handed()
        if kind == "executed" and stream is not None:
            stream.executed(str(data.get("node")), data.get("output"))
        if kind == "preview":  # live only: not kept in the event log, sent with ?previews=true
            image = data.get("image")
            if isinstance(image, bytes):
                import base64

                body = {
                    "node_id": data.get("node_id"),
                    "mime_type": data.get("mime_type"),
                    "data": base64.b64encode(image).decode("ascii"),
                }
                record.publish("preview", body, log_it=False)
        elif kind == "sidecar_queued":  # sent to an instance (again, after it lost the job)
            record.prompt_id = str(data.get("prompt_id"))
            record.instance = str(data.get("instance"))
        elif kind == "execution_start":
            self.store.set_status(record, JobStatus.IN_PROGRESS)
            hold.started()
        elif kind in PROGRESS_FRAMES and isinstance(record.progress, Progress):
            if record.status is JobStatus.PENDING:
                self.store.set_status(record, JobStatus.IN_PROGRESS)
                hold.started()
            if record.progress.apply(kind, data):
                record.publish("progress", record.progress.view())

    def _completed(
        self,
        record: JobRecord,
        files: list[OutputFile],
        urls: list[str] | None,
        stats: dict[str, Any],
        *,
        retain: bool,
        hashes: Sequence[str] = (),
    ) -> None:
        """End ``record`` completed with ``files`` (uploaded to ``urls`` when given), after
        the outputs already published while it ran (:mod:`comfy_sidecar.jobs.streaming`).
        ``retain`` moves each file under ``JOBS_DIR/<id>/`` so ``GET /jobs/{id}/outputs/{n}``
        serves it (``hashes``: their blake3, in order); the caller's list then no longer owns
        them."""
        first = len(record.outputs)
        outputs: list[OutputInfo] = []
        for offset, item in enumerate(files):
            index = first + offset
            mime = mime_type_of(item.filename)
            size = item.size
            digest: str | msgspec.UnsetType = msgspec.UNSET
            if urls is not None:
                url: str | None = urls[offset]
            elif retain:
                target = self.store.job_dir(record.id) / f"{index}-{item.filename}"
                move(item.path, target)
                record.files.append(target)
                url = f"/jobs/{record.id}/outputs/{index}"
                if offset < len(hashes):
                    digest = hashes[offset]
            else:
                url = None
            outputs.append(
                OutputInfo(
                    node_id=item.node_id,
                    filename=item.filename,
                    media_type=media_type_of(mime),
                    mime_type=mime,
                    size_bytes=size,
                    url=url,
                    hash=digest,
                )
            )
        if retain and urls is None:
            files.clear()
        record.outputs.extend(outputs)
        for output in outputs:
            record.publish("output", output)
        metrics.job_completed(stats)
        self.store.finish(record, JobStatus.COMPLETED, stats=stats)

    # --- front doors ----------------------------------------------------------------------

    async def answer(
        self,
        request: PromptRequest,
        workflow_input: dict[str, Any] | None = None,
        endpoint: str = "prompt",
        key: KeyPolicy | None = None,
    ) -> Delivered:
        """Answer one ``/prompt`` (or workflow endpoint) request: :class:`Answered` or
        :class:`Streamed` (200) once the job is done, or :class:`Accepted` (202) at once when
        it is asynchronous (:func:`~comfy_sidecar.pipeline.deliver.is_async`). ``key``: the
        policy of the API key it came with (the job counts against its quotas until it ends).

        ``workflow_input`` (a workflow endpoint's ``input``) is added to every body as
        ``input``. Raises the :mod:`comfy_sidecar.errors` classes for everything that goes
        wrong before the answer (see :meth:`Pipeline.run`;
        :class:`~comfy_sidecar.errors.UpstreamFailed` for an upload).

        Traced as one trace, the job's root span starting here (it continues the request's
        ``traceparent``) and ending with the job.
        """
        root = tracing.job_span("job", TRACEPARENT.get(), {"job.endpoint": endpoint})
        with tracing.use(root):
            try:
                delivered = await self._answer(request, workflow_input, endpoint, key, root)
            except BaseException as exc:
                root.error(exc)
                root.end()
                raise
        if not isinstance(delivered, Accepted):  # an accepted job's run ends its span
            root.end()
        return delivered

    async def _answer(
        self,
        request: PromptRequest,
        workflow_input: dict[str, Any] | None,
        endpoint: str,
        key: KeyPolicy | None,
        root: tracing.Span | tracing.NoSpan,
    ) -> Delivered:
        if request.id is None:
            request = msgspec.structs.replace(request, id=str(uuid.uuid4()))
        assert request.id is not None
        root.set("job.id", request.id)
        spec = JobSpec(request=request, endpoint=endpoint, key=key)
        admission = await self.admit(request, key=key)
        try:
            record, _ = self.open(request.id, endpoint, key=key)
            pending = await self._prepare(record, request, admission.hold, spec.priority)
        except BaseException:
            self.undo(admission)
            raise
        echoed = Echoed(**echo(request), input=workflow_input)
        if is_async(request):
            self.spawn(
                self._finish_run(
                    spec,
                    record,
                    pending,
                    echoed,
                    LocalAttempt(),
                    retain=False,
                    counted=admission.counted,
                    hold=admission.hold,
                    root=root,
                )
            )
            fields = msgspec.structs.asdict(echoed)
            return Accepted(
                AcceptedResponse(**fields, status="ok", id=pending.job.id, prompt=pending.prompt)
            )
        result: JobResult | None = None
        try:
            result = await self.pipeline.complete(pending)
            await postprocess(result, request, self.converter)
            urls = await self._upload(result, upload_target(request))
        except BaseException as exc:
            self.store.finish(record, status_for(exc), error=error_body(exc, record.id))
            if result is not None:
                result.release()
            raise
        finally:
            admission.hold.release()
        self._completed(record, result.files, urls, result.stats(), retain=False)
        return answer(result, echoed, urls)

    async def warmup(self, request: PromptRequest, instance: ComfyInstance) -> None:
        """Run the warmup prompt on ``instance`` (past the dispatcher): recorded like any job,
        its outputs removed at once (a trace of its own). Raises what :meth:`Pipeline.run`
        raises."""
        assert request.id is not None
        root = tracing.job_span("job", None, {"job.endpoint": "warmup", "job.id": request.id})
        with root:
            record, _ = self.open(request.id, "warmup")
            pending = await self._prepare(record, request, NO_HOLD, 0)
            try:
                result = await self.pipeline.complete(pending, instance)
            except BaseException as exc:
                self.store.finish(record, status_for(exc), error=error_body(exc, record.id))
                raise
            self._completed(record, result.files, None, result.stats(), retain=False)
            result.release()

    async def submit(self, spec: JobSpec) -> JobRecord:
        """A job of the job APIs run on this replica (the in-process backend): admitted,
        prepared now (a caller's mistake raises, and nothing is kept), then run in the
        background; outputs are kept under JOBS_DIR unless the request uploads them.
        Resubmitting a retained id with the same fingerprint returns that job (nothing is
        admitted or run); another body raises :class:`Conflict`. Traced as :meth:`answer`
        is."""
        root = tracing.job_span(
            "job", TRACEPARENT.get(), {"job.endpoint": spec.endpoint, "job.id": spec.id}
        )
        with tracing.use(root):
            try:
                record, started = await self._submit(spec, root)
            except BaseException as exc:
                root.error(exc)
                root.end()
                raise
        if not started:  # a resubmission: nothing runs
            root.set("job.resubmitted", True)
            root.end()
        return record

    async def _submit(
        self, spec: JobSpec, root: tracing.Span | tracing.NoSpan
    ) -> tuple[JobRecord, bool]:
        """:meth:`submit`; (the record, whether a run started: it ends ``root``)."""
        request = spec.request
        await self.check_after(spec)
        existing = self.store.find(spec.id)
        resubmitted = existing is not None and existing.fingerprint == spec.fingerprint
        admission = NOTHING if resubmitted else await self.admit(request, key=spec.key)
        attempt = LocalAttempt()
        verdict = Verdict() if spec.verdict else None
        try:
            record, created = self.open(spec.id, spec.endpoint, spec.fingerprint, spec.key)
            if not created:  # a resubmission: nothing new to deliver
                self.undo(admission)
                return record, False
            self._describe(record, spec)
            stream = self._stream(spec, record, attempt)
            pending = await self._prepare(
                record,
                request,
                admission.hold,
                spec.priority,
                partner_key=spec.partner_key,
                stream=stream,
                verdict=verdict,
            )
        except BaseException:
            self.undo(admission)
            raise
        echoed = Echoed(**echo(request), input=None)
        self.spawn(
            self._finish_run(
                spec,
                record,
                pending,
                echoed,
                attempt,
                retain=True,
                counted=admission.counted,
                hold=admission.hold,
                stream=stream,
                verdict=verdict,
                root=root,
            )
        )
        if verdict is not None:
            refusal = await verdict.wait()
            if refusal is not None:  # ComfyUI refused the prompt: no job was made
                self.store.drop(record)
                raise refusal
        return record, True

    @staticmethod
    def _describe(record: JobRecord, spec: JobSpec) -> None:
        """What a job API's record keeps of its spec: labels and the submitted prompt."""
        record.metadata = spec.metadata
        record.keep_prompt(spec.request.prompt)

    async def run(self, spec: JobSpec, attempt: Attempt) -> JobRecord:
        """Run a job another replica accepted (taken from the shared queue) here, to its end:
        prepared, run, its webhooks and after-end action sent, its end persisted by
        ``attempt``. A job that cannot be prepared (a download fails) ends ``failed`` through
        the same failure routine: it was accepted, so it is never silently dropped.

        The run continues the submitter's trace (``spec.traceparent``): its ``job`` span
        (CONSUMER) is a child of the submission's span, and the run's log records carry that
        trace id (also with tracing off: the submitter's request's own traceparent)."""
        bind_traceparent(spec.traceparent)
        root = tracing.job_span(
            "job",
            spec.traceparent,
            {"job.endpoint": spec.endpoint, "job.id": spec.id},
            kind="consumer",
        )
        with root:
            return await self._run(spec, attempt)

    async def _run(self, spec: JobSpec, attempt: Attempt) -> JobRecord:
        record, _ = self.open(spec.id, spec.endpoint, key=spec.key)
        self._describe(record, spec)
        attempt.bind(record)
        echoed = Echoed(**echo(spec.request), input=None)
        try:
            pending = await self.pipeline.prepare(spec.request, spec.priority, spec.partner_key)
        except Exception as exc:
            await self.end_failed(spec, record, exc, attempt)
            return record
        stream = self._stream(spec, record, attempt)
        self._attach(record, pending, NO_HOLD, stream)
        await self._finish_run(spec, record, pending, echoed, attempt, retain=True, stream=stream)
        return record

    def request_cancel(self, record: JobRecord) -> None:
        """A cancel reached ``record``'s job before it ended: mark it (``cancel_requested``,
        the v2 ``canceling``) and, when it runs, say so in a ``status`` event (with
        JOB_QUEUE_URL the replica running the job does this when the cancel reaches it)."""
        if record.status.terminal or record.cancel_requested:
            return
        record.cancel_requested = True
        if record.status is JobStatus.IN_PROGRESS:
            record.publish("status", {"status": record.status.value, "cancel_requested": True})

    async def cancel(self, record: JobRecord) -> bool:
        """Cancel ``record``'s job if it has not ended, wherever it is on this replica
        (preparing, waiting for a slot, in ComfyUI's queue, running); False (nothing done)
        when it has ended."""
        if record.status.terminal:
            return False
        self.request_cancel(record)
        interrupted = await self.pipeline.interrupt(record.id)
        if interrupted:
            await record.wait_ended(10.0)
        return interrupted or record.status is JobStatus.CANCELLED

    # --- the end --------------------------------------------------------------------------

    async def _upload(self, result: JobResult, target: tuple[str, Any] | None) -> list[str] | None:
        if target is None:
            return None
        import time

        started = time.monotonic()
        urls = await self.uploader(result, *target)
        result.timings["upload"] = time.monotonic() - started
        return urls

    async def _finish_run(
        self,
        spec: JobSpec,
        record: JobRecord,
        pending: PendingJob,
        echoed: Echoed,
        attempt: Attempt,
        *,
        retain: bool,
        counted: bool = False,
        hold: Hold = NO_HOLD,
        stream: OutputStream | None = None,
        verdict: Verdict | None = None,
        root: tracing.Span | tracing.NoSpan = tracing.NO_SPAN,
    ) -> None:
        """Finish a prepared job: run, convert, upload, then (if ``attempt`` may end it) the
        webhooks, the record's end, its persistence and the adapter's after-end action.
        ``counted``: the job holds a MAX_PENDING_DELIVERIES place until its webhooks are
        delivered or given up; ``hold``: its quota places, given back once it ended.
        ``stream``: the outputs published while it ran, which the end's outputs follow.
        ``verdict``: told when ComfyUI refused the prompt, or that it did not. ``root``: the
        job's span, ended here (a run from the queue ends its own)."""
        request = spec.request
        result: JobResult | None = None
        sent: list[asyncio.Future[bool]] = []
        self.background += 1
        self._idle.clear()
        try:
            try:
                result = await self.pipeline.complete(pending)
            finally:
                if stream is not None:
                    await stream.drain()
            if stream is not None:
                stream.take(result)
            await postprocess(result, request, self.converter)
            urls: list[str] | None = None
            target = upload_target(request)
            spilled = attempt.spill(result) if target is None else None
            if spilled is not None or not request.webhook:
                urls = await self._upload(result, spilled or target)
            hashes: list[str] = []
            if retain and urls is None and result.files:
                paths = [item.path for item in result.files]
                hashes = await asyncio.to_thread(lambda: [hash_file(path) for path in paths])
            if not await attempt.may_end():
                raise Superseded(f"job {record.id} was ended by another replica first")
            if request.webhook:
                sent += await self._send_v1(request.webhook, result)
            elif request.webhook_v2:
                sent.append(await self._send_v2(request.webhook_v2, result, echoed, urls))
            self._completed(
                record, result.files, urls, result.stats(), retain=retain, hashes=hashes
            )
            view = self.store.view(record)
            if await attempt.ended(view, record.files):
                await self.after_end(view, spec.after)
        except Superseded as exc:
            self.store.finish(record, status_for(exc), error=error_body(exc, record.id))
            log.warning("%s; its result here is discarded", exc)
            tracing.current().set("job.superseded", True)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                self.store.finish(record, status_for(exc), error=error_body(exc, record.id))
                tracing.current().error(exc)
                raise
            sent += await self.end_failed(spec, record, exc, attempt, prompt=pending.prompt)
            if verdict is not None and isinstance(exc, ValidationFailed):
                verdict.refused(exc)
        finally:
            if verdict is not None:
                verdict.handed()
            hold.release()
            if result is not None:
                result.release()
            if counted:
                self._delivered_when(sent)
            self.background -= 1
            if self.background == 0:
                self._idle.set()
            root.end()

    async def end_failed(
        self,
        spec: JobSpec,
        record: JobRecord,
        failure: BaseException | dict[str, Any],
        attempt: Attempt,
        *,
        prompt: Any = None,
        status: JobStatus | None = None,
    ) -> list[asyncio.Future[bool]]:
        """The one failure routine, for every job that ends without its outputs: it failed
        preparing or running, was cancelled, timed out, or ran out of attempts. ``failure`` is
        the exception or the error body. Unless another run ended the job first
        (``attempt.may_end()``): ``record`` ends (``status``, or the exception's), the job's
        failure webhook (``webhook_v2``'s ``prompt.failed`` or ``webhook``'s) is sent, the
        end is persisted and the adapter's after-end action runs. Returns
        the webhook's futures."""
        job_id = record.id
        root = tracing.current()  # the job's span where it runs (nothing elsewhere)
        if root.recording:
            if isinstance(failure, BaseException):
                root.error(failure)
            else:
                root.error(str(failure.get("error", "the job failed")))
        if isinstance(failure, BaseException):
            error = error_body(failure, job_id)
            final = status or status_for(failure)
            if isinstance(failure, SidecarError):
                log.warning("job %s failed (%s): %s", job_id, type(failure).__name__, failure)
            else:
                log.error("job %s failed", job_id, exc_info=failure)
        else:
            error, final = failure, status or JobStatus.FAILED
        if not await attempt.may_end():
            self.store.finish(record, final, error=error)
            log.warning(
                "job %s was ended by another replica first; its failure here is discarded",
                job_id,
            )
            return []
        if prompt is None:
            prompt = msgspec.to_builtins(spec.request.prompt)
        self.store.finish(record, final, error=error)
        sent = await self._send_failure(spec.request, job_id, prompt, error)
        view = self.store.view(record)
        if await attempt.ended(view, []):
            await self.after_end(view, spec.after)
        return sent

    async def after_end(self, view: JobView, after: AfterEnd | None) -> None:
        """The after-end hook: send the adapter's webhook (its body built by
        :data:`~comfy_sidecar.webhooks.adapters.FORMATS`) for a job that ended here with final
        ``view``. Never raises (a failure is logged)."""
        if after is None:
            return
        try:
            build = self.formats.get(after.kind)
            if build is None:
                log.error("job %s: no webhook format %r on this replica", view.id, after.kind)
                return
            await self.webhooks.send_prompt(
                after.url, build(view.body(), after), view.id, order_key=view.id
            )
        except Exception:
            log.exception("job %s: the adapter's webhook could not be sent", view.id)

    async def _send_v1(self, url: str, result: JobResult) -> list[asyncio.Future[bool]]:
        from comfy_sidecar.webhooks import v1_output_body

        stats = result.stats()
        sent: list[asyncio.Future[bool]] = []
        for item in result.files:
            link, remove = await self.spool.hold(item.path)
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
                images.append(Base64File(*await self.spool.hold(item.path)))
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
