"""What the job adapters (Modal jobs, Modal simple, ai-dock) share: one job store, one view.

Each adapter translates its own request into a :class:`~comfy_sidecar.schemas.PromptRequest`,
submits it through :class:`~comfy_sidecar.jobs.runner.JobService` and translates the
:class:`~comfy_sidecar.jobs.store.JobRecord` back; the helpers here are the parts of that they
have in common.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec

from comfy_sidecar.errors import InputError, NotFound, SidecarError
from comfy_sidecar.jobs.after import AfterEnd
from comfy_sidecar.jobs.runner import JobService
from comfy_sidecar.jobs.shared import SharedJobs
from comfy_sidecar.jobs.store import JobRecord, JobStatus, JobStore
from comfy_sidecar.routes.jobs import with_data
from comfy_sidecar.schemas import PromptNode, PromptRequest

#: Completed jobs the wait estimate averages over (the most recent ones).
ESTIMATE_SAMPLE = 20


def new_job_id() -> str:
    """A fresh job id (a UUID4), for the APIs whose client never names its job."""
    return str(uuid.uuid4())


def prompt_request(workflow: Any, job_id: str, location: str, **options: Any) -> PromptRequest:
    """``workflow`` (an API-format graph) as a :class:`PromptRequest` with id ``job_id`` and
    the other /prompt fields in ``options``. Raises :class:`InputError` naming the node field
    at fault under ``location`` (``workflow.3.class_type``), or ``location`` itself when the
    workflow is not a non-empty object of nodes."""
    if not isinstance(workflow, dict) or not workflow:
        raise InputError("Invalid workflow format: must be a non-empty JSON object", location)
    for node_id, node in workflow.items():
        try:
            msgspec.convert(node, PromptNode)
        except msgspec.ValidationError as exc:
            from comfy_sidecar.locations import msgspec_location

            what, where = msgspec_location(exc)
            suffix = f".{where}" if where else ""
            raise InputError(what, f"{location}.{node_id}{suffix}") from None
    return msgspec.convert({"prompt": workflow, "id": job_id, **options}, PromptRequest)


def fingerprint(request: PromptRequest, *extra: Any) -> bytes:
    """What makes two submissions with one id "the same body": the request and any fields the
    adapter adds of its own (a webhook URL)."""
    return msgspec.json.encode([request, *extra])


async def submit(
    jobs: JobService, request: PromptRequest, endpoint: str, location: str, *extra: Any
) -> JobRecord:
    """``jobs.submit`` for an adapter: the fingerprint is :func:`fingerprint` of ``request``
    and ``extra``, and an error naming the prompt (``prompt.9.inputs.image``) names it where
    the adapter's body has it (``location``: ``workflow.9.inputs.image``)."""
    try:
        return await jobs.submit(
            request, endpoint=endpoint, fingerprint=fingerprint(request, *extra)
        )
    except SidecarError as exc:
        relocate(exc, location)
        raise


async def submit_shared(
    shared: SharedJobs,
    request: PromptRequest,
    endpoint: str,
    location: str,
    *extra: Any,
    after: AfterEnd | None = None,
) -> dict[str, Any]:
    """:func:`submit` in queue mode (JOB_QUEUE_URL): the job is checked here and appended to
    the shared stream (:meth:`SharedJobs.submit`) with the adapter's webhook ``after`` (sent
    by whichever replica ends it); returns its ``GET /jobs/{id}`` body."""
    try:
        return await shared.submit(request, fingerprint(request, *extra), after, endpoint)
    except SidecarError as exc:
        relocate(exc, location)
        raise


async def shared_view(shared: SharedJobs, job_id: str) -> dict[str, Any]:
    """Job ``job_id``'s ``GET /jobs/{id}`` body in the shared queue, from any replica;
    :class:`NotFound` (404, as :func:`~comfy_sidecar.routes.jobs.job_of`) when not kept."""
    view = await shared.get(job_id)
    if view is None:
        raise NotFound(f"no job with id {job_id!r}", location="id", id=job_id)
    return view


def relocate(exc: SidecarError, location: str) -> None:
    """Move ``exc``'s ``location`` in the prompt (``prompt.9.inputs.image``) to where the
    adapter's body has the prompt (``location``: ``workflow.9.inputs.image``)."""
    where = exc.location or ""
    if where == "prompt" or where.startswith("prompt."):
        exc.location = location + where.removeprefix("prompt")


def estimated_wait_s(store: JobStore, record: JobRecord | None = None) -> int | None:
    """Seconds until ``record`` (or a job submitted now) is likely done: the mean run time of
    the last completed jobs times the jobs ahead of it plus one. None before any job ran."""
    durations: list[int] = []
    pending = 0
    for other in reversed(list(store)):
        if other is record:
            pending = 0  # count only the jobs ahead of it
            continue
        if other.status in (JobStatus.PENDING, JobStatus.IN_PROGRESS):
            pending += 1
        elif (
            other.status is JobStatus.COMPLETED
            and other.started_ms is not None
            and other.completed_ms is not None
            and len(durations) < ESTIMATE_SAMPLE
        ):
            durations.append(other.completed_ms - other.started_ms)
    if not durations:
        return None
    if record is not None and record.status.terminal:
        return 0
    mean_s = sum(durations) / len(durations) / 1000
    return max(1, round(mean_s * (pending + 1)))


async def outputs_with_data(jobs: JobService, record: JobRecord) -> list[dict[str, Any]]:
    """``record``'s outputs as plain dicts, each retained file's bytes as base64 ``data``
    (read off the event loop)."""
    body = {"outputs": [msgspec.to_builtins(output) for output in record.outputs]}
    outputs: list[dict[str, Any]] = (await asyncio.to_thread(with_data, jobs, record, body))[
        "outputs"
    ]
    return outputs


def error_message(record: JobRecord) -> str | None:
    """The one-line reason a job did not complete: ``Cancelled by user`` for a cancel, else
    the ``error`` of its error body; None for a job that has not failed."""
    return message_of(record.status, record.error)


def message_of(status: JobStatus, error: dict[str, Any] | None) -> str | None:
    """:func:`error_message` of a job's status and error body (a shared job's view)."""
    if status is JobStatus.CANCELLED:
        return "Cancelled by user"
    if error is None:
        return None
    return str(error.get("error", "failed"))
