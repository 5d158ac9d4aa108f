"""The job registry: every job the sidecar runs, fed by ComfyUI's event stream.

One :class:`Job` per API request (and per warmup), keyed by its API id and by the ComfyUI
``prompt_id`` the sidecar chose. ComfyUI's frames move a job through its states; the job's
``done`` future resolves exactly once with a :class:`JobOutcome`. Completion follows DESIGN.md:
``executing`` with ``node: null`` for the prompt_id means finished (history is written by then);
``execution_error`` / ``execution_interrupted`` end it at once. When frames may have been missed
(reconnect, a quiet socket), :meth:`JobRegistry.reconcile` asks ``/queue`` then ``/history``.
Status views (``GET /prompt/{id}``, progress streams, metrics) are meant to read this registry.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from comfy_sidecar.comfy.client import ComfyClient, ComfyUnavailable
from comfy_sidecar.comfy.events import Preview
from comfy_sidecar.schemas.secret import Secret

log = logging.getLogger("comfy_sidecar.jobs")


def now_ms() -> int:
    """Milliseconds since the epoch."""
    return int(time.time() * 1000)


class JobState(enum.StrEnum):
    """Where a job is. Terminal states: completed, failed, interrupted."""

    PREPROCESSING = "preprocessing"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class OutcomeKind(enum.StrEnum):
    """How a job ended."""

    SUCCESS = "success"
    EXECUTION_ERROR = "execution_error"
    INTERRUPTED = "interrupted"
    COMFY_LOST = "comfy_lost"


@dataclass
class JobOutcome:
    """The end of a job: ``outputs`` is ComfyUI's history ``outputs`` (node id -> ui dict);
    ``error`` is ComfyUI's ``execution_error`` data, or ``{"message": ...}`` when ComfyUI went
    away; ``reason`` says why the sidecar lost it (``comfyui_exited``, ``comfyui_hung``,
    ``comfyui_stalled``, ``recycle``, ``shutdown``), None otherwise."""

    kind: OutcomeKind
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    reason: str | None = None


@dataclass
class Job:
    """One job. Times are ms since the epoch; ``progress`` is nodes done / total and the current
    node's step value / max (from ComfyUI's ``progress_state`` and ``progress`` frames)."""

    id: str
    prompt_id: str
    state: JobState = JobState.PREPROCESSING
    created_ms: int = field(default_factory=now_ms)
    queued_ms: int | None = None
    queued_at: float = 0.0
    exec_start_ms: int | None = None
    exec_end_ms: int | None = None
    node_starts: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    current_node: str | None = None
    nodes_done: int = 0
    nodes_total: int = 0
    step_value: float = 0.0
    step_max: float = 0.0
    interrupt_requested: bool = False
    missed_frames: bool = False
    #: ComfyUI's ``extra_data.api_key_comfy_org`` for the job's partner nodes (sent with its
    #: ``POST /prompt`` only).
    partner_key: Secret | None = None
    #: Its place in the sidecar's queue: higher gets a slot first (its API key's priority).
    priority: int = 0
    #: Called with (frame type, data) for each of the job's frames, after the job took it,
    #: and with ``("sidecar_queued", {"prompt_id", "instance"})`` when it is sent to ComfyUI,
    #: ``("sidecar_accepted", {"prompt_id"})`` once ComfyUI took it (its validation passed) and
    #: ``("sidecar_waiting", {})`` when it waits for an instance slot.
    listener: Callable[[str, dict[str, Any]], None] | None = None
    #: The nodes' times, for the job's trace: None (not kept) unless the pipeline traces the
    #: job; then one ``[node_id, start_ns, end_ns, cached, error]`` per node that ran or was
    #: served from ComfyUI's cache, timed from the frames (see :func:`_note_node`).
    timeline: list[list[Any]] | None = None
    #: Set by an interrupt, so a job still waiting for an instance stops waiting.
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future[JobOutcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def again(self, prompt_id: str) -> Job:
        """A fresh job for the same request, to send again under ``prompt_id`` (its instance
        lost it before it started); the listener and interrupt state carry over."""
        return Job(
            id=self.id,
            prompt_id=prompt_id,
            created_ms=self.created_ms,
            interrupt_requested=self.interrupt_requested,
            partner_key=self.partner_key,
            priority=self.priority,
            listener=self.listener,
            stop_requested=self.stop_requested,
        )

    def cancel(self) -> bool:
        """Decide that the job ends interrupted, unless its result is decided already.

        The one place an interrupt and the job's end meet: both run on the event loop, so
        checking ``done`` and marking the job happen in one step. True: the job is marked
        (``interrupt_requested``) before anyone tells ComfyUI, and whatever outcome arrives
        later is turned into INTERRUPTED by :meth:`finish` (its caller answers 499, even when
        ComfyUI finished the prompt before the interrupt reached it). False: the job had
        already ended; the interrupt changes nothing.
        """
        if self.done.done():
            return False
        self.interrupt_requested = True
        return True

    def finish(self, outcome: JobOutcome) -> None:
        """Resolve ``done`` with ``outcome`` (later calls are ignored) and set the state. A
        job that was cancelled (:meth:`cancel`) ends INTERRUPTED whatever ``outcome`` says;
        its ``outputs`` and ``error`` are kept."""
        if self.done.done():
            return
        if self.interrupt_requested and outcome.kind is not OutcomeKind.INTERRUPTED:
            outcome = JobOutcome(
                OutcomeKind.INTERRUPTED,
                outputs=outcome.outputs,
                error={"message": "interrupted", **(outcome.error or {})},
                reason=outcome.reason,
            )
        self.state = {
            OutcomeKind.SUCCESS: JobState.COMPLETED,
            OutcomeKind.INTERRUPTED: JobState.INTERRUPTED,
        }.get(outcome.kind, JobState.FAILED)
        if self.exec_end_ms is None:
            self.exec_end_ms = now_ms()
        self.done.set_result(outcome)


class DuplicateJob(Exception):
    """A job with this API id is already in flight."""


class JobRegistry:
    """In-flight jobs by API id and by ComfyUI prompt_id; frames dispatch into them."""

    RECENT = 1024

    def __init__(self) -> None:
        self._by_prompt: dict[str, Job] = {}
        self._by_id: dict[str, Job] = {}
        # prompt_id -> API id of recently finished jobs, for frames that arrive after the end
        # (e.g. `executing` null after an error) and are forwarded as system events.
        self._recent: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._by_prompt)

    def jobs(self) -> list[Job]:
        """Every job in flight."""
        return list(self._by_prompt.values())

    def add(self, job: Job) -> None:
        """Register ``job`` (before it is queued). Raises :class:`DuplicateJob`."""
        if job.id in self._by_id:
            raise DuplicateJob(job.id)
        self._by_id[job.id] = job
        self._by_prompt[job.prompt_id] = job
        self._empty.clear()

    def remove(self, job: Job) -> None:
        """Forget ``job`` (after its result was delivered)."""
        self._by_id.pop(job.id, None)
        if self._by_prompt.pop(job.prompt_id, None) is not None:
            self._recent[job.prompt_id] = job.id
            if len(self._recent) > self.RECENT:
                del self._recent[next(iter(self._recent))]
        if not self._by_prompt:
            self._empty.set()

    async def wait_empty(self) -> None:
        """Wait until no job is in flight (every one removed after its result)."""
        await self._empty.wait()

    def by_id(self, job_id: str) -> Job | None:
        """The in-flight job with API id ``job_id``."""
        return self._by_id.get(job_id)

    def api_id_for(self, prompt_id: str) -> str | None:
        """The API id of the job ComfyUI knows as ``prompt_id``."""
        job = self._by_prompt.get(prompt_id)
        return job.id if job else self._recent.get(prompt_id)

    # --- frames ---------------------------------------------------------------------------

    def on_frame(self, frame: dict[str, Any]) -> None:
        """Apply one ComfyUI websocket frame ``{"type", "data"}`` to its job, if it is ours."""
        data = frame.get("data")
        if not isinstance(data, dict):
            return
        job = self._by_prompt.get(str(data.get("prompt_id")))
        if job is None or job.done.done():
            return
        kind = frame.get("type")
        if job.timeline is not None:
            _note_node(job.timeline, kind, data)
        if kind == "execution_start":
            job.state = JobState.RUNNING
            job.exec_start_ms = _int(data.get("timestamp")) or now_ms()
        elif kind == "execution_cached":
            job.nodes_done += len(data.get("nodes") or ())
        elif kind == "executing":
            node = data.get("node")
            if node is None:
                self._finished(job)
            else:
                job.state = JobState.RUNNING
                job.current_node = str(node)
                job.node_starts[str(node)] = now_ms()
                job.step_value = job.step_max = 0.0
        elif kind == "executed":
            node = str(data.get("node"))
            output = data.get("output")
            if isinstance(output, dict):
                merged = job.outputs.setdefault(node, {})
                for key, value in output.items():
                    if isinstance(value, list) and isinstance(merged.get(key), list):
                        merged[key] = merged[key] + value
                    else:
                        merged[key] = value
        elif kind == "progress":
            job.step_value = float(data.get("value") or 0)
            job.step_max = float(data.get("max") or 0)
        elif kind == "progress_state":
            nodes = data.get("nodes")
            if isinstance(nodes, dict):
                job.nodes_total = max(job.nodes_total, len(nodes))
                job.nodes_done = sum(
                    1
                    for n in nodes.values()
                    if isinstance(n, dict) and n.get("state") == "finished"
                )
        elif kind == "execution_success":
            job.exec_end_ms = _int(data.get("timestamp")) or now_ms()
        elif kind == "execution_error":
            job.exec_end_ms = _int(data.get("timestamp")) or now_ms()
            job.finish(JobOutcome(OutcomeKind.EXECUTION_ERROR, error=dict(data)))
        elif kind == "execution_interrupted":
            job.exec_end_ms = _int(data.get("timestamp")) or now_ms()
            job.finish(JobOutcome(OutcomeKind.INTERRUPTED, error=dict(data)))
        if job.listener is not None and isinstance(kind, str):
            job.listener(kind, data)

    def on_preview(self, preview: Preview) -> None:
        """Hand a preview image to its job: the one its metadata names, else (a type 1 frame)
        the job running now. Sent to the job's listener as ``("preview", {"node_id",
        "mime_type", "image"})``."""
        job = self._by_prompt.get(preview.prompt_id) if preview.prompt_id else None
        if job is None and preview.prompt_id is None:
            running = [j for j in self._by_prompt.values() if j.state is JobState.RUNNING]
            job = running[0] if len(running) == 1 else None
        if job is None or job.done.done() or job.listener is None:
            return
        node = preview.node_id or job.current_node
        job.listener(
            "preview", {"node_id": node, "mime_type": preview.mime_type, "image": preview.image}
        )

    def _finished(self, job: Job) -> None:
        if job.missed_frames:
            # Frames (maybe `executed` ones) were lost: history is the authority.
            job.missed_frames = False
            task = asyncio.get_running_loop().create_task(self._complete_from_history(job))
            self._tasks.add(task)  # bounded by the jobs in flight; owned until done
            task.add_done_callback(self._tasks.discard)
            return
        job.finish(JobOutcome(OutcomeKind.SUCCESS, outputs=job.outputs))

    async def _complete_from_history(self, job: Job) -> None:
        if self._client is None:
            job.finish(JobOutcome(OutcomeKind.SUCCESS, outputs=job.outputs))
            return
        try:
            entry = await self._client.history(job.prompt_id)
        except ComfyUnavailable as exc:
            job.finish(JobOutcome(OutcomeKind.COMFY_LOST, error={"message": str(exc)}))
            return
        if entry is None:
            job.finish(JobOutcome(OutcomeKind.SUCCESS, outputs=job.outputs))
        else:
            job.finish(outcome_from_history(entry))

    # --- reconciliation ---------------------------------------------------------------------

    _client: ComfyClient | None = None

    def attach(self, client: ComfyClient) -> None:
        """Use ``client`` for history look-ups."""
        self._client = client

    def mark_missed_frames(self) -> None:
        """The socket dropped: every queued/running job may have lost frames."""
        for job in self._by_prompt.values():
            if job.state in (JobState.QUEUED, JobState.RUNNING):
                job.missed_frames = True

    async def reconcile(self) -> None:
        """Settle queued/running jobs whose frames may be lost, from ``/queue`` then ``/history``.

        A prompt still in ComfyUI's queue is left alone. One that is not is finished: its
        history entry says how (history is written in the same step that takes it off the
        queue); no entry means ComfyUI lost it (restart, or deleted while pending).
        """
        client = self._client
        candidates = [
            j
            for j in self._by_prompt.values()
            if j.state in (JobState.QUEUED, JobState.RUNNING) and not j.done.done()
        ]
        if client is None or not candidates:
            return
        try:
            running, pending = await client.queue()
        except ComfyUnavailable as exc:
            log.warning("reconcile: /queue failed: %s", exc)
            return
        for job in candidates:
            if job.done.done() or job.prompt_id in running or job.prompt_id in pending:
                continue
            try:
                entry = await client.history(job.prompt_id)
            except ComfyUnavailable as exc:
                log.warning("reconcile: /history failed: %s", exc)
                return
            if entry is not None:
                log.info("job %s settled from /history", job.id)
                job.finish(outcome_from_history(entry))
            elif job.interrupt_requested:
                job.finish(
                    JobOutcome(
                        OutcomeKind.INTERRUPTED, error={"message": "removed from ComfyUI's queue"}
                    )
                )
            else:
                job.finish(
                    JobOutcome(
                        OutcomeKind.COMFY_LOST,
                        error={"message": "ComfyUI no longer knows this prompt"},
                    )
                )

    def fail_all(self, message: str, reason: str | None = None) -> None:
        """Fail every unfinished job at once (ComfyUI exited, hung or was restarted), as
        COMFY_LOST with ``reason``. The pipeline sends the ones that had not started
        (no ``exec_start_ms``) to another instance; the running one fails."""
        for job in list(self._by_prompt.values()):
            if job.state is not JobState.PREPROCESSING:
                job.finish(
                    JobOutcome(OutcomeKind.COMFY_LOST, error={"message": message}, reason=reason)
                )

    def waiting_since(self) -> float | None:
        """``time.monotonic()`` at which the longest-waiting job was queued in ComfyUI, when
        jobs are queued there and none of ours runs; None otherwise (for stall detection)."""
        queued = [j.queued_at for j in self._by_prompt.values() if j.state is JobState.QUEUED]
        if not queued or any(j.state is JobState.RUNNING for j in self._by_prompt.values()):
            return None
        return min(queued)


def outcome_from_history(entry: dict[str, Any]) -> JobOutcome:
    """Turn a ``/history/{id}`` entry into a :class:`JobOutcome`."""
    status = entry.get("status") or {}
    outputs = entry.get("outputs") or {}
    messages = status.get("messages") or []
    for message in messages:
        if isinstance(message, list) and len(message) == 2:
            name, data = message
            if name == "execution_error":
                return JobOutcome(OutcomeKind.EXECUTION_ERROR, outputs, dict(data))
            if name == "execution_interrupted":
                return JobOutcome(OutcomeKind.INTERRUPTED, outputs, dict(data))
    if status.get("status_str") == "error":
        return JobOutcome(OutcomeKind.EXECUTION_ERROR, outputs, {"message": "ComfyUI error"})
    return JobOutcome(OutcomeKind.SUCCESS, outputs)


def _note_node(timeline: list[list[Any]], kind: Any, data: dict[str, Any]) -> None:
    """Keep the nodes' times from one frame of the job (``time.time_ns()`` when it arrived):
    ``executing`` starts a node and ends the one before; ``executed`` of the running node, the
    next ``executing`` or the end of the prompt (``execution_success``, ``execution_error``,
    ``execution_interrupted``, ``executing`` null) ends it; ``execution_cached`` adds its
    nodes as cached, starting and ending at once. ``execution_error`` keeps its data on the
    failed node's entry (``error``)."""
    if kind not in _TIMED:
        return
    now = time.time_ns()
    running = timeline[-1] if timeline and not timeline[-1][2] else None
    if kind == "execution_cached":
        timeline.extend([str(n), now, now, True, None] for n in data.get("nodes") or ())
        return
    node = data.get("node")
    if kind == "executed" and (running is None or running[0] != str(node)):
        return
    if running is not None:
        running[2] = now
    if kind == "executing" and node is not None:
        timeline.append([str(node), now, 0, False, None])
    elif kind == "execution_error":
        failed = str(data.get("node_id"))
        entry = next((e for e in reversed(timeline) if e[0] == failed), None)
        if entry is None:
            entry = [failed, now, now, False, None]
            timeline.append(entry)
        entry[4] = data


#: The frames :func:`_note_node` reads.
_TIMED = frozenset(
    {
        "execution_cached",
        "executing",
        "executed",
        "execution_success",
        "execution_error",
        "execution_interrupted",
    }
)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
