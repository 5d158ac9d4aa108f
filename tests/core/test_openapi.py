"""The API documents itself: /docs (Swagger UI), /openapi.json valid OpenAPI 3.1, and the app
answers what it documents (schemathesis against a sidecar in front of the ComfyUI double)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from comfy_sidecar import __version__
from tests.conftest import ROOT, Backend, Sidecar


@pytest.fixture(scope="module")
def documented(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import make_sidecar

    tmp = tmp_path_factory.mktemp("openapi")
    sidecar = make_sidecar(
        Backend("double", tmp / "comfy"),
        tmp,
        WORKFLOW_DIR=str(ROOT / "workflows"),
        LOG_LEVEL="warn",
        PROMPT_TIMEOUT_S="20",
    )
    sidecar.start()
    try:
        sidecar.wait_ready()
        yield sidecar
    finally:
        sidecar.stop()


def test_openapi_document_is_valid_and_complete(documented: Sidecar) -> None:
    document = documented.get("/openapi.json").json()
    validate(document)
    assert document["info"]["version"] == __version__
    paths = document["paths"]
    for path in (
        "/health",
        "/ready",
        "/prompt",
        "/interrupt",
        "/workflow/upscale",
        "/workflow/sd1.5/txt2img",
        "/workflow/sdxl/img2img",
        "/workflow/flux/txt2img",
    ):
        assert path in paths, path
    request = document["components"]["schemas"]["PromptRequest"]
    assert {
        "prompt",
        "id",
        "webhook",
        "webhook_v2",
        "convert_output",
        "credentials",
        "s3",
        "hf_upload",
        "azure_blob_upload",
        "http_upload",
    } <= set(request["properties"])
    responses = paths["/prompt"]["post"]["responses"]
    assert {"200", "202", "400", "499", "500", "503"} <= set(responses)
    assert documented.get("/docs").headers["content-type"].startswith("text/html")


def test_schemathesis_finds_no_server_error_or_schema_break(
    documented: Sidecar, tmp_path: Path
) -> None:
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    result = subprocess.run(
        [
            st,
            "run",
            documented.url + "/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            "10",
            # Schemathesis 4's phases but its "coverage" one, which ignores --max-examples: it
            # sent 6,440 of the 6,786 requests, 95% of this test's time.
            "--phases",
            "examples,fuzzing,stateful",
            "--request-timeout",
            "30",
            "--no-color",
            "--seed",
            "20261120",
            "--exclude-path",
            "/download/{key}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-6000:]
