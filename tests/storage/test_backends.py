"""Each backend against its real server: download into an input and a model folder, upload
(verified on the server), URL shapes, errors."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from comfy_sidecar.schemas import (
    AzureBlobUpload,
    BearerAuth,
    HFUpload,
    HTTPUpload,
    S3Auth,
    S3Upload,
)
from comfy_sidecar.storage import (
    AuthError,
    BackendError,
    BadRequestError,
    NotFoundError,
    SupersededError,
)
from comfy_sidecar.storage.cache import cache_key
from tests.storage.hf_hub_server import HubServer
from tests.storage.servers import FileServer
from tests.waiting import async_wait_for


def _bucket(s3_client: Any) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


# --- S3 -------------------------------------------------------------------------------------


def test_s3_download_stage_and_upload(
    make_storage: Any,
    s3_env: dict[str, str],
    s3_client: Any,
    tmp_path: Path,
    png_bytes: bytes,
    model_bytes: bytes,
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    bucket = _bucket(s3_client)
    s3_client.put_object(Bucket=bucket, Key="in/a b.png", Body=png_bytes)
    s3_client.put_object(Bucket=bucket, Key="models/up.safetensors", Body=model_bytes)
    out = tmp_path / "out.png"
    out.write_bytes(os.urandom(20 << 20))  # 20 MiB: multipart upload

    async def main() -> None:
        storage = make_storage(env=s3_env)
        await storage.start()
        try:
            url = f"s3://{bucket}/in/a%20b.png"
            name = await storage.stage_input(url, None, tmp_path / "input", "a.png")
            assert (tmp_path / "input" / name).read_bytes() == png_bytes
            murl = f"s3://{bucket}/models/up.safetensors"
            mname = await storage.stage_model(murl, None, tmp_path / "models" / "upscale_models")
            assert mname == cache_key(murl) + ".safetensors"
            assert (tmp_path / "models" / "upscale_models" / mname).read_bytes() == model_bytes
            with pytest.raises(NotFoundError):
                await storage.fetch(f"s3://{bucket}/nope.png", None)
            spec = S3Upload(bucket=bucket, prefix="/results/")
            dest = await storage.upload(out, spec, "out.png")
            assert dest == f"s3://{bucket}/results/out.png"
            obj = s3_client.get_object(Bucket=bucket, Key="results/out.png")
            assert obj["Body"].read() == out.read_bytes()
            assert obj["ContentType"] == "image/png"
            assert await storage.upload(out, S3Upload(bucket=bucket), "o.png") == (
                f"s3://{bucket}/o.png"
            )
            # per-request S3 auth: its own client; the entry is auth-gated
            auth = S3Auth(
                access_key_id="other",
                secret_access_key="other",
                endpoint=s3_env["AWS_ENDPOINT_URL"],
                region="us-east-1",
            )
            aurl = f"s3://{bucket}/models/other.bin"
            s3_client.put_object(Bucket=bucket, Key="models/other.bin", Body=b"q")
            path = await storage.fetch(aurl, auth)
            assert path.read_bytes() == b"q"
            entry = storage.cache.entry(aurl)
            assert entry is not None and entry.auth_required
            with pytest.raises(BackendError):
                await storage.upload(out, S3Upload(bucket="no-such-bucket-x"), "o.png")
        finally:
            await storage.close()
        uploaded = [d for n, d in events if n == "file_uploaded"]
        assert uploaded[0]["url"] == f"s3://{bucket}/results/out.png"
        assert uploaded[0]["size"] == 20 << 20
        assert uploaded[0]["local_path"] == str(out)

    asyncio.run(main())


# --- Azure ----------------------------------------------------------------------------------


def test_azure_download_stage_and_upload(
    make_storage: Any,
    azurite: str,
    blob_service: Any,
    tmp_path: Path,
    png_bytes: bytes,
    model_bytes: bytes,
) -> None:
    container = f"c{uuid.uuid4().hex[:12]}"
    blob_service.create_container(container)
    blob_service.get_blob_client(container, "dir/in.png").upload_blob(png_bytes)
    blob_service.get_blob_client(container, "up x2.safetensors").upload_blob(model_bytes)
    base = blob_service.url.rstrip("/")
    out = tmp_path / "out.webp"
    out.write_bytes(os.urandom(9 << 20))  # several 4 MiB blocks

    async def main() -> None:
        storage = make_storage(env={"AZURE_STORAGE_CONNECTION_STRING": azurite})
        await storage.start()
        try:
            url = f"{base}/{container}/dir/in.png"
            assert storage.backend_for(url).name == "azure"
            name = await storage.stage_input(url, None, tmp_path / "input", "in.png")
            assert (tmp_path / "input" / name).read_bytes() == png_bytes
            murl = f"{base}/{container}/up%20x2.safetensors"
            mname = await storage.stage_model(murl, None, tmp_path / "models" / "upscale_models")
            assert (tmp_path / "models" / "upscale_models" / mname).read_bytes() == model_bytes
            with pytest.raises(NotFoundError):
                await storage.fetch(f"{base}/{container}/missing.png", None)
            spec = AzureBlobUpload(container=container, blob_prefix="out/")
            dest = await storage.upload(out, spec, "out.webp")
            assert dest == f"{base}/{container}/out/out.webp"
            blob = blob_service.get_blob_client(container, "out/out.webp")
            assert blob.download_blob().readall() == out.read_bytes()
            assert blob.get_blob_properties().content_settings.content_type == "image/webp"
            with pytest.raises(BackendError):
                await storage.upload(out, AzureBlobUpload(container="missing-c"), "x.webp")
        finally:
            await storage.close()

    asyncio.run(main())


def test_azure_anonymous_without_configuration_is_refused(
    make_storage: Any, azurite: str, blob_service: Any, tmp_path: Path
) -> None:
    container = f"p{uuid.uuid4().hex[:12]}"
    blob_service.create_container(container)  # private container
    blob_service.get_blob_client(container, "x.png").upload_blob(b"x")
    base = blob_service.url.rstrip("/")

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            with pytest.raises((AuthError, NotFoundError)):  # Azurite answers 403 or 404
                await storage.fetch(f"{base}/{container}/x.png", None)
            with pytest.raises(BadRequestError):
                await storage.upload(tmp_path, AzureBlobUpload(container=container), "x.png")
        finally:
            await storage.close()

    asyncio.run(main())


# --- Hugging Face ---------------------------------------------------------------------------


def test_hf_download_stage_and_upload(
    make_storage: Any,
    hub: HubServer,
    tmp_path: Path,
    png_bytes: bytes,
    model_bytes: bytes,
) -> None:
    hub.repos[("model", "org/models", "sub dir/up.safetensors")] = model_bytes
    hub.repos[("dataset", "org/data", "img.png")] = png_bytes
    hub.repos[("model", "org/private-m", "p.bin")] = b"private"
    out = tmp_path / "result.png"
    out.write_bytes(os.urandom(3 << 20))

    async def main() -> None:
        storage = make_storage(env={"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_env"})
        await storage.start()
        try:
            # a huggingface.co URL goes to HF_ENDPOINT; so does a URL on that host
            murl = "https://huggingface.co/org/models/resolve/main/sub%20dir/up.safetensors"
            assert storage.backend_for(murl).name == "hf"
            mname = await storage.stage_model(murl, None, tmp_path / "models" / "upscale_models")
            assert mname == cache_key(murl) + ".safetensors"
            assert (tmp_path / "models" / "upscale_models" / mname).read_bytes() == model_bytes
            durl = f"{hub.endpoint}/datasets/org/data/resolve/main/img.png"
            assert storage.backend_for(durl).name == "hf"
            name = await storage.stage_input(durl, None, tmp_path / "input", "img.png")
            assert (tmp_path / "input" / name).read_bytes() == png_bytes
            # private repo: HF_TOKEN (hf_env) is refused, a per-request bearer token works
            purl = f"{hub.endpoint}/org/private-m/resolve/main/p.bin"
            with pytest.raises(AuthError):
                await storage.fetch(purl, None)
            path = await storage.fetch(purl, BearerAuth(token="hf_good"))
            assert path.read_bytes() == b"private"
            with pytest.raises(AuthError):
                await storage.fetch(purl, BearerAuth(token="bad"))
            with pytest.raises(NotFoundError):
                await storage.fetch(f"{hub.endpoint}/org/models/resolve/main/none.bin", None)
            spec = HFUpload(repo="org/outputs", directory="/runs/", revision="main")
            dest = await storage.upload(out, spec, "result.png")
            assert dest == f"{hub.endpoint}/org/outputs/resolve/main/runs/result.png"
            assert hub.repos[("model", "org/outputs", "runs/result.png")] == out.read_bytes()
            dspec = HFUpload(repo="org/ds", repo_type="dataset")
            dest = await storage.upload(out, dspec, "r 1.png")
            assert dest == f"{hub.endpoint}/datasets/org/ds/resolve/main/r%201.png"
            assert hub.repos[("dataset", "org/ds", "r 1.png")] == out.read_bytes()
        finally:
            await storage.close()

    asyncio.run(main())


def test_progress_of_an_inflight_hf_download(
    make_storage: Any, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cache.progress(url)`` counts what Hugging Face wrote so far (its own part file in the
    download's temp directory), not 0; None before and after the download."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 << 10)
    data = os.urandom(1 << 20)
    hub.repos[("model", "org/models", "big.bin")] = data
    hub.hold = threading.Event()  # the hub sends half of the file, then waits

    async def main() -> None:
        storage = make_storage(env={"HF_ENDPOINT": hub.endpoint})
        await storage.start()
        url = f"{hub.endpoint}/org/models/resolve/main/big.bin"
        try:
            assert storage.cache.progress(url) is None
            fetch = asyncio.create_task(storage.fetch(url, None))
            deadline = time.monotonic() + 30
            while not storage.cache.progress(url):
                assert not fetch.done() and time.monotonic() < deadline, "no progress seen"
                await asyncio.sleep(0.02)
            done = storage.cache.progress(url)
            assert done is not None and 0 < done <= len(data)
            assert storage.cache.progress_by_key(cache_key(url)) == done
            hub.hold.set()
            assert (await fetch).read_bytes() == data
            assert storage.cache.progress(url) is None
        finally:
            hub.hold.set()
            await storage.close()

    asyncio.run(main())


# --- HTTP uploads ---------------------------------------------------------------------------


def test_http_upload_put_and_failure(
    make_storage: Any, http_server: FileServer, tmp_path: Path
) -> None:
    out = tmp_path / "o.png"
    out.write_bytes(os.urandom(3 << 20))

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            spec = HTTPUpload(url_prefix=http_server.url("/upload//"))
            dest = await storage.upload(out, spec, "o.png")
            assert dest == http_server.url("/upload/o.png")
            assert http_server.uploads["o.png"] == out.read_bytes()
            put = next(h for m, p, h in http_server.requests if m == "PUT")
            assert put["Content-Type"] == "image/png"
            with pytest.raises(BackendError) as err:
                await storage.upload(out, HTTPUpload(url_prefix=http_server.url("/fail")), "o.png")
            assert "500" in str(err.value)
        finally:
            await storage.close()

    asyncio.run(main())


def test_second_upload_supersedes_first(
    make_storage: Any, http_server: FileServer, tmp_path: Path
) -> None:
    first = tmp_path / "first.png"
    first.write_bytes(b"1" * (16 << 20))  # more than loopback socket buffers hold
    second = tmp_path / "second.png"
    second.write_bytes(b"2" * (1 << 20))
    http_server.put_delay_s = 0.004  # ~1 s for the first file

    async def main() -> None:
        storage = make_storage()
        await storage.start()
        try:
            spec = HTTPUpload(url_prefix=http_server.url("/upload"))
            one = asyncio.create_task(storage.upload(first, spec, "same.png"))
            await async_wait_for(
                lambda: http_server.receiving.get("same.png"), what="the first upload to stream"
            )
            two = asyncio.create_task(storage.upload(second, spec, "same.png"))
            results = await asyncio.gather(one, two, return_exceptions=True)
        finally:
            await storage.close()
        assert isinstance(results[0], SupersededError), results
        assert "superseded" in str(results[0]), results
        assert results[1] == http_server.url("/upload/same.png"), results
        assert http_server.uploads["same.png"] == second.read_bytes()

    asyncio.run(main())


def test_s3_requests_carry_the_jobs_traceparent(
    make_storage: Any, s3_env: dict[str, str], s3_client: Any, tmp_path: Path, png_bytes: bytes
) -> None:
    """Every S3 request of a download or upload carries the job's traceparent, the parts of a
    multipart upload too (boto3 sends them from its own threads); a request for another
    object made meanwhile does not. (With tracing off the job's traceparent is its request's,
    as received: comfy_sidecar.observability.tracing.traceparent.)"""
    from comfy_sidecar.observability.logs import TRACEPARENT

    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    bucket = _bucket(s3_client)
    s3_client.put_object(Bucket=bucket, Key="in/a b.png", Body=png_bytes)
    out = tmp_path / "out.png"
    out.write_bytes(os.urandom(20 << 20))  # 20 MiB: a multipart upload
    sent: list[tuple[str, str, str | None]] = []
    lock = threading.Lock()

    def capture(request: Any, **_: Any) -> None:
        with lock:
            sent.append((request.method, request.url, request.headers.get("traceparent")))

    async def main() -> None:
        storage = make_storage(env=s3_env)
        await storage.start()
        storage.s3._client(None).meta.events.register("before-send.s3", capture)
        try:
            await storage.fetch(f"s3://{bucket}/nope-before.png", None)
        except NotFoundError:
            pass
        TRACEPARENT.set(traceparent)
        try:
            await storage.fetch(f"s3://{bucket}/in/a%20b.png", None)
            await storage.upload(out, S3Upload(bucket=bucket, prefix="results"), "out.png")
        finally:
            await storage.close()

    asyncio.run(main())
    traced = [(method, url) for method, url, header in sent if header == traceparent]
    plain = [(method, url) for method, url, header in sent if header is None]
    source = f"{s3_env['AWS_ENDPOINT_URL']}/{bucket}/in/a%20b.png"
    assert {u for m, u in traced if m == "GET"} == {source}
    parts = [u for m, u in traced if m == "PUT" and "partNumber=" in u]
    assert len(parts) == 3, sent  # 8 + 8 + 4 MiB
    assert any("uploads" in u for m, u in traced if m == "POST")  # create, complete
    assert [u for m, u in plain if "nope-before.png" in u], sent
    assert all("nope-before.png" in u for m, u in plain), sent


def test_s3_second_upload_supersedes_first(
    make_storage: Any, s3_env: dict[str, str], s3_client: Any, tmp_path: Path
) -> None:
    bucket = _bucket(s3_client)
    first = tmp_path / "first.bin"
    first.write_bytes(b"1" * (64 << 20))
    second = tmp_path / "second.bin"
    second.write_bytes(b"2" * (1 << 20))

    async def main() -> None:
        storage = make_storage(env=s3_env)
        await storage.start()
        try:
            spec = S3Upload(bucket=bucket, prefix="x")
            one = asyncio.create_task(storage.upload(first, spec, "f.bin"))

            def multipart_started() -> bool:
                return bool(s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads"))

            await async_wait_for(
                lambda: asyncio.to_thread(multipart_started), what="the first upload to stream"
            )
            two = asyncio.create_task(storage.upload(second, spec, "f.bin"))
            results = await asyncio.gather(one, two, return_exceptions=True)
        finally:
            await storage.close()
        assert isinstance(results[0], SupersededError) and "superseded" in str(results[0])
        assert results[1] == f"s3://{bucket}/x/f.bin"
        body = s3_client.get_object(Bucket=bucket, Key="x/f.bin")["Body"].read()
        assert body == second.read_bytes()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("filename", "prefix"),
    [
        ("../x.png", ""),
        ("/abs.png", ""),
        ("a/b.png", ""),
        ("x\x00.png", ""),
        ("ok.png", "../up"),
        ("ok.png", "a/../../b"),
        ("ok.png", "a\x00b"),
        ("..", ""),
    ],
)
def test_upload_traversal_refused(
    make_storage: Any,
    s3_env: dict[str, str],
    azurite: str,
    tmp_path: Path,
    filename: str,
    prefix: str,
) -> None:
    out = tmp_path / "o.png"
    out.write_bytes(b"o")
    specs = [
        S3Upload(bucket="b", prefix=prefix),
        HFUpload(repo="org/r", directory=prefix),
        AzureBlobUpload(container="c", blob_prefix=prefix),
        HTTPUpload(url_prefix="http://127.0.0.1:9/up/" + prefix),
    ]

    async def main() -> None:
        storage = make_storage(env={**s3_env, "AZURE_STORAGE_CONNECTION_STRING": azurite})
        await storage.start()
        try:
            for spec in specs:
                with pytest.raises(BadRequestError):
                    await storage.upload(out, spec, filename)
        finally:
            await storage.close()

    asyncio.run(main())


def test_hf_fast_transfers_follow_what_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """hf_xet is reported when installed (huggingface_hub uses it by itself); hf_transfer is
    switched on when installed and the huggingface_hub version still knows it."""
    import importlib.util

    from huggingface_hub import constants

    from comfy_sidecar.storage.backends.hf import fast_transfers

    real = importlib.util.find_spec
    xet = ["hf_xet"] if real("hf_xet") is not None else []
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setattr(constants, "HF_HUB_ENABLE_HF_TRANSFER", False, raising=False)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "hf_transfer" else real(name, *a),
    )
    assert fast_transfers() == [*xet, "hf_transfer"]
    assert constants.HF_HUB_ENABLE_HF_TRANSFER is True
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delattr(constants, "HF_HUB_ENABLE_HF_TRANSFER")  # huggingface_hub >= 1.0
    assert fast_transfers() == []
