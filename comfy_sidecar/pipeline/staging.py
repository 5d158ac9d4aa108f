"""Files that come with a job request (a job adapter's media items, uploaded inputs), staged
where the replica that runs the job finds them, and the value a workflow input gets instead.

Chosen once at start-up with the job backend:

- :class:`FolderStaging` (in-process): the files are written (or downloaded through the
  cache) into ``INPUT_DIR/.comfy-sidecar/<job id>-media/`` at once; the value is the file's
  name relative to INPUT_DIR, which any input may take. The folder is removed with the job's
  other inputs when the job ends (:meth:`Pipeline.prepare` knows it by the job id), or by
  :meth:`StagedFiles.discard` when the request is refused.
- :class:`InlineStaging` (``JOB_QUEUE_URL``): nothing is written on the replica that takes the
  request; the value is a ``data:`` URL or the file's URL, which the claiming replica's
  preprocessing writes or downloads as for ``/prompt``, so only a media input
  (:func:`~comfy_sidecar.pipeline.preprocess.media_fields`) may take it.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from comfy_sidecar.errors import InputError
from comfy_sidecar.pipeline.outputs import mime_type_of
from comfy_sidecar.pipeline.preprocess import media_dir, media_fields, write_input

if TYPE_CHECKING:
    from comfy_sidecar.config import Settings
    from comfy_sidecar.storage import Storage

__all__ = ["FolderStaging", "InlineStaging", "StagedFiles", "Staging"]


class StagedFiles(Protocol):
    """One job's staged request files. Each method raises :class:`InputError` naming
    ``location`` (a full INPUT_DIR: :class:`~comfy_sidecar.errors.UpstreamFailed`, 507)."""

    async def file(self, name: str, data: bytes, location: str) -> str:
        """Stage ``data`` as the file ``name`` (no folders); returns the input value."""
        ...

    async def url(self, url: str, location: str, max_bytes: int) -> str:
        """Stage the file at ``url`` (checked by the SSRF guard; at most ``max_bytes``);
        returns the input value."""
        ...

    def check_feeds(
        self, workflow: dict[str, Any], node: str, field: str, location: str, what: str
    ) -> None:
        """Refuse (at ``location``) a staged value (``what``: "a media item", ...) in
        ``workflow[node].inputs[field]`` when such values cannot feed that input."""
        ...

    def discard(self) -> None:
        """The request was refused: remove what was staged (idempotent)."""
        ...


@runtime_checkable
class Staging(Protocol):
    """Where request files go, for every job of this process."""

    def for_job(self, job_id: str) -> StagedFiles:
        """Job ``job_id``'s staged files."""
        ...


class _Folder:
    """One job's folder (see :class:`FolderStaging`)."""

    def __init__(self, settings: Settings, storage: Storage, job_id: str) -> None:
        self.settings = settings
        self.input_dir = Path(settings.input_dir)
        self.storage = storage
        self.name = media_dir(job_id)
        self.path = self.input_dir / self.name
        self._counter = 0

    async def file(self, name: str, data: bytes, location: str) -> str:
        self.path.mkdir(parents=True, exist_ok=True)
        write_input(self.path / name, data, location)
        return f"{self.name}/{name}"

    async def url(self, url: str, location: str, max_bytes: int) -> str:
        from comfy_sidecar.pipeline.run import JobStaging

        self._counter += 1
        self.path.mkdir(parents=True, exist_ok=True)
        with self.storage.lease() as lease:  # the file is linked or copied: no longer needed
            staging = JobStaging(self.storage, None, lease, self.settings)
            staged = await staging.input(url, f"{self.name}/.download-{self._counter}", location)
        if (self.input_dir / staged).stat().st_size > max_bytes:
            raise InputError(f"larger than {max_bytes} bytes", location)
        return staged

    def check_feeds(
        self, workflow: dict[str, Any], node: str, field: str, location: str, what: str
    ) -> None:
        """Any input may take a file name: nothing to refuse."""

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class FolderStaging:
    """In-process staging: files written into INPUT_DIR at once (see the module docstring)."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage

    def for_job(self, job_id: str) -> StagedFiles:
        """Job ``job_id``'s folder."""
        return _Folder(self.settings, self.storage, job_id)


class _Inline:
    """One job's inline values (see :class:`InlineStaging`)."""

    async def file(self, name: str, data: bytes, location: str) -> str:
        return f"data:{mime_type_of(name)};base64,{base64.b64encode(data).decode('ascii')}"

    async def url(self, url: str, location: str, max_bytes: int) -> str:
        return url

    def check_feeds(
        self, workflow: dict[str, Any], node: str, field: str, location: str, what: str
    ) -> None:
        entry = workflow[node]
        if field not in media_fields(str(entry.get("class_type", "")), entry["inputs"]):
            raise InputError(
                f"with JOB_QUEUE_URL {what} can only feed a media input (image; video or file "
                "of a video loader; audio of an audio loader)",
                location,
            )

    def discard(self) -> None:
        """Nothing was written."""


class InlineStaging:
    """Queue-mode staging: nothing written here (see the module docstring)."""

    def for_job(self, job_id: str) -> StagedFiles:
        """Inline values for job ``job_id``."""
        return _Inline()
