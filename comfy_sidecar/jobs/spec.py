"""What a front door hands the job layer: a :class:`JobSpec` (the ``/prompt`` request with its
id, the API it came through, what makes a resubmission "the same body", the adapter's
after-end action, the API key's policy: owner, quotas, priority, and the Comfy API v2's extras:
string labels, an ``Idempotency-Key`` and the partner key). Both backends keep it as it is (the
Redis backend as JSON fields of the job's hash), so the replica that ends a job knows what to
send; the partner key alone is never kept with the job (see :attr:`JobSpec.partner_key`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from comfy_sidecar.config.keys import KeyPolicy
from comfy_sidecar.schemas import PromptRequest
from comfy_sidecar.schemas.secret import Secret

__all__ = ["IDEMPOTENCY_TTL_S", "AfterEnd", "JobSpec", "reuse_message"]

#: Seconds an ``Idempotency-Key`` stays used (24 h: the Comfy API v2 contract).
IDEMPOTENCY_TTL_S = 24 * 3600


def reuse_message(job_id: str | None) -> str:
    """The message of :class:`~comfy_sidecar.errors.IdempotencyKeyReuse` for a key that job
    ``job_id`` used (None: unknown)."""
    made = f" (it made job {job_id})" if job_id else ""
    return (
        f"this Idempotency-Key was already used in the last 24 hours{made}: keys are "
        "single-use; look for the job the first request made instead of sending it again"
    )


class AfterEnd(msgspec.Struct, kw_only=True, frozen=True):
    """What to send once the job has ended: ``kind`` names the adapter's body format (a key of
    :data:`comfy_sidecar.webhooks.adapters.FORMATS`: ``aidock``, ``modal_jobs``), ``url``
    where it goes (http(s), checked by the SSRF guard at submission as ``webhook_v2`` is, a
    400 naming ``location``, the adapter's field: ``webhook_url``, ``input.webhook.url``),
    ``extra_params`` fields the adapter merges into the body (ai-dock's
    ``webhook.extra_params``)."""

    kind: str
    url: str
    location: str = "webhook_url"
    extra_params: dict[str, Any] = {}


class JobSpec(msgspec.Struct, kw_only=True, frozen=True):
    """One job as submitted: ``request`` (its ``id`` set), ``endpoint`` (the API it came
    through: ``jobs``, ``modal_jobs``, ``modal_simple``, ``aidock``; the metrics' label),
    ``fingerprint`` (bytes: two submissions with one id and the same fingerprint are one job;
    empty for ``/prompt``, whose ids may be reused once a job ended), ``after`` (the
    adapter's webhook, sent by whichever replica ends the job) and ``key`` (the policy of the
    API key that submitted it: its name owns the job, its quotas admit it, its priority places
    it in the queues; None without keys; the HTTP layer sets it, never the key itself) and
    ``traceparent`` (the W3C trace context the job continues where it runs: the submitting
    replica's span, or the submitter's request's own header with tracing off; kept with the
    job in Redis).

    The Comfy API v2 (``comfy_v2``) adds: ``metadata``, string labels kept with the job, shown
    in its view and filtered on by :meth:`~comfy_sidecar.jobs.backend.JobBackend.page`;
    ``idempotency_key``, single-use for :data:`IDEMPOTENCY_TTL_S` across every replica (a
    reuse raises :class:`~comfy_sidecar.errors.IdempotencyKeyReuse` and makes no job; a
    refused submission leaves it unused); ``partner_key``, ComfyUI's
    ``extra_data.api_key_comfy_org`` for partner (API) nodes: sent with the job's
    ``POST /prompt`` and nowhere else, never in the job's body, events or logs (in-process it
    lives only in the running job; with JOB_QUEUE_URL in a key of its own that the claiming
    replica reads and the job's end deletes); ``verdict``: the submission waits for ComfyUI's
    verdict on the prompt when the job goes to ComfyUI at once (in-process, an instance slot
    free): a prompt ComfyUI refuses raises its
    :class:`~comfy_sidecar.errors.ValidationFailed` and leaves no job. A job that waits for a
    slot, or is submitted to the shared queue, is answered at once; ComfyUI's refusal then
    ends it ``failed``."""

    request: PromptRequest
    endpoint: str
    fingerprint: bytes = b""
    after: AfterEnd | None = None
    key: KeyPolicy | None = None
    metadata: dict[str, str] | None = None
    idempotency_key: str | None = None
    partner_key: Secret | None = None
    verdict: bool = False
    traceparent: str | None = None

    @property
    def owner(self) -> str | None:
        """The name of the key that submitted the job (None: no key)."""
        return None if self.key is None else self.key.name

    @property
    def priority(self) -> int:
        """The job's priority in the sidecar's queue and the shared queue (higher first)."""
        return 0 if self.key is None else self.key.priority

    @property
    def id(self) -> str:
        """The job's id (the request's)."""
        assert self.request.id is not None
        return self.request.id
