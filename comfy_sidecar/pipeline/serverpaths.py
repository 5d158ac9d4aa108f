"""The sidecar's server directories, scrubbed from text a caller or a webhook receiver sees.

ComfyUI's execution errors name files by absolute path: a LoadImage of a file that is not an
image answers ``cannot identify image file '/opt/ComfyUI/input/broken.png'`` and a traceback of
``/opt/ComfyUI/execution.py`` frames, and its log lines do the same. Before such text goes into
an error body (and from there into job records, the job APIs and webhooks), every absolute path
under one of the server directories is rewritten relative to it, behind the name of the setting
that holds it::

    /opt/ComfyUI/input/broken.png  ->  <INPUT_DIR>/broken.png
    /opt/ComfyUI/execution.py      ->  <COMFY_HOME>/execution.py

The directories are ``COMFY_HOME``, ``INPUT_DIR``, ``OUTPUT_DIR``, ``TEMP_DIR``,
``MODEL_DIR``, ``JOBS_DIR``, ``CACHE_DIR`` and ``WORKFLOW_DIR``, each as configured (made
absolute) and as its real path (a symlinked directory is found under both names); the longest
match wins, so a file in ``INPUT_DIR`` under ``COMFY_HOME`` is named by ``INPUT_DIR``. The log
keeps the full paths: only the copies that leave the sidecar are scrubbed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comfy_sidecar.config import Settings

__all__ = ["ServerPaths"]

#: (setting, Settings field), most specific first: a directory two settings share is named by
#: the first one.
DIRECTORIES = (
    ("INPUT_DIR", "input_dir"),
    ("OUTPUT_DIR", "output_dir"),
    ("TEMP_DIR", "temp_dir"),
    ("MODEL_DIR", "model_dir"),
    ("JOBS_DIR", "jobs_dir"),
    ("CACHE_DIR", "cache_dir"),
    ("WORKFLOW_DIR", "workflow_dir"),
    ("COMFY_HOME", "comfy_home"),
)


class ServerPaths:
    """Rewrites absolute paths under server directories as ``<SETTING>/rest``.

    ``directories`` maps a setting name (``INPUT_DIR``) to its directory, most specific first.
    A path matches a directory when the directory is followed by ``/`` or by a character that
    cannot continue a file name (``/opt/ComfyUI-old`` is not under ``/opt/ComfyUI``). ``/`` itself
    is never a root: it would swallow every path."""

    def __init__(self, directories: Mapping[str, str]) -> None:
        roots: dict[str, str] = {}
        for label, directory in directories.items():
            if not directory:
                continue
            for form in (os.path.abspath(directory), os.path.realpath(directory)):
                root = form.rstrip("/")
                if root:
                    roots.setdefault(root, label)
        self._labels = roots
        alternatives = "|".join(re.escape(r) for r in sorted(roots, key=len, reverse=True))
        self._pattern = re.compile(f"(?:{alternatives})(?![\\w.-])") if roots else None

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerPaths:
        """The sidecar's server directories (:data:`DIRECTORIES`) from ``settings``."""
        return cls({label: getattr(settings, field) for label, field in DIRECTORIES})

    def scrub(self, value: Any) -> Any:
        """``value`` with its server paths rewritten: a string, or the strings inside lists,
        tuples (made lists) and dicts (keys and values), at any depth; other values as they
        are. Never raises; the input is not modified."""
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        if isinstance(value, dict):
            return {self.scrub(k): self.scrub(v) for k, v in value.items()}
        return value

    def scrub_text(self, text: str) -> str:
        """``text`` with each absolute path under a server directory rewritten."""
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: f"<{self._labels[m.group(0)]}>", text)
