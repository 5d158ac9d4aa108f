"""Azure Blob backend: ``https://<account>.blob.core.windows.net/<container>/<blob>`` and
Azurite-style ``http://<host>:<port>/<account>/<container>/<blob>`` URLs (first path segment
``devstoreaccount1``, a host containing ``azurite``, or under the configured ``BlobEndpoint``);
``azure_blob_upload`` uploads. Uses azure-storage-blob.

Configuration, first match wins (comfyui-api's order): ``AZURE_STORAGE_CONNECTION_STRING``;
``AZURE_STORAGE_ACCOUNT`` + ``AZURE_STORAGE_KEY``; ``AZURE_STORAGE_ACCOUNT`` +
``AZURE_STORAGE_SAS_TOKEN``; ``AZURE_STORAGE_ACCOUNT`` alone (anonymous; comfyui-api would use
``DefaultAzureCredential``, which needs the azure-identity package we do not ship).
Downloads of the configured account use the configured credential; a URL of another account is
read with the SAS in its query, or anonymously. (comfyui-api ignores the URL's account and
SAS, and its Azure downloads never resolve.)
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import IO, Any

from comfy_sidecar.schemas import AzureBlobUpload, DownloadAuth
from comfy_sidecar.storage.backends.base import (
    CancelToken,
    FetchResult,
    check_name,
    check_prefix,
    content_type_for,
    join_key,
    run_sdk,
    run_upload,
)
from comfy_sidecar.storage.errors import (
    AuthError,
    BackendError,
    BadRequestError,
    NotFoundError,
    StorageError,
)

BLOCK = 4 << 20
CLIENT_KWARGS: dict[str, Any] = {
    "connection_timeout": 10,
    "read_timeout": 60,
    "retry_total": 3,
    "max_single_put_size": BLOCK,
    "max_block_size": BLOCK,
    "max_single_get_size": BLOCK,
    "max_chunk_get_size": BLOCK,
}


def _map_error(exc: BaseException, what: str) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    name = type(exc).__name__
    status = getattr(exc, "status_code", None)
    if name == "ResourceNotFoundError" or status == 404:
        return NotFoundError(f"{what}: Azure blob not found")
    if name == "ClientAuthenticationError" or status in (401, 403):
        return AuthError(f"{what}: Azure refused access")
    if status is not None:
        return BackendError(f"{what}: Azure HTTP {status}")
    return BackendError(f"{what}: {name}")


class _CancellableReader:
    """A file object that raises :class:`SupersededError` on read once cancelled."""

    def __init__(self, fh: IO[bytes], cancel: CancelToken) -> None:
        self._fh = fh
        self._cancel = cancel

    def read(self, size: int = -1) -> bytes:
        self._cancel.check()
        return self._fh.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def seekable(self) -> bool:
        return True


class AzureBackend:
    """Azure Blob Storage (and Azurite)."""

    name = "azure"

    def __init__(self, env: Mapping[str, str], executor: Executor) -> None:
        self._executor = executor
        self._conn = env.get("AZURE_STORAGE_CONNECTION_STRING") or None
        self._account = env.get("AZURE_STORAGE_ACCOUNT") or None
        self._key = env.get("AZURE_STORAGE_KEY") or None
        sas = env.get("AZURE_STORAGE_SAS_TOKEN") or None
        self._sas = sas.lstrip("?") if sas else None
        self._blob_endpoint: str | None = None
        if self._conn:
            fields = dict(part.split("=", 1) for part in self._conn.split(";") if "=" in part)
            self._account = fields.get("AccountName", self._account)
            endpoint = fields.get("BlobEndpoint")
            if endpoint:
                self._blob_endpoint = endpoint.rstrip("/")
        if self._blob_endpoint is None and self._account:
            self._blob_endpoint = f"https://{self._account}.blob.core.windows.net"
        self._service: Any = None
        self._lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return bool(self._conn or self._account)

    def service(self) -> Any:
        """The configured BlobServiceClient. Raises :class:`BadRequestError` if none."""
        if not self.configured:
            raise BadRequestError(
                "azure_blob_upload: Azure is not configured (set AZURE_STORAGE_CONNECTION_STRING "
                "or AZURE_STORAGE_ACCOUNT)"
            )
        with self._lock:
            if self._service is None:
                from azure.storage.blob import BlobServiceClient

                if self._conn:
                    self._service = BlobServiceClient.from_connection_string(
                        self._conn, **CLIENT_KWARGS
                    )
                else:
                    credential: Any = None
                    if self._key:
                        credential = {"account_name": self._account, "account_key": self._key}
                    elif self._sas:
                        credential = self._sas
                    self._service = BlobServiceClient(
                        str(self._blob_endpoint), credential=credential, **CLIENT_KWARGS
                    )
            return self._service

    def handles(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return False
        host = parts.hostname or ""
        if host.endswith(".blob.core.windows.net") or "azurite" in host:
            return True
        first = parts.path.strip("/").split("/", 1)[0]
        if first == "devstoreaccount1":
            return True
        return bool(self._blob_endpoint) and url.startswith(f"{self._blob_endpoint}/")

    def parse(self, url: str) -> tuple[str, str, str]:
        """``(account, container, blob)`` of a blob URL. Raises :class:`BadRequestError`."""
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        segs = [urllib.parse.unquote(s) for s in parts.path.strip("/").split("/")]
        if host.endswith(".blob.core.windows.net"):
            account = host.split(".", 1)[0]
        else:
            account, segs = (segs[0], segs[1:]) if segs else ("", [])
        if len(segs) < 2 or not account or not all(segs):
            raise BadRequestError("invalid Azure Blob URL: expected <account>/<container>/<blob>")
        return account, segs[0], "/".join(segs[1:])

    def uses_configured_endpoint(self, url: str) -> bool:
        """True when ``url`` is read through the operator's configured endpoint (its account
        is the configured one); other accounts' URLs are fetched from the URL's own host."""
        try:
            account = self.parse(url)[0]
        except BadRequestError:
            return False
        return self.configured and account == self._account

    def _blob_client(self, url: str) -> Any:
        _, container, blob = self.parse(url)
        if self.uses_configured_endpoint(url):
            return self.service().get_blob_client(container, blob)
        from azure.storage.blob import BlobClient

        return BlobClient.from_blob_url(url, **CLIENT_KWARGS)

    async def download(self, url: str, dest: Path, auth: DownloadAuth | None) -> FetchResult:
        def run() -> None:
            client = self._blob_client(url)
            with open(dest, "wb") as fh:
                stream = client.download_blob(max_concurrency=4)
                written = stream.readinto(fh)
            if written != stream.size:
                raise BackendError(f"download incomplete: {written} of {stream.size} bytes")

        await run_sdk(self._executor, run, _map_error, "download")
        return FetchResult(used_caller_auth=bool(urllib.parse.urlsplit(url).query))

    async def check_auth(self, url: str, auth: DownloadAuth | None) -> None:
        await run_sdk(
            self._executor,
            lambda: self._blob_client(url).get_blob_properties(),
            _map_error,
            "auth check",
        )

    def _target(self, spec: object, filename: str) -> tuple[str, str]:
        assert isinstance(spec, AzureBlobUpload)
        check_name(filename, "filename", allow_slash=False)
        container = spec.container
        check_name(container, "azure_blob_upload.container", allow_slash=False)
        blob = join_key(check_prefix(spec.blob_prefix, "azure_blob_upload.blob_prefix"), filename)
        return container, blob

    def upload_url(self, spec: object, filename: str) -> str:
        container, blob = self._target(spec, filename)
        base = str(self.service().url).split("?", 1)[0].rstrip("/")
        return f"{base}/{container}/{urllib.parse.quote(blob)}"

    async def upload(self, path: Path, spec: object, filename: str, cancel: CancelToken) -> None:
        container, blob = self._target(spec, filename)
        size = path.stat().st_size

        def run() -> None:
            from azure.storage.blob import ContentSettings

            client = self.service().get_blob_client(container, blob)
            with open(path, "rb") as fh:
                client.upload_blob(
                    _CancellableReader(fh, cancel),
                    length=size,
                    overwrite=True,
                    max_concurrency=2,
                    content_settings=ContentSettings(content_type=content_type_for(filename)),
                )

        await run_upload(cancel, self._executor, run, _map_error)
