"""The installer: apt, pip, custom nodes and model downloads for one manifest.

``before_start`` runs before ComfyUI starts and fails start-up on a required step;
``after_start`` runs once ComfyUI is up and only logs its failures (comfyui-api crashes on an
unhandled rejection). Models go through the download cache keyed by URL hash, so a second boot
with the same ``CACHE_DIR`` downloads nothing (comfyui-api's W-B1), at most
:data:`MAX_PARALLEL_DOWNLOADS` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_sidecar.net.bounded import gather_bounded
from comfy_sidecar.net.urls import scrub_url
from comfy_sidecar.storage.netguard import trusted

from .commands import CommandFailed, PythonTarget, run_command
from .schema import (
    CustomNode,
    Manifest,
    ManifestError,
    ModelEntry,
    Package,
    Roots,
    is_git_url,
    load_manifest,
    parse_git_url,
    repo_name,
)

if TYPE_CHECKING:
    from comfy_sidecar.config import Settings
    from comfy_sidecar.storage import Storage

log = logging.getLogger("comfy_sidecar.manifest")

#: Concurrent ``before_start``/``after_start`` downloads.
MAX_PARALLEL_DOWNLOADS = 4

ReportFn = Callable[[str], None]
"""``report(detail)``: the provisioning progress line shown by ``/health`` and ``/ready``."""


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
        done = 0
        self._progress.clear()

        def download(i: int, entry: ModelEntry) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                nonlocal done
                try:
                    await self._model(f"{step}[{i}]", entry, storage, fatal)
                finally:
                    done += 1

            return run

        async def reporter() -> None:
            while True:
                self._report(self._models_line(step, done, len(entries), storage))
                await asyncio.sleep(0.25)

        ticker = asyncio.ensure_future(reporter()) if fatal else None
        work = [download(i, entry) for i, entry in enumerate(entries)]
        try:
            await gather_bounded(work, MAX_PARALLEL_DOWNLOADS)
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
        if fatal:
            self._report(f"{step}: {done}/{len(entries)} done")

    async def _model(self, where: str, entry: ModelEntry, storage: Storage, fatal: bool) -> None:
        """Download and link one model (``where``: its place in the manifest, for logs). A
        failure raises :class:`ManifestError` when ``fatal`` and the entry is required, else
        it is logged."""
        dest = self.roots.resolve(entry.local_path)
        self._progress[where] = entry.url
        started = time.monotonic()
        try:
            with trusted():  # the operator's manifest: not checked by the SSRF guard
                await storage.link(entry.url, entry.auth, dest)
        except Exception as exc:
            message = f"{entry.url} -> {dest}: {exc}"
            if fatal and not entry.optional:
                raise self._fail(where, message) from None
            log.warning("%s%s failed: %s", where, " (optional)" if entry.optional else "", message)
            return
        finally:
            self._progress.pop(where, None)
        log.info("%s: %s ready (%.2f s)", where, dest, time.monotonic() - started)

    def _models_line(self, step: str, done: int, total: int, storage: Storage) -> str:
        """The progress line: ``<step>: <done>/<total> done`` and up to three downloads in
        flight with their bytes so far."""
        parts = [f"{step}: {done}/{total} done"]
        for url in list(self._progress.values())[:3]:
            got = _partial_bytes(storage, url)
            parts.append(f"downloading {scrub_url(url)}" + (f" ({got} bytes)" if got else ""))
        return "; ".join(parts)

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


def _partial_bytes(storage: Storage, url: str) -> int:
    """Bytes downloaded so far for ``url`` (0 when no download of it is in flight)."""
    return storage.cache.progress(url) or 0
