"""The start-up manifest: schema, loading, and the installer (apt, pip, custom nodes, models).

Copies comfyui-api's manifest (its README "Model Manifest", behaviour B2/B28) minus its bugs:
every field is optional (comfyui-api requires ``models``); pip outside a virtual environment is
not given ``--system`` (pip rejects it); models go through the download cache keyed by URL
hash, so a second boot with the same ``CACHE_DIR`` downloads nothing (comfyui-api's W-B1);
``before_start`` downloads overlap (bounded); ``after_start`` runs once ComfyUI is up and its
failures are logged, never fatal (comfyui-api crashes on an unhandled rejection). Unknown keys
are refused, so a typo (``before-start``) is an error instead of a silently empty manifest.

Modules: :mod:`.schema` (the shape, loading ``MANIFEST``/``MANIFEST_JSON``, the checks),
:mod:`.commands` (running apt/pip/git/comfy, finding ComfyUI's Python), :mod:`.provision`
(:class:`Provisioner`). This package re-exports their public names.

Usage (what :class:`comfy_sidecar.runtime.lifecycle.Runtime` does)::

    provisioner = Provisioner.from_settings(settings)   # ManifestError: bad manifest
    await provisioner.before_start(storage, report)     # ManifestError: a step failed
    ...ComfyUI is up...
    spawn(provisioner.after_start(storage))             # never raises
"""

from __future__ import annotations

from .commands import COMMAND_TIMEOUT_S, TAIL_LINES, CommandFailed, PythonTarget, run_command
from .provision import MAX_PARALLEL_DOWNLOADS, Provisioner, ReportFn
from .schema import (
    CustomNode,
    Manifest,
    ManifestError,
    ModelEntry,
    Models,
    Package,
    Roots,
    check_manifest,
    is_git_url,
    load_manifest,
    parse_git_url,
    parse_manifest,
    repo_name,
)

__all__ = [
    "COMMAND_TIMEOUT_S",
    "MAX_PARALLEL_DOWNLOADS",
    "TAIL_LINES",
    "CommandFailed",
    "CustomNode",
    "Manifest",
    "ManifestError",
    "ModelEntry",
    "Models",
    "Package",
    "Provisioner",
    "PythonTarget",
    "ReportFn",
    "Roots",
    "check_manifest",
    "is_git_url",
    "load_manifest",
    "parse_git_url",
    "parse_manifest",
    "repo_name",
    "run_command",
]
