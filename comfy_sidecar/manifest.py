"""The start-up manifest: schema, loading, and the installer (apt, pip, custom nodes, models).

Copies comfyui-api's manifest (its README "Model Manifest", behaviour B2/B28) minus its bugs:
every field is optional (comfyui-api requires ``models``); pip outside a virtual environment is
not given ``--system`` (pip rejects it); models go through the download cache keyed by URL
hash, so a second boot with the same ``CACHE_DIR`` downloads nothing (comfyui-api's W-B1);
``before_start`` downloads overlap (bounded); ``after_start`` runs once ComfyUI is up and its
failures are logged, never fatal (comfyui-api crashes on an unhandled rejection). Unknown keys
are refused, so a typo (``before-start``) is an error instead of a silently empty manifest.

Shape (YAML or JSON)::

    apt: [str | {name: str, optional: bool}]
    pip: [str | {name: str, optional: bool}]
    custom_nodes: [str | {url: str, optional: bool} | {name: str, optional: bool}]
    models:
      before_start: [{url, local_path, optional?: bool, auth?: DownloadAuth}]
      after_start:  [{url, local_path, optional?: bool, auth?: DownloadAuth}]

Usage (what :class:`comfy_sidecar.service.Sidecar` does)::

    provisioner = Provisioner.from_settings(settings)   # ManifestError: bad manifest
    await provisioner.before_start(storage, report)     # ManifestError: a step failed
    ...ComfyUI is up...
    spawn(provisioner.after_start(storage))             # never raises
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from comfy_sidecar.locations import msgspec_location
from comfy_sidecar.schemas import DownloadAuth

if TYPE_CHECKING:
    from comfy_sidecar.config import Settings
    from comfy_sidecar.storage import Storage

log = logging.getLogger("comfy_sidecar.manifest")

#: Concurrent ``before_start``/``after_start`` downloads.
MAX_PARALLEL_DOWNLOADS = 4
#: Longest any one install command may run, in seconds, before it is killed.
COMMAND_TIMEOUT_S = 3600.0
#: Lines of a failed command's output quoted in the start-up error.
TAIL_LINES = 12

ReportFn = Callable[[str], None]
"""``report(detail)``: the provisioning progress line shown by ``/health`` and ``/ready``."""


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


def check_manifest(
    manifest: Manifest, source: str, roots: Roots, which: Callable[[str], str | None]
) -> None:
    """The checks beyond types: URLs, local paths inside the allowed roots, custom-node
    entries well formed, the ``comfy`` CLI present for registry names. Raises
    :class:`ManifestError` naming the field (``models.before_start[2].url: not a URL``)."""
    from comfy_sidecar.storage import Storage

    def fail(where: str, what: str) -> None:
        raise ManifestError(f"{source}: {where}: {what}")

    for key in ("apt", "pip"):
        for i, item in enumerate(getattr(manifest, key)):
            name = item if isinstance(item, str) else item.name
            if not name.strip():
                fail(f"{key}[{i}]", "empty")
            if key == "apt" and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+:=~_-]*", name):
                fail(f"{key}[{i}]", f"not an apt package name: {name!r}")
    for i, node in enumerate(manifest.custom_nodes):
        where = f"custom_nodes[{i}]"
        if isinstance(node, CustomNode):
            if (node.url is None) == (node.name is None):
                fail(where, "give exactly one of url or name")
            value = node.url if node.url is not None else node.name
            assert value is not None
            if node.url is not None and not is_git_url(node.url):
                fail(f"{where}.url", "not a git URL")
            where = f"{where}.url" if node.url is not None else f"{where}.name"
        else:
            value = node
        if not value.strip():
            fail(where, "empty")
        if is_git_url(value):
            base, ref = parse_git_url(value)
            name = repo_name(base)
            if not name or name in (".", "..") or "/" in name:
                fail(where, f"cannot tell the repository name of {value!r}")
            if ref is not None and ref.startswith("-"):
                fail(where, f"bad ref {ref!r}")
        else:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]*", value):
                fail(where, f"not a registry name or git URL: {value!r}")
            if which("comfy") is None:
                fail(
                    where,
                    f"registry node {value!r} needs the comfy CLI (comfy-cli) on PATH; "
                    "install it in the image or give the node's git URL",
                )
    seen: dict[str, str] = {}
    for stage in ("before_start", "after_start"):
        for i, entry in enumerate(getattr(manifest.models, stage)):
            where = f"models.{stage}[{i}]"
            if not Storage.is_url(entry.url):
                fail(f"{where}.url", "not a URL (http://, https:// or s3://)")
            try:
                dest = str(roots.resolve(entry.local_path))
            except ValueError as exc:
                fail(f"{where}.local_path", str(exc))
            if dest in seen:
                fail(f"{where}.local_path", f"{dest} is also {seen[dest]}.local_path")
            seen[dest] = where


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


# --- commands -------------------------------------------------------------------------------


class CommandFailed(Exception):
    """A command exited non-zero (or could not start, or timed out)."""


async def run_command(
    argv: Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = COMMAND_TIMEOUT_S,
) -> None:
    """Run ``argv`` (no shell) as an asyncio subprocess, streaming its merged stdout/stderr to
    the log line by line. Raises :class:`CommandFailed` with the command, its exit code and
    the last :data:`TAIL_LINES` lines of output (one line, `` | ``-joined)."""
    shown = " ".join(argv)
    log.info("running: %s", shown)
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise CommandFailed(f"`{shown}` could not start: {exc.strerror or exc}") from None
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    assert proc.stdout is not None

    async def pump() -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                tail.append(text)
                log.info("  %s: %s", argv[0].rsplit("/", 1)[-1], text)

    try:
        await asyncio.wait_for(pump(), timeout_s)
        code = await asyncio.wait_for(proc.wait(), 30)
    except (TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise CommandFailed(f"`{shown}` timed out after {timeout_s:g} s") from None
    if code != 0:
        output = " | ".join(tail) or "(no output)"
        raise CommandFailed(f"`{shown}` exited with code {code}: {output}")
    log.info("finished in %.1f s: %s", time.monotonic() - started, shown)


@dataclass(frozen=True)
class PythonTarget:
    """The Python environment pip installs go to: ComfyUI's, not the sidecar's.

    ``VIRTUAL_ENV`` when set, else ``COMFY_HOME/.venv`` or ``COMFY_HOME/venv`` when they hold
    a Python, else ``python3``/``python`` on PATH (the system environment)."""

    python: str
    venv: bool

    @classmethod
    def find(
        cls, env: Mapping[str, str], comfy_home: str, which: Callable[[str], str | None]
    ) -> PythonTarget:
        candidates = []
        if env.get("VIRTUAL_ENV"):
            candidates.append(Path(env["VIRTUAL_ENV"]))
        candidates += [Path(comfy_home) / ".venv", Path(comfy_home) / "venv"]
        for venv in candidates:
            for exe in ("python", "python3"):
                if (venv / "bin" / exe).is_file():
                    return cls(str(venv / "bin" / exe), True)
        return cls(which("python3") or which("python") or "python3", False)

    def install_argv(self, args: Sequence[str], uv: str | None) -> list[str]:
        """``uv pip install`` (``--system`` outside a venv) when uv exists, else
        ``python -m pip install`` (never ``--system``: pip has no such flag)."""
        if uv:
            scope = ["--python", self.python] + ([] if self.venv else ["--system"])
            return [uv, "pip", "install", *scope, *args]
        return [
            self.python,
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            *args,
        ]

    def install_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """Outside a venv, allow installing into an "externally managed" (PEP 668) system
        Python, as a container image does; older pips ignore the variable."""
        out = dict(env)
        if not self.venv:
            out.setdefault("PIP_BREAK_SYSTEM_PACKAGES", "1")
            out.setdefault("UV_BREAK_SYSTEM_PACKAGES", "1")
        return out


# --- the installer --------------------------------------------------------------------------


class Provisioner:
    """Installs one manifest. Build with :meth:`from_settings` (validates, touches nothing)."""

    def __init__(
        self,
        settings: Settings,
        manifest: Manifest | None,
        source: str,
        *,
        env: Mapping[str, str] | None = None,
        which: Callable[[str], str | None] = shutil.which,
    ) -> None:
        self.settings = settings
        self.manifest = manifest
        self.source = source
        self.env = dict(os.environ if env is None else env)
        self.which = which
        self.roots = Roots.from_settings(settings)
        self._report: ReportFn = lambda detail: None
        self._progress: dict[str, str] = {}

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        env: Mapping[str, str] | None = None,
        which: Callable[[str], str | None] = shutil.which,
    ) -> Provisioner:
        """Load and validate ``MANIFEST_JSON``/``MANIFEST``. Raises :class:`ManifestError`."""
        loaded = load_manifest(settings, which)
        manifest, source = loaded if loaded else (None, "MANIFEST")
        return cls(settings, manifest, source, env=env, which=which)

    @property
    def empty(self) -> bool:
        m = self.manifest
        return m is None or not (
            m.apt or m.pip or m.custom_nodes or m.models.before_start or m.models.after_start
        )

    def _fail(self, step: str, message: str) -> ManifestError:
        return ManifestError(f"{self.source}: {step}: {message}")

    # --- before ComfyUI starts ----------------------------------------------------------

    async def before_start(self, storage: Storage, report: ReportFn | None = None) -> float:
        """apt, pip, custom_nodes, models.before_start, in that order; returns the seconds it
        took. ``report(detail)`` gets progress lines (step, item, bytes). Raises
        :class:`ManifestError` for the first required step that fails."""
        started = time.monotonic()
        if report is not None:
            self._report = report
        m = self.manifest
        if m is None:
            return 0.0
        if m.apt:
            await self._apt(m.apt)
        if m.pip:
            await self._pip(m.pip)
        for i, node in enumerate(m.custom_nodes):
            await self._custom_node(i, node, len(m.custom_nodes))
        if m.models.before_start:
            await self._models("models.before_start", m.models.before_start, storage, True)
        took = time.monotonic() - started
        log.info("manifest provisioning took %.3f s", took)
        return took

    async def _install(
        self, step: str, items: list[str | Package], make: Callable[[list[str]], list[str]]
    ) -> None:
        required = [i if isinstance(i, str) else i.name for i in items if not _optional(i)]
        optional = [i.name for i in items if isinstance(i, Package) and i.optional]
        env = self._install_env(step)
        if required:
            self._report(f"{step}: installing {', '.join(required)}")
            try:
                await run_command(make(required), env=env)
            except CommandFailed as exc:
                raise self._fail(step, str(exc)) from None
        for name in optional:
            self._report(f"{step}: installing {name} (optional)")
            try:
                await run_command(make([name]), env=env)
            except CommandFailed as exc:
                log.warning("%s: optional %s not installed: %s", step, name, exc)

    def _install_env(self, step: str) -> dict[str, str]:
        if step == "apt":
            return {**self.env, "DEBIAN_FRONTEND": "noninteractive"}
        return self._python().install_env(self.env)

    def _python(self) -> PythonTarget:
        return PythonTarget.find(self.env, self.settings.comfy_home, self.which)

    async def _apt(self, items: list[str | Package]) -> None:
        self._report("apt: apt-get update")
        try:
            await run_command(["apt-get", "update"], env=self._install_env("apt"))
        except CommandFailed as exc:
            if all(_optional(i) for i in items):
                log.warning("apt: %s; optional packages skipped", exc)
                return
            raise self._fail("apt", str(exc)) from None
        await self._install("apt", items, lambda names: ["apt-get", "install", "-y", *names])

    async def _pip(self, items: list[str | Package]) -> None:
        target, uv = self._python(), self.which("uv")
        log.info("pip installs go to %s (venv: %s, uv: %s)", target.python, target.venv, uv)
        await self._install("pip", items, lambda names: target.install_argv(names, uv))

    async def _custom_node(self, index: int, node: str | CustomNode, count: int) -> None:
        optional = isinstance(node, CustomNode) and node.optional
        value = node if isinstance(node, str) else (node.url or node.name or "")
        step = f"custom_nodes[{index}]"
        self._report(f"custom_nodes: {index + 1}/{count}: {value}")
        try:
            if is_git_url(value):
                await self._git_node(value)
            else:
                comfy = self.which("comfy") or "comfy"
                await run_command(
                    [
                        comfy,
                        f"--workspace={self.settings.comfy_home}",
                        "--skip-prompt",
                        "node",
                        "install",
                        value,
                        "--fast-deps",
                        "--exit-on-fail",
                    ],
                    env=self.env,
                )
        except CommandFailed as exc:
            if optional:
                log.warning("%s (optional) failed: %s", step, exc)
                return
            raise self._fail(step, str(exc)) from None

    async def _git(self, *args: str, cwd: str | None = None) -> None:
        env = {**self.env, "GIT_TERMINAL_PROMPT": "0"}
        await run_command(["git", *args], cwd=cwd, env=env)

    async def _git_out(self, *args: str, cwd: str) -> str | None:
        """A git command's stdout, or None when it fails (quiet: for checks)."""
        proc = await asyncio.create_subprocess_exec(
            "git",
            *args,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return out.decode().strip() if proc.returncode == 0 else None

    async def _git_node(self, url: str) -> None:
        """Clone ``url`` into COMFY_HOME/custom_nodes/<repo> at its ref (once), then install
        its requirements.txt. A clone already at that ref is left alone; one at another ref
        is fetched and checked out; a non-git directory there is an error."""
        base, ref = parse_git_url(url)
        name = repo_name(base)
        parent = Path(self.settings.comfy_home) / "custom_nodes"
        dest = parent / name
        if dest.exists():
            if not (dest / ".git").exists():
                raise CommandFailed(f"{dest} exists and is not a git clone")
            if ref is None:
                log.info("custom node %s already present (no ref pinned): kept", name)
            else:
                head = await self._git_out("rev-parse", "HEAD", cwd=str(dest))
                want = await self._git_out(
                    "rev-parse", "--verify", "-q", f"{ref}^{{commit}}", cwd=str(dest)
                )
                if head is not None and head == want:
                    log.info("custom node %s already at %s", name, ref)
                else:
                    await self._git("fetch", "--tags", "--force", "origin", cwd=str(dest))
                    await self._git("checkout", "-q", "--detach", ref, cwd=str(dest))
        else:
            parent.mkdir(parents=True, exist_ok=True)
            partial = parent / f".{name}.partial-{os.getpid()}"
            await asyncio.to_thread(shutil.rmtree, partial, True)
            try:
                await self._git("clone", "-q", base, str(partial))
                if ref is not None:
                    await self._git("checkout", "-q", "--detach", ref, cwd=str(partial))
                os.replace(partial, dest)
            finally:
                await asyncio.to_thread(shutil.rmtree, partial, True)
        requirements = dest / "requirements.txt"
        if requirements.is_file():
            target, uv = self._python(), self.which("uv")
            await run_command(
                target.install_argv(["-r", "requirements.txt"], uv),
                cwd=str(dest),
                env=target.install_env(self.env),
            )

    # --- models -------------------------------------------------------------------------

    async def _models(
        self, step: str, entries: list[ModelEntry], storage: Storage, fatal: bool
    ) -> None:
        """Download and link ``entries``, at most :data:`MAX_PARALLEL_DOWNLOADS` at once.
        With ``fatal`` the first required failure raises :class:`ManifestError` (the other
        downloads are cancelled); otherwise failures are logged."""
        gate = asyncio.Semaphore(MAX_PARALLEL_DOWNLOADS)
        done = 0
        self._progress.clear()

        async def one(i: int, entry: ModelEntry) -> None:
            nonlocal done
            where = f"{step}[{i}]"
            dest = self.roots.resolve(entry.local_path)
            async with gate:
                self._progress[where] = entry.url
                started = time.monotonic()
                try:
                    await storage.link(entry.url, entry.auth, dest)
                except Exception as exc:
                    message = f"{entry.url} -> {dest}: {exc}"
                    if fatal and not entry.optional:
                        raise self._fail(where, message) from None
                    log.warning(
                        "%s%s failed: %s", where, " (optional)" if entry.optional else "", message
                    )
                    return
                finally:
                    self._progress.pop(where, None)
                    done += 1
                log.info("%s: %s ready (%.2f s)", where, dest, time.monotonic() - started)

        def progress() -> str:
            parts = [f"{step}: {done}/{len(entries)} done"]
            for url in list(self._progress.values())[:3]:
                got = _partial_bytes(storage, url)
                parts.append(f"downloading {_clean(url)}" + (f" ({got} bytes)" if got else ""))
            return "; ".join(parts)

        async def reporter() -> None:
            while True:
                self._report(progress())
                await asyncio.sleep(0.25)

        ticker = asyncio.ensure_future(reporter()) if fatal else None
        tasks = [asyncio.ensure_future(one(i, e)) for i, e in enumerate(entries)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
        if fatal:
            self._report(f"{step}: {done}/{len(entries)} done")

    # --- after ComfyUI is up ------------------------------------------------------------

    async def after_start(self, storage: Storage) -> None:
        """Download and link ``models.after_start`` in the background. Never raises: every
        failure is logged (comfyui-api's unhandled rejection would crash the process)."""
        if self.manifest is None or not self.manifest.models.after_start:
            return
        started = time.monotonic()
        try:
            await self._models(
                "models.after_start", self.manifest.models.after_start, storage, False
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("models.after_start failed")
            return
        log.info("models.after_start finished in %.2f s", time.monotonic() - started)

    def start_after(self, storage: Storage, spawn: Callable[[Awaitable[None]], Any]) -> None:
        """Hand :meth:`after_start` to ``spawn`` (the sidecar's owned-task runner)."""
        if self.manifest is not None and self.manifest.models.after_start:
            spawn(self.after_start(storage))


def _optional(item: str | Package) -> bool:
    return isinstance(item, Package) and item.optional


def _clean(url: str) -> str:
    from comfy_sidecar.storage.base import strip_credentials

    return strip_credentials(url)


def _partial_bytes(storage: Storage, url: str) -> int:
    """Bytes downloaded so far for ``url`` (0 when no download of it is in flight)."""
    return storage.cache.progress(url) or 0


__all__ = [
    "CustomNode",
    "Manifest",
    "ManifestError",
    "ModelEntry",
    "Models",
    "Package",
    "Provisioner",
    "PythonTarget",
    "parse_git_url",
    "parse_manifest",
    "run_command",
]
