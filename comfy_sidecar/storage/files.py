"""Moving files without reading them into memory: the one home of link-or-copy.

Every place that puts a file somewhere else (the cache's entries and links, a job's inputs in
INPUT_DIR, retained outputs under JOBS_DIR, webhook spool links) goes through here. A hard link
is tried first (no bytes copied; ComfyUI >= 0.28 refuses symlinks that leave its input
directory, so job inputs are never symlinks); across file systems the file is streamed by
:func:`shutil.copyfile` (``sendfile`` on Linux), never read whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from comfy_sidecar.storage.errors import is_disk_full

__all__ = ["CHUNK", "SMALL_READ", "link_or_copy", "move", "read_slice", "temp_name"]

#: Bytes read per chunk when a file is streamed.
CHUNK = 256 * 1024


def temp_name(dest: Path) -> Path:
    """A hidden name beside ``dest`` for writing it atomically (``.<name>.<pid>-<ns>.tmp``);
    31 bytes longer than ``dest``'s name at most."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{time.monotonic_ns()}.tmp")


def link_or_copy(src: Path, dest: Path, *, atomic: bool = False, symlink: bool = False) -> None:
    """Put ``src``'s bytes at ``dest``: a hard link, else (``symlink``) a symbolic link, else
    a streamed copy. With ``atomic`` the link or copy is made under :func:`temp_name` and
    renamed over ``dest`` (replacing what is there; a failed copy leaves nothing behind);
    without it ``dest`` must not exist. Raises ``OSError`` (a full disk as
    ``ENOSPC``/``EDQUOT``, never swallowed)."""
    target = temp_name(dest) if atomic else dest
    try:
        try:
            os.link(src, target)
        except OSError as exc:
            if is_disk_full(exc):
                raise
            try:
                if not symlink:
                    raise
                os.symlink(src, target)
            except OSError:
                shutil.copyfile(src, target)
        if atomic:
            os.replace(target, dest)
    except BaseException:
        if atomic or target.exists():
            with contextlib.suppress(OSError):
                os.unlink(target)
        raise


def move(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``: a rename, else (another file system) a streamed copy made
    atomically then the source removed. Raises ``OSError``."""
    try:
        os.replace(src, dest)
    except OSError:
        link_or_copy(src, dest, atomic=True)
        src.unlink(missing_ok=True)


#: Largest read done on the event loop (a slice this small comes from the page cache in
#: microseconds; larger ones are read in a worker thread, a chunk at a time).
SMALL_READ = 64 * 1024


async def read_slice(path: Path, first: int, last: int) -> AsyncIterator[bytes]:
    """Bytes ``first`` to ``last`` (inclusive) of ``path``, in chunks of at most 256 KiB; a
    slice of at most :data:`SMALL_READ` bytes in one read on the event loop (no thread hop per
    open, seek and read)."""
    remaining = last - first + 1
    if remaining <= SMALL_READ:
        with path.open("rb") as small:
            small.seek(first)
            chunk = small.read(remaining)
        if chunk:
            yield chunk
        return
    async with await anyio.open_file(path, "rb") as handle:
        await handle.seek(first)
        while remaining > 0:
            chunk = await handle.read(min(CHUNK, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk
