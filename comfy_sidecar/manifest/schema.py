"""The manifest's schema, its loading from ``MANIFEST``/``MANIFEST_JSON``, and its checks.

Shape (YAML or JSON)::

    apt: [str | {name: str, optional: bool}]
    pip: [str | {name: str, optional: bool}]
    custom_nodes: [str | {url: str, optional: bool} | {name: str, optional: bool}]
    models:
      before_start: [{url, local_path, optional?: bool, auth?: DownloadAuth}]
      after_start:  [{url, local_path, optional?: bool, auth?: DownloadAuth}]

Every field is optional (comfyui-api requires ``models``). Unknown keys are refused, so a typo
(``before-start``) is an error instead of a silently empty manifest.
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from comfy_sidecar.net.urls import is_url
from comfy_sidecar.schemas import DownloadAuth
from comfy_sidecar.schemas.locations import msgspec_location

if TYPE_CHECKING:
    from comfy_sidecar.config import Settings


class ManifestError(Exception):
    """The manifest is invalid or a required step failed. ``str(err)`` is one line starting
    with the source (``MANIFEST:`` or ``MANIFEST_JSON:``)."""


# --- schema ---------------------------------------------------------------------------------


class Package(msgspec.Struct, forbid_unknown_fields=True):
    """An apt or pip entry in its long form (the short form is the bare string)."""

    name: Annotated[str, Meta(description="apt package, or pip requirement (`pkg==1.2`, path).")]
    optional: Annotated[
        bool, Meta(description="When true a failed install is logged and start-up goes on.")
    ] = False


class CustomNode(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A custom node in its long form: exactly one of ``url`` (git) or ``name`` (registry)."""

    url: Annotated[
        str | None, Meta(description="Git URL; pin with `@ref`, `/tree/<ref>`, `/commit/<sha>`...")
    ] = None
    name: Annotated[str | None, Meta(description="Comfy registry name (`comfy node install`).")] = (
        None
    )
    optional: Annotated[bool, Meta(description="When true a failure is logged only.")] = False


