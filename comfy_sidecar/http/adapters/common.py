"""What the job adapters (Modal jobs, Modal simple, ai-dock) share: one job backend, one view.

Each adapter translates its own request into a :class:`~comfy_sidecar.jobs.spec.JobSpec`,
submits it to the :class:`~comfy_sidecar.jobs.backend.JobBackend` and translates the
:class:`~comfy_sidecar.jobs.model.JobView` back; the helpers here are the parts of that they
have in common. None of them knows which backend runs.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from comfy_sidecar.errors import InputError, SidecarError
from comfy_sidecar.http.routes.jobs import with_data
from comfy_sidecar.jobs.backend import JobBackend
from comfy_sidecar.jobs.model import JobView
from comfy_sidecar.jobs.spec import AfterEnd, JobSpec
from comfy_sidecar.schemas import PromptNode, PromptRequest


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
            from comfy_sidecar.schemas.locations import msgspec_location

            what, where = msgspec_location(exc)
            suffix = f".{where}" if where else ""
            raise InputError(what, f"{location}.{node_id}{suffix}") from None
    return msgspec.convert({"prompt": workflow, "id": job_id, **options}, PromptRequest)


def fingerprint(request: PromptRequest, *extra: Any) -> bytes:
    """What makes two submissions with one id "the same body": the request and any fields the
    adapter adds of its own (a webhook URL)."""
    return msgspec.json.encode([request, *extra])


async def submit(
    jobs: JobBackend,
    request: PromptRequest,
    endpoint: str,
    location: str,
    *extra: Any,
    after: AfterEnd | None = None,
) -> JobView:
    """Submit ``request`` (its ``id`` set) for an adapter: the fingerprint is
    :func:`fingerprint` of ``request`` and ``extra``, ``after`` the adapter's webhook (sent by
    whichever replica ends the job), and an error naming the prompt
    (``prompt.9.inputs.image``) names it where the adapter's body has it (``location``:
    ``workflow.9.inputs.image``)."""
    spec = JobSpec(
        request=request,
        endpoint=endpoint,
        fingerprint=fingerprint(request, *extra),
        after=after,
    )
    try:
        return await jobs.submit(spec)
    except SidecarError as exc:
        relocate(exc, location)
        raise


def relocate(exc: SidecarError, location: str) -> None:
    """Move ``exc``'s ``location`` in the prompt (``prompt.9.inputs.image``) to where the
    adapter's body has the prompt (``location``: ``workflow.9.inputs.image``)."""
    where = exc.location or ""
    if where == "prompt" or where.startswith("prompt."):
        exc.location = location + where.removeprefix("prompt")


async def outputs_with_data(jobs: JobBackend, view: JobView) -> list[dict[str, Any]]:
    """``view``'s outputs as plain dicts, each retained file's bytes as base64 ``data``."""
    outputs: list[dict[str, Any]] = (await with_data(jobs, view)).get("outputs") or []
    return outputs
