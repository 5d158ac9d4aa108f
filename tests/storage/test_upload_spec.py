"""``Storage.upload_spec``: the upload block a URL prefix (JOB_OUTPUT_URL) names, routed as
downloads are, and where a file then lands (``upload_url``)."""

from __future__ import annotations

from typing import Any

import pytest

from comfy_sidecar.schemas import AzureBlobUpload, HFUpload, HTTPUpload, S3Upload
from comfy_sidecar.storage import BadRequestError

ACCOUNT = "https://acct.blob.core.windows.net"


@pytest.mark.parametrize(
    ("prefix", "spec", "url"),
    [
        ("s3://b/out/", S3Upload(bucket="b", prefix="out"), "s3://b/out/x.png"),
        ("s3://b", S3Upload(bucket="b", prefix=""), "s3://b/x.png"),
        (
            "https://huggingface.co/datasets/org/outs/resolve/main/jobs",
            HFUpload(repo="org/outs", repo_type="dataset", revision="main", directory="jobs"),
            "https://huggingface.co/datasets/org/outs/resolve/main/jobs/x.png",
        ),
        (
            f"{ACCOUNT}/box/jobs/a",
            AzureBlobUpload(container="box", blob_prefix="jobs/a"),
            f"{ACCOUNT}/box/jobs/a/x.png",
        ),
        (
            "https://put.example.com/up/",
            HTTPUpload(url_prefix="https://put.example.com/up"),
            "https://put.example.com/up/x.png",
        ),
    ],
)
def test_a_prefix_names_its_backends_upload_block(
    make_storage: Any, prefix: str, spec: Any, url: str
) -> None:
    storage = make_storage(env={"AZURE_STORAGE_ACCOUNT": "acct"})
    assert storage.upload_spec(prefix) == spec
    assert storage.upload_url(spec, "x.png") == url


@pytest.mark.parametrize("prefix", ["ftp://host/x", "s3:///nobucket", "file:///tmp"])
def test_a_prefix_no_backend_takes_is_refused(make_storage: Any, prefix: str) -> None:
    with pytest.raises(BadRequestError):
        make_storage().upload_spec(prefix)
