"""A running job's outputs, kept and published as ComfyUI writes them: one ``output`` event per
file when its node's ``executed`` frame arrives (ComfyUI sends it once the node's files are
written), not all of them when the job completes.

The one home of early outputs, for every API (``/jobs``, the adapters, the Comfy API v2): the
lifecycle gives each job it runs for the job APIs an :class:`OutputStream` when the job's
outputs stay as ComfyUI writes them (:func:`streams_outputs`: kept by the sidecar, not
converted, uploaded or sent to a webhook). For each output file, in the order ComfyUI reports
them, the stream

1. hard-links it (a copy across file systems) to ``JOBS_DIR/<id>/<n>-<name>`` beside the
   original in OUTPUT_DIR, which the pipeline still collects at the end, and computes its
   blake3 (never read into memory whole; in a thread unless the file is small);
2. asks the run's :class:`~comfy_sidecar.jobs.lifecycle.Attempt` to keep it
   (``Attempt.keep``): in-process the link is the kept copy; with JOB_QUEUE_URL the bytes
   are written to Redis first, so any replica serves the output once its event is seen;
3. appends it to the job's outputs (index ``n`` = its place in the list, its ``url``
   ``/jobs/<id>/outputs/<n>``) and publishes its ``output`` event.

At the end the lifecycle :meth:`~OutputStream.drain` s the stream and :meth:`~OutputStream.take`
s the streamed files out of the pipeline's result (their originals in OUTPUT_DIR are removed);
the outputs not streamed (a file the attempt would not keep: over JOB_INLINE_OUTPUT_MB) follow
them in the final list. So the final outputs and the ``output`` events always agree: each
output has one event and one index, first the streamed ones in the order ComfyUI wrote them.
A job that fails after some outputs were written keeps those (its body lists them).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from comfy_sidecar.assets.hashing import hash_file
from comfy_sidecar.jobs.model import OutputInfo
from comfy_sidecar.pipeline.deliver import upload_target
from comfy_sidecar.pipeline.outputs import (
    OutputError,
    OutputFile,
    collect_outputs,
    media_type_of,
    mime_type_of,
    remove_outputs,
)
from comfy_sidecar.schemas import PromptRequest
from comfy_sidecar.storage.files import SMALL_READ, link_or_copy

if TYPE_CHECKING:
    from comfy_sidecar.jobs.record import JobRecord
    from comfy_sidecar.jobs.store import JobStore
    from comfy_sidecar.pipeline.run import JobResult

log = logging.getLogger("comfy_sidecar.jobs")

__all__ = ["Keeper", "OutputStream", "kept_output", "streams_outputs"]


class Keeper(Protocol):
    """What the stream needs of a run's attempt (the lifecycle's ``Attempt.keep``)."""

    async def keep(self, index: int, path: Path) -> bool:
        """Make output ``index`` (``path``) readable wherever the job's outputs are read;
        False: not now."""
        ...


def streams_outputs(request: PromptRequest) -> bool:
    """Whether a job's outputs are final as ComfyUI writes them, so they may be published
    while it runs: no ``convert_output``, no upload target, no ``webhook``/``webhook_v2``
    (those take the files at the end)."""
    return (
        request.convert_output is None
        and upload_target(request) is None
        and not request.webhook
        and not request.webhook_v2
    )


def kept_output(source: Path, target: Path) -> tuple[int, str]:
    """Link (else copy) ``source`` to ``target`` and hash it: ``(size in bytes,
    "blake3:<hex>")``. Blocking: call it in a thread for anything but a small file. Raises
    OSError."""
    link_or_copy(source, target)
    return target.stat().st_size, hash_file(target)


class OutputStream:
    """One running job's early outputs (see the module docstring). ``record`` is the job's,
    ``store`` gives its JOBS_DIR folder, ``attempt`` keeps each file where every replica
    reads it, ``output_dir`` is ComfyUI's OUTPUT_DIR."""

    def __init__(
        self, record: JobRecord, store: JobStore, attempt: Keeper, output_dir: str
    ) -> None:
        self.record = record
        self.store = store
        self.attempt = attempt
        self.output_dir = output_dir
        #: OUTPUT_DIR files streamed so far -> their output index.
        self.taken: dict[Path, int] = {}
        #: Set once a file could not be kept: the rest wait for the end.
        self.stopped = False
        self._queue: list[OutputFile] = []
        self._worker: asyncio.Task[None] | None = None

    def executed(self, node_id: str, output: Any) -> None:
        """ComfyUI's ``executed`` frame of ``node_id`` (its ``output``: the files it wrote):
        keep and publish each file, one at a time, in order."""
        if self.stopped or not isinstance(output, dict):
            return
        try:
            files = collect_outputs({node_id: output}, self.output_dir)
        except OutputError:
            return  # the collection at the end says what is wrong
        self._queue.extend(files)
        if files and (self._worker is None or self._worker.done()):
            self._worker = asyncio.ensure_future(self._work())

    async def _work(self) -> None:
        while self._queue:
            item = self._queue.pop(0)
            try:
                await self._keep(item)
            except Exception:
                log.exception("job %s: output %s could not be kept early", self.record.id, item)
                self.stopped = True

    async def _keep(self, item: OutputFile) -> None:
        record = self.record
        if self.stopped or record.status.terminal or item.path in self.taken:
            return
        index = len(record.outputs)
        target = self.store.job_dir(record.id) / f"{index}-{item.filename}"
        try:
            if item.size <= SMALL_READ:  # a link and a hash of a small file: microseconds
                size, digest = kept_output(item.path, target)
            else:
                size, digest = await asyncio.to_thread(kept_output, item.path, target)
        except OSError as exc:
            log.warning("job %s: output %s kept at the end (%s)", record.id, item.filename, exc)
            self.stopped = True
            return
        if record.status.terminal or not await self.attempt.keep(index, target):
            target.unlink(missing_ok=True)
            self.stopped = True
            return
        mime = mime_type_of(item.filename)
        info = OutputInfo(
            node_id=item.node_id,
            filename=item.filename,
            media_type=media_type_of(mime),
            mime_type=mime,
            size_bytes=size,
            url=f"/jobs/{record.id}/outputs/{index}",
            hash=digest,
        )
        record.outputs.append(info)
        record.files.append(target)
        self.taken[item.path] = index
        record.publish("output", info)

    async def drain(self) -> None:
        """Wait until every file reported so far is kept and published (or given up)."""
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    def take(self, result: JobResult) -> None:
        """Take the streamed files out of ``result`` (its files are the rest), removing their
        originals from OUTPUT_DIR (the kept links hold the bytes)."""
        streamed = [item for item in result.files if item.path in self.taken]
        if not streamed:
            return
        result.files[:] = [item for item in result.files if item.path not in self.taken]
        remove_outputs(streamed, self.output_dir)
