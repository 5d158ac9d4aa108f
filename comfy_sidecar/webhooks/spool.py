"""The webhook spool: output files held by path for webhooks that carry them.

A webhook body that carries an output file (``webhook``'s per-file body, ``webhook_v2``'s
base64 ``images``) streams it from a hard link (a copy on another file system) in
``OUTPUT_DIR/.comfy-sidecar-webhooks-<PORT>/``, removed once the webhook is delivered or given
up: a waiting delivery holds a path, not an open file, and the job's own files are released (or
kept under JOBS_DIR) as usual. :meth:`Spool.clear` empties the folder at start-up (a killed
predecessor's links).
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from comfy_sidecar.storage.files import link_or_copy

__all__ = ["Spool"]


class Spool:
    """The spool folder ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def clear(self) -> None:
        """Remove what a killed predecessor left (at start-up; blocking: call off the loop)."""
        shutil.rmtree(self.path, ignore_errors=True)

    async def hold(self, file: Path) -> tuple[Path, Callable[[], None]]:
        """``file`` for a webhook body: its link in the spool, and the call that removes it
        (the body's ``on_close``). Raises ``OSError``."""
        link = self.path / uuid.uuid4().hex  # the body names the file; a long name can't fail

        def make() -> None:
            self.path.mkdir(exist_ok=True)
            link_or_copy(file, link)

        await asyncio.to_thread(make)
        return link, functools.partial(link.unlink, missing_ok=True)