class ModelEntry(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One file to download (through the cache) and link at ``local_path``."""

    url: Annotated[str, Meta(description="http(s)://, s3:// or Hugging Face/Azure URL.")]
    local_path: Annotated[
        str,
        Meta(
            description="Where the file appears: relative to COMFY_HOME, or absolute under "
            "COMFY_HOME, MODEL_DIR or INPUT_DIR."
        ),
    ]
    optional: Annotated[bool, Meta(description="When true a failed download is logged only.")] = (
        False
    )
    auth: DownloadAuth | None = None


class Models(msgspec.Struct, forbid_unknown_fields=True):
    """Model downloads: before ComfyUI starts, and in the background once it is up."""

    before_start: list[ModelEntry] = []
    after_start: list[ModelEntry] = []


class Manifest(msgspec.Struct, forbid_unknown_fields=True):
    """A whole manifest; every field optional (an empty document installs nothing)."""

    apt: list[str | Package] = []
    pip: list[str | Package] = []
    custom_nodes: list[str | CustomNode] = []
    models: Models = msgspec.field(default_factory=Models)


# --- git URLs (comfyui-api's parseGitUrl, B28: first match wins) ----------------------------

_GIT_PATTERNS = [
    re.compile(r"^(.+?)@([^@/]+)$"),
    re.compile(r"^(.+?)/-/tree/([^/]+)/?$"),
    re.compile(r"^(.+?)/-/commit/([^/]+)/?$"),
    re.compile(r"^(.+?)/tree/([^/]+)/?$"),
    re.compile(r"^(.+?)/commit/([^/]+)/?$"),
    re.compile(r"^(.+?)/releases/tag/([^/]+)/?$"),
    re.compile(r"^(.+?)/src/([^/]+)(?:/.*)?$"),
    re.compile(r"^(.+?)/commits/([^/]+)/?$"),
]


def parse_git_url(url: str) -> tuple[str, str | None]:
    """``(clone URL, ref or None)`` for a custom-node URL, comfyui-api's syntaxes:
    ``repo@ref``, GitLab ``/-/tree/<ref>`` and ``/-/commit/<sha>``, GitHub ``/tree/<ref>``,
    ``/commit/<sha>``, ``/releases/tag/<tag>``, Bitbucket ``/src/<ref>[/path]`` and
    ``/commits/<sha>``. Refs cannot contain ``/`` (as in comfyui-api)."""
    for pattern in _GIT_PATTERNS:
        match = pattern.match(url)
        if match:
            return match.group(1), match.group(2)
    return url, None


def repo_name(clone_url: str) -> str:
    """The directory a clone goes to: last path segment without ``.git``."""
    path = urllib.parse.urlsplit(clone_url).path if "://" in clone_url else clone_url
    name = path.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return name[:-4] if name.endswith(".git") else name


def is_git_url(value: str) -> bool:
    """True for ``scheme://...`` and scp-like ``user@host:path`` values (custom-node URLs)."""
    return "://" in value or re.match(r"^[\w.-]+@[\w.-]+:", value) is not None


# --- loading and validation -----------------------------------------------------------------


@dataclass(frozen=True)
class Roots:
    """Directories a model ``local_path`` may land in (absolute, normalised)."""

    comfy_home: str
    allowed: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Roots:
        home = os.path.abspath(settings.comfy_home)
        dirs = (home, os.path.abspath(settings.model_dir), os.path.abspath(settings.input_dir))
        return cls(home, tuple(dict.fromkeys(dirs)))

    def resolve(self, local_path: str) -> Path:
        """``local_path`` made absolute (relative to COMFY_HOME); raises ValueError when it is
        empty, a directory name, or outside every allowed root."""
        if not local_path or "\x00" in local_path or local_path.endswith("/"):
            raise ValueError("must be a file path")
        joined = os.path.normpath(os.path.join(self.comfy_home, local_path))
        if not any(joined.startswith(root.rstrip("/") + "/") for root in self.allowed):
            raise ValueError(
                f"{joined} is outside COMFY_HOME, MODEL_DIR and INPUT_DIR "
                f"({', '.join(self.allowed)})"
            )
        return Path(joined)


def parse_manifest(raw: bytes | str, source: str, *, yaml: bool) -> Manifest:
    """Decode and type-check a manifest document. ``source`` (``MANIFEST`` or
    ``MANIFEST_JSON``) prefixes every error. Raises :class:`ManifestError`."""
    try:
        if yaml:
            import yaml as pyyaml

            document: Any = pyyaml.safe_load(raw)
        else:
            document = msgspec.json.decode(raw)
    except Exception as exc:
        kind = "YAML" if yaml else "JSON"
        first = " ".join(str(exc).split())
        raise ManifestError(f"{source}: not valid {kind}: {first}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ManifestError(f"{source}: must be a mapping (got {type(document).__name__})")
    try:
        return msgspec.convert(document, Manifest)
    except msgspec.ValidationError as exc:
        what, where = msgspec_location(exc, top_level="(top level)")
        raise ManifestError(f"{source}: {where}: {what}") from None


class _Invalid(Exception):
    """One failed check: the field (``custom_nodes[0].url``) and what is wrong with it."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what


def check_manifest(
    manifest: Manifest, source: str, roots: Roots, which: Callable[[str], str | None]
) -> None:
    """The checks beyond types: URLs, local paths inside the allowed roots, custom-node
    entries well formed, the ``comfy`` CLI present for registry names. Raises
    :class:`ManifestError` naming the field (``models.before_start[2].url: not a URL``)."""
    try:
        _check_packages(manifest)
        for i, node in enumerate(manifest.custom_nodes):
            _check_custom_node(f"custom_nodes[{i}]", node, which)
        _check_models(manifest.models, roots)
    except _Invalid as exc:
        raise ManifestError(f"{source}: {exc}") from None


_APT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+:=~_-]*")
_REGISTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")


def _check_packages(manifest: Manifest) -> None:
    """apt and pip entries are not blank; apt names are Debian package names."""
    for key in ("apt", "pip"):
        for i, item in enumerate(getattr(manifest, key)):
            name = item if isinstance(item, str) else item.name
            if not name.strip():
                raise _Invalid(f"{key}[{i}]", "empty")
            if key == "apt" and not _APT_NAME.fullmatch(name):
                raise _Invalid(f"{key}[{i}]", f"not an apt package name: {name!r}")


def _check_custom_node(
    where: str, node: str | CustomNode, which: Callable[[str], str | None]
) -> None:
    """A custom node is a git URL with a usable repository name, or a registry name."""
    where, value = _custom_node_value(where, node)
    if not value.strip():
        raise _Invalid(where, "empty")
    if is_git_url(value):
        _check_git_node(where, value)
    else:
        _check_registry_node(where, value, which)


def _custom_node_value(where: str, node: str | CustomNode) -> tuple[str, str]:
    """``(field, value)`` of a custom-node entry: the string, or exactly one of url/name."""
    if isinstance(node, str):
        return where, node
    if (node.url is None) == (node.name is None):
        raise _Invalid(where, "give exactly one of url or name")
    if node.url is not None:
        if not is_git_url(node.url):
            raise _Invalid(f"{where}.url", "not a git URL")
        return f"{where}.url", node.url
    assert node.name is not None
    return f"{where}.name", node.name


def _check_git_node(where: str, value: str) -> None:
    base, ref = parse_git_url(value)
    name = repo_name(base)
    if not name or name in (".", "..") or "/" in name:
        raise _Invalid(where, f"cannot tell the repository name of {value!r}")
    if ref is not None and ref.startswith("-"):
        raise _Invalid(where, f"bad ref {ref!r}")


def _check_registry_node(where: str, value: str, which: Callable[[str], str | None]) -> None:
    if not _REGISTRY_NAME.fullmatch(value):
        raise _Invalid(where, f"not a registry name or git URL: {value!r}")
    if which("comfy") is None:
        raise _Invalid(
            where,
            f"registry node {value!r} needs the comfy CLI (comfy-cli) on PATH; "
            "install it in the image or give the node's git URL",
        )


def _check_models(models: Models, roots: Roots) -> None:
    """Every model has a URL and its own ``local_path`` inside the allowed roots."""
    seen: dict[str, str] = {}
    for stage in ("before_start", "after_start"):
        for i, entry in enumerate(getattr(models, stage)):
            where = f"models.{stage}[{i}]"
            dest = _check_model(where, entry, roots)
            if dest in seen:
                raise _Invalid(f"{where}.local_path", f"{dest} is also {seen[dest]}.local_path")
            seen[dest] = where


def _check_model(where: str, entry: ModelEntry, roots: Roots) -> str:
    """The absolute destination of one model entry."""
    if not is_url(entry.url):
        raise _Invalid(f"{where}.url", "not a URL (http://, https:// or s3://)")
    try:
        return str(roots.resolve(entry.local_path))
    except ValueError as exc:
        raise _Invalid(f"{where}.local_path", str(exc)) from None


def load_manifest(
    settings: Settings, which: Callable[[str], str | None] = shutil.which
) -> tuple[Manifest, str] | None:
    """The manifest named by ``MANIFEST_JSON`` (wins) or ``MANIFEST``, validated; returns
    ``(manifest, source)`` or None when neither is set. Raises :class:`ManifestError`."""
    if settings.manifest_json:
        source = "MANIFEST_JSON"
        manifest = parse_manifest(settings.manifest_json, source, yaml=False)
    elif settings.manifest:
        source = "MANIFEST"
        try:
            with open(settings.manifest, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            raise ManifestError(
                f"MANIFEST: cannot read {settings.manifest!r}: {exc.strerror}"
            ) from None
        yaml = settings.manifest.lower().endswith((".yml", ".yaml"))
        manifest = parse_manifest(raw, source, yaml=yaml)
    else:
        return None
    check_manifest(manifest, source, Roots.from_settings(settings), which)
    return manifest, source
