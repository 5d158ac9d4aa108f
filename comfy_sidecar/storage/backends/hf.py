"""Hugging Face backend: ``https://huggingface.co/[datasets/]<org>/<repo>/resolve/<rev>/<path>``
downloads and ``hf_upload`` uploads, through ``huggingface_hub`` (no CLI, unlike comfyui-api).

``HF_TOKEN`` is the default token; a per-request ``bearer`` auth overrides it. ``HF_ENDPOINT``
(a mirror or a private hub) is where requests go, and URLs on its host route here too.
Path segments are percent-decoded (comfyui-api #125). Large files take the fastest transfer
installed (:func:`fast_transfers`): ``hf_xet`` for Xet-backed repos, as the ``hf`` CLI would,
else ``hf_transfer`` on huggingface_hub versions that still support it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import urllib.parse
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from comfy_sidecar.schemas import BearerAuth, DownloadAuth, HFUpload
from comfy_sidecar.storage.backends.base import (
    CancelToken,
    FetchResult,
    check_name,
    check_prefix,
    join_key,
    run_sdk,
)
from comfy_sidecar.storage.errors import (
    AuthError,
    BackendError,
    BadRequestError,
    NotFoundError,
    StorageError,
)

DEFAULT_ENDPOINT = "https://huggingface.co"


class HubFile(TypedDict):
    """Keyword arguments naming one file on the Hub, as huggingface_hub spells them."""

    repo_id: str
    filename: str
    repo_type: str
    revision: str
    endpoint: str


@dataclass(frozen=True)
class HFTarget:
    """A file on the Hub: endpoint (scheme://host[:port]), repo, type, revision, path."""

    endpoint: str
    repo_id: str
    repo_type: str
    revision: str
    path: str

    def hub_file(self) -> HubFile:
        """The file as huggingface_hub's ``hf_hub_url``/``hf_hub_download`` arguments."""
        return HubFile(
            repo_id=self.repo_id,
            filename=self.path,
            repo_type=self.repo_type,
            revision=self.revision,
            endpoint=self.endpoint,
        )


def fast_transfers() -> list[str]:
    """Turn on the parallel transfer packages that are installed; returns their names.

    - ``hf_xet``: huggingface_hub uses it by itself for files in Xet-backed repos (chunks
      fetched in parallel) unless ``HF_HUB_DISABLE_XET`` is set; ``HF_XET_HIGH_PERFORMANCE=1``
      raises its concurrency further (operators' choice: it takes more memory and CPU).
    - ``hf_transfer``: parallel ranged GETs of LFS files, only in huggingface_hub < 1.0 (later
      versions dropped it for hf_xet); enabled here when installed, as
      ``HF_HUB_ENABLE_HF_TRANSFER=1`` would.

    Neither is a dependency: without them, files come over one connection.
    """
    from huggingface_hub import constants

    found: list[str] = []
    if importlib.util.find_spec("hf_xet") is not None and not constants.HF_HUB_DISABLE_XET:
        found.append("hf_xet")
    if hasattr(constants, "HF_HUB_ENABLE_HF_TRANSFER") and importlib.util.find_spec("hf_transfer"):
        constants.HF_HUB_ENABLE_HF_TRANSFER = True
        found.append("hf_transfer")
    return found


def _map_error(exc: BaseException, what: str) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    name = type(exc).__name__
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if name in ("GatedRepoError",) or status in (401, 403):
        return AuthError(f"{what}: Hugging Face refused access (HTTP {status or 403})")
    if (
        name
        in (
            "RepositoryNotFoundError",
            "RevisionNotFoundError",
            "EntryNotFoundError",
            "RemoteEntryNotFoundError",
        )
        or status == 404
    ):
        return NotFoundError(f"{what}: not found on Hugging Face")
    if status is not None:
        return BackendError(f"{what}: Hugging Face HTTP {status}")
    return BackendError(f"{what}: {name}")


class HFBackend:
    """Hugging Face Hub (models and datasets)."""

    name = "hf"

    def __init__(self, env: Mapping[str, str], executor: Executor) -> None:
        self._endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self._token = env.get("HF_TOKEN") or None
        self._executor = executor
        self._hosts = {"huggingface.co", urllib.parse.urlsplit(self._endpoint).netloc.lower()}

    def handles(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.netloc.lower() not in self._hosts:
            return False
        return "/resolve/" in parts.path

    def parse(self, url: str) -> HFTarget:
        """Split a resolve URL. Raises :class:`BadRequestError`."""
        parts = urllib.parse.urlsplit(url)
        segs = [urllib.parse.unquote(s) for s in parts.path.strip("/").split("/")]
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type = segs[0][:-1]
            segs = segs[1:]
        if "resolve" not in segs:
            raise BadRequestError("invalid Hugging Face URL: expected .../resolve/<rev>/<path>")
        idx = segs.index("resolve")
        repo, rest = segs[:idx], segs[idx + 1 :]
        if not 1 <= len(repo) <= 2 or len(rest) < 2 or not all(repo) or not all(rest):
            raise BadRequestError("invalid Hugging Face URL: expected <org>/<repo>/resolve/...")
        if parts.netloc.lower() == "huggingface.co":
            endpoint = self._endpoint
        else:
            endpoint = f"{parts.scheme}://{parts.netloc}"
        path = "/".join(rest[1:])
        check_name(path, "Hugging Face path", allow_slash=True)
        return HFTarget(endpoint, "/".join(repo), repo_type, rest[0], path)

    def _token_for(self, auth: DownloadAuth | None) -> str | None:
        if isinstance(auth, BearerAuth):
            return auth.token
        return self._token

    async def download(self, url: str, dest: Path, auth: DownloadAuth | None) -> FetchResult:
        target = self.parse(url)
        token = self._token_for(auth)
        work = dest.parent / "hf"

        def run() -> None:
            from huggingface_hub import hf_hub_download

            fast_transfers()
            local = hf_hub_download(**target.hub_file(), local_dir=work, token=token)
            os.replace(str(local), dest)
            shutil.rmtree(work, ignore_errors=True)

        await run_sdk(self._executor, run, _map_error, "download")
        return FetchResult(used_caller_auth=isinstance(auth, BearerAuth))

    async def check_auth(self, url: str, auth: DownloadAuth | None) -> None:
        target = self.parse(url)
        token = self._token_for(auth)

        def run() -> None:
            from huggingface_hub import get_hf_file_metadata, hf_hub_url

            file_url = hf_hub_url(**target.hub_file())
            get_hf_file_metadata(file_url, token=token, endpoint=target.endpoint)

        await run_sdk(self._executor, run, _map_error, "auth check")

    def _target(self, spec: object, filename: str) -> tuple[HFUpload, str]:
        assert isinstance(spec, HFUpload)
        check_name(filename, "filename", allow_slash=False)
        check_name(spec.repo, "hf_upload.repo", allow_slash=True)
        if not spec.repo.strip("/") or spec.repo.startswith("/"):
            raise BadRequestError("hf_upload.repo: must be <org>/<name>")
        check_name(spec.revision, "hf_upload.revision", allow_slash=True)
        return spec, join_key(check_prefix(spec.directory, "hf_upload.directory"), filename)

    def upload_url(self, spec: object, filename: str) -> str:
        upload, path_in_repo = self._target(spec, filename)
        kind = "datasets/" if upload.repo_type == "dataset" else ""
        quoted = "/".join(urllib.parse.quote(s, safe="") for s in path_in_repo.split("/"))
        revision = urllib.parse.quote(upload.revision, safe="")
        return f"{self._endpoint}/{kind}{upload.repo}/resolve/{revision}/{quoted}"

    async def upload(self, path: Path, spec: object, filename: str, cancel: CancelToken) -> None:
        upload, path_in_repo = self._target(spec, filename)

        def run() -> None:
            from huggingface_hub import HfApi

            HfApi(endpoint=self._endpoint, token=self._token).upload_file(
                path_or_fileobj=str(path),
                path_in_repo=path_in_repo,
                repo_id=upload.repo,
                repo_type=upload.repo_type,
                revision=upload.revision,
                commit_message=f"Upload {filename}",
            )

        # huggingface_hub cannot abort a commit half-way: a superseded upload finishes first
        # (the later one waits for it), then its caller is told it was superseded.
        cancel.check()
        await run_sdk(self._executor, run, _map_error, "upload")
        cancel.check()
