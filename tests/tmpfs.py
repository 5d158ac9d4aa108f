"""One way to get a real full disk in tests: a small tmpfs, mounted and unmounted with
``mount``/``umount`` (root or CAP_SYS_ADMIN). Used by the ``small_tmpfs`` fixture
(tests/conftest.py), tests/core/test_disk.py and the chaos suite's disk-full scenario."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class TmpfsUnavailable(Exception):
    """Mounting a tmpfs is not allowed here; the message says why (for a skip)."""


def mount_tmpfs(where: Path, size_bytes: int) -> Path:
    """Mount a tmpfs of ``size_bytes`` bytes at ``where`` (created); returns ``where``.
    Raises :class:`TmpfsUnavailable` when not root or when ``mount`` is refused."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        raise TmpfsUnavailable("mounting a tmpfs needs root (mount -t tmpfs)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise TmpfsUnavailable(
            f"mount -t tmpfs is not allowed here: {done.stderr.strip() or done.returncode}"
        )
    return where


def unmount(where: Path) -> None:
    """Unmount ``where``; lazily when it is still busy (a process may hold a file there)."""
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
