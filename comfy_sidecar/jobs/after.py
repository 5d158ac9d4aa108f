"""A job adapter's after-end action in queue mode (JOB_QUEUE_URL): the webhook it sends, in its
own format, once the job has ended, sent by whichever replica ends it.

In-process, an adapter (ai-dock's ``/generate``, the Modal jobs API) registers a callback with
:meth:`~comfy_sidecar.jobs.runner.JobService.when_ended` on the replica that took the request.
In queue mode another replica may run the job, a third may cancel it, so the adapter stores an
:class:`AfterEnd` with the job in Redis at submission (:meth:`SharedQueue.enqueue`'s
``after``); the replica whose :meth:`SharedQueue.finish` ended the job (the only one: SET NX)
then calls :class:`AfterEnds` with the final body, which builds the adapter's body from it and
queues it on that replica's webhook dispatcher (its retries and order). A replica that dies
between ending the job and delivering the webhook loses that delivery (as for ``/prompt``'s
own webhooks).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec

from comfy_sidecar.backoff import backoff_delay
from comfy_sidecar.jobs.backend import SharedQueue, unreachable

log = logging.getLogger("comfy_sidecar.jobs.after")

#: Reads of a job's after-end action tried while Redis does not answer (backing off from
#: 0.1 s to 2 s between them: about half a minute in all).
READ_TRIES = 20


class AfterEnd(msgspec.Struct, kw_only=True, frozen=True):
    """What to send once the job has ended: ``kind`` names the adapter's body format (a key
    of :class:`AfterEnds`' ``formats``: ``aidock``, ``modal_jobs``), ``url`` where it goes
    (http(s), checked at submission), ``extra_params`` fields the adapter merges into the
    body (ai-dock's ``webhook.extra_params``)."""

    kind: str
    url: str
    extra_params: dict[str, Any] = {}


Format = Callable[[dict[str, Any], AfterEnd], dict[str, Any]]
"""``format(view, after) -> body``: the webhook body of a job whose final ``GET /jobs/{id}``
body is ``view``."""

Send = Callable[[str, dict[str, Any], str], Awaitable[Any]]
"""``send(url, body, job_id)``: queue one webhook (the dispatcher's ``send_prompt``)."""


def encode(after: AfterEnd | None) -> bytes | None:
    """``after`` as stored with the job (JSON), or None."""
    return None if after is None else msgspec.json.encode(after)


class AfterEnds:
    """Runs the after-end actions of the jobs this replica ends (see the module docstring).
    ``formats`` maps each :attr:`AfterEnd.kind` to its body builder."""

    def __init__(self, jobs: SharedQueue, send: Send, formats: Mapping[str, Format]) -> None:
        self.jobs = jobs
        self.send = send
        self.formats = dict(formats)

    async def __call__(self, job_id: str, view: dict[str, Any]) -> None:
        """Job ``job_id`` has just been ended here with final body ``view``: send its
        adapter's webhook, if it has one. Never raises (a failure is logged)."""
        try:
            raw = await self._read(job_id)
            if raw is None:
                return
            after = msgspec.json.decode(raw, type=AfterEnd)
            build = self.formats.get(after.kind)
            if build is None:
                log.error("job %s: no webhook format %r on this replica", job_id, after.kind)
                return
            await self.send(after.url, build(view, after), job_id)
        except Exception:
            log.exception("job %s: the adapter's webhook could not be sent", job_id)

    async def _read(self, job_id: str) -> bytes | None:
        for attempt in range(1, READ_TRIES):
            try:
                return await self.jobs.after(job_id)
            except unreachable():
                await asyncio.sleep(backoff_delay(attempt, 0.1, 2.0))
        return await self.jobs.after(job_id)


async def nothing(job_id: str, view: dict[str, Any]) -> None:
    """The after-end hook where no adapter webhook can be stored."""
