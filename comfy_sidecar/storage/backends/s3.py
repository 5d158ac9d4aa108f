"""S3 backend: ``s3://bucket/key`` downloads and ``s3`` uploads through boto3's transfer manager.

Credentials: per-request ``S3Auth`` (its own client, with optional ``endpoint`` and ``region``),
else the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, instance roles; ``AWS_ENDPOINT_URL`` for R2/MinIO/LocalStack;
``AWS_REGION``/``AWS_DEFAULT_REGION``, default ``us-east-1``). Path-style addressing, 10 s
connect and 60 s read timeouts, 3 attempts with boto3's standard backoff. Unlike comfyui-api the
provider exists even when no region is set, and upload errors are raised, never swallowed.

Every request of a download, upload or auth check carries the job's W3C ``traceparent``
(:func:`comfy_sidecar.observability.tracing.traceparent`), added after signing (an unsigned
header S3 ignores). boto3's transfer manager sends from threads of its own, so the header is
found by the object's path (:meth:`S3Backend.traced`), not by context.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from comfy_sidecar.observability import tracing
from comfy_sidecar.schemas import DownloadAuth, S3Auth, S3Upload
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

PART_SIZE = 8 << 20
#: Range size of a download part (bytes); see :func:`download_config`.
DOWNLOAD_PART_SIZE = 16 << 20


def download_config(connections: int) -> Any:
    """boto3's ``TransferConfig`` for downloads: objects over 16 MiB are fetched as 16 MiB
    ranged GETs on ``connections`` threads (``DOWNLOAD_CONNECTIONS``), each on its own pooled
    connection. S3 caps one connection at roughly 50-150 MB/s, so the concurrency is what
    buys speed; parts of 16 MiB rather than boto3's 8 MiB halve the requests (measured in
    ``bench/download_bench.py``, see docs/storage.md)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=DOWNLOAD_PART_SIZE,
        multipart_chunksize=DOWNLOAD_PART_SIZE,
        max_concurrency=connections,
    )


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)`` (key percent-decoded). Raises
    :class:`BadRequestError`."""
    parts = urllib.parse.urlsplit(url)
    bucket = parts.netloc
    key = urllib.parse.unquote(parts.path.lstrip("/"))
    if parts.scheme != "s3" or not bucket or not key:
        raise BadRequestError("invalid s3 URL: expected s3://bucket/key")
    return bucket, key


def _map_error(exc: BaseException, what: str) -> StorageError:
    """botocore/s3transfer exceptions -> StorageError without secrets."""
    if isinstance(exc, StorageError):
        return exc
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return AuthError(f"{what}: no S3 credentials")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket") or status == 404:
            return NotFoundError(f"{what}: S3 object not found")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or (
            status in (401, 403)
        ):
            return AuthError(f"{what}: S3 access denied")
        return BackendError(f"{what}: S3 error {code or status}")
    if isinstance(exc, EndpointConnectionError):
        return BackendError(f"{what}: cannot reach the S3 endpoint")
    return BackendError(f"{what}: {type(exc).__name__}")


class S3Backend:
    """S3 and S3-compatible storage."""

    name = "s3"

    def __init__(self, env: Mapping[str, str], executor: Executor, connections: int = 8) -> None:
        self._env = dict(env)
        self._executor = executor
        self._connections = connections
        self._default: Any = None
        self._lock = threading.Lock()
        #: ``/bucket/key`` -> the traceparent its requests carry, while a call on it runs.
        self._traces: dict[str, str] = {}

    @property
    def region(self) -> str:
        return self._env.get("AWS_REGION") or self._env.get("AWS_DEFAULT_REGION") or "us-east-1"

    def _make_client(self, auth: S3Auth | None) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=10,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},
            max_pool_connections=max(16, self._connections),
        )
        if auth is not None:
            session = boto3.session.Session(
                aws_access_key_id=auth.access_key_id,
                aws_secret_access_key=auth.secret_access_key,
                aws_session_token=auth.session_token,
                region_name=auth.region or self.region,
            )
            endpoint = auth.endpoint or self._env.get("AWS_ENDPOINT_URL")
        else:
            session = boto3.session.Session(
                aws_access_key_id=self._env.get("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=self._env.get("AWS_SECRET_ACCESS_KEY"),
                aws_session_token=self._env.get("AWS_SESSION_TOKEN"),
                profile_name=self._env.get("AWS_PROFILE"),
                region_name=self.region,
            )
            endpoint = self._env.get("AWS_ENDPOINT_URL_S3") or self._env.get("AWS_ENDPOINT_URL")
        client = session.client("s3", endpoint_url=endpoint or None, config=config)
        client.meta.events.register("before-send.s3", self._add_traceparent)
        return client

    def _add_traceparent(self, request: Any, **_: Any) -> None:
        """botocore's ``before-send``: put the traceparent of the call on ``request``'s
        object (path-style URL ``/bucket/key``) in its headers."""
        if not self._traces:
            return
        path = urllib.parse.unquote(urllib.parse.urlsplit(request.url).path)
        value = self._traces.get(path)
        if value is not None:
            request.headers["traceparent"] = value

    @contextlib.contextmanager
    def traced(self, bucket: str, key: str) -> Iterator[None]:
        """Within the block, requests for ``bucket``/``key`` carry the current traceparent
        (none when there is none)."""
        value = tracing.traceparent()
        path = f"/{bucket}/{key}"
        if value is None:
            yield
            return
        self._traces[path] = value
        try:
            yield
        finally:
            if self._traces.get(path) == value:
                del self._traces[path]

    def _client(self, auth: DownloadAuth | None) -> Any:
        if isinstance(auth, S3Auth):
            return self._make_client(auth)
        with self._lock:
            if self._default is None:
                self._default = self._make_client(None)
            return self._default

    def handles(self, url: str) -> bool:
        return url.lower().startswith("s3://")

    async def download(self, url: str, dest: Path, auth: DownloadAuth | None) -> FetchResult:
        bucket, key = parse_s3_url(url)

        def run() -> None:
            client = self._client(auth)
            client.download_file(bucket, key, str(dest), Config=download_config(self._connections))

        with self.traced(bucket, key):
            await run_sdk(self._executor, run, _map_error, "download")
        return FetchResult(used_caller_auth=isinstance(auth, S3Auth))

    async def check_auth(self, url: str, auth: DownloadAuth | None) -> None:
        bucket, key = parse_s3_url(url)
        with self.traced(bucket, key):
            await run_sdk(
                self._executor,
                lambda: self._client(auth).head_object(Bucket=bucket, Key=key),
                _map_error,
                "auth check",
            )

    def _target(self, spec: object, filename: str) -> tuple[str, str]:
        assert isinstance(spec, S3Upload)
        check_name(filename, "filename", allow_slash=False)
        bucket = spec.bucket
        if not bucket or "/" in bucket or "\x00" in bucket:
            raise BadRequestError("s3.bucket: must be a bucket name")
        return bucket, join_key(check_prefix(spec.prefix, "s3.prefix"), filename)

    def upload_url(self, spec: object, filename: str) -> str:
        bucket, key = self._target(spec, filename)
        return f"s3://{bucket}/{key}"

    async def upload(self, path: Path, spec: object, filename: str, cancel: CancelToken) -> None:
        bucket, key = self._target(spec, filename)

        def progress(_n: int) -> None:
            cancel.check()  # raising here makes the transfer manager abort the upload

        def run() -> None:
            from boto3.s3.transfer import TransferConfig

            cfg = TransferConfig(
                multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=4
            )
            self._client(None).upload_file(
                str(path),
                bucket,
                key,
                ExtraArgs={"ContentType": content_type_for(filename)},
                Config=cfg,
                Callback=progress,
            )

        with self.traced(bucket, key):
            await run_upload(cancel, self._executor, run, _map_error)
