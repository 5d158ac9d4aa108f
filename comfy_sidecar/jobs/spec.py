"""What a front door hands the job layer: a :class:`JobSpec` (the ``/prompt`` request with its
id, the API it came through, what makes a resubmission "the same body", and the adapter's
after-end action). Both backends keep it as it is (the Redis backend as JSON in the job's
hash), so the replica that ends a job knows what to send.
"""

from __future__ import annotations

from typing import Any

import msgspec

from comfy_sidecar.schemas import PromptRequest

__all__ = ["AfterEnd", "JobSpec"]


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
    adapter's webhook, sent by whichever replica ends the job) and ``traceparent`` (the W3C
    trace context the job continues where it runs: the submitting replica's span, or the
    submitter's request's own header with tracing off; kept with the job in Redis)."""

    request: PromptRequest
    endpoint: str
    fingerprint: bytes = b""
    after: AfterEnd | None = None
    traceparent: str | None = None

    @property
    def id(self) -> str:
        """The job's id (the request's)."""
        assert self.request.id is not None
        return self.request.id
