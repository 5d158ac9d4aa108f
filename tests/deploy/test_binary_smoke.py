"""Smoke suite against the frozen binary dist/comfy-sidecar: what a missing hidden import or
data file would break. The binary runs with the ComfyUI double as CMD: a prompt with a base64
input, an upload to moto's S3 server, a signed webhook, a manifest that installs a model, the
jobs' traces exported to an OTLP/HTTP receiver (the SDK configured from OTEL_*), and SIGTERM ->
exit 0.

`scripts/test.sh` (and so CI) builds the binary before the tests; skipped with the reason when
it was not built or is older than the sources (a plain `pytest` during development).
"""

from __future__ import annotations

import base64
import io
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from comfy_sidecar.http.app import DOCS_ASSETS, DOCS_ASSETS_PATH
from tests.conftest import Backend, make_sidecar, png_bytes
from tests.deploy.test_binary import BINARY, REASON
from tests.otlp_server import OtlpServer
from tests.receiver import Receiver
from tests.storage.conftest import moto_server  # noqa: F401 - fixture
from tests.storage.servers import FileServer

pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
    pytest.mark.sidecar_process,  # the binary is a process
]

SECRET = base64.b64encode(b"binary smoke secret").decode()


def test_frozen_binary_end_to_end(
    tmp_path: Path,
    moto_server: str,  # noqa: F811 - the imported fixture
    tiny_model: Path,
) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="smoke")
    files = FileServer()
    files.files["tiny.safetensors"] = tiny_model.read_bytes()
    hook = Receiver()
    otlp = OtlpServer()
    backend = Backend("double", tmp_path / "comfy")
    manifest = {
        "models": {
            "before_start": [
                {
                    "url": files.url("/files/tiny.safetensors"),
                    "local_path": str(
                        backend.base / "models" / "upscale_models" / "from-manifest.safetensors"
                    ),
                }
            ]
        }
    }
    sidecar = make_sidecar(
        backend,
        tmp_path,
        MANIFEST_JSON=json.dumps(manifest),
        WEBHOOK_SECRET=SECRET,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=moto_server,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
        OTEL_SERVICE_NAME="frozen-sidecar",
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    sidecar.start(binary=BINARY)
    try:
        sidecar.wait_ready(60)
        assert (backend.base / "models" / "upscale_models" / "from-manifest.safetensors").exists()
        image = base64.b64encode(png_bytes((10, 6))).decode()
        prompt = {
            "1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {
                "class_type": "UpscaleModelLoader",
                "inputs": {"model_name": "from-manifest.safetensors"},
            },
            "3": {
                "class_type": "ImageUpscaleWithModel",
                "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]},
            },
            "4": {
                "class_type": "SaveImage",
                "inputs": {"images": ["3", 0], "filename_prefix": "bin"},
            },
        }
        sync = sidecar.post(
            "/prompt",
            json={"prompt": prompt, "id": "bin-sync", "convert_output": {"format": "webp"}},
        )
        assert sync.status_code == 200, sync.text
        from PIL import Image

        out = Image.open(io.BytesIO(base64.b64decode(sync.json()["images"][0])))
        assert out.format == "WEBP" and out.size == (20, 12)

        uploaded = sidecar.post(
            "/prompt",
            json={"prompt": prompt, "id": "bin-s3", "s3": {"bucket": "smoke", "prefix": "o"}},
        )
        assert uploaded.status_code == 200, uploaded.text
        assert uploaded.json()["images"] == ["s3://smoke/o/bin-s3_bin_00001_.png"]
        assert s3.head_object(Bucket="smoke", Key="o/bin-s3_bin_00001_.png")["ContentLength"] > 0
        spans = otlp.wait_spans(
            lambda spans: any(s.attributes.get("job.id") == "bin-s3" for s in spans),
            what="the trace of job bin-s3",
        )
        (root,) = [s for s in spans if s.attributes.get("job.id") == "bin-s3"]
        assert root.resource["service.name"] == "frozen-sidecar"
        names = {s.name for s in otlp.trace(root.trace_id)}
        assert {"prepare", "comfyui.execute", "comfyui.node", "upload"} <= names

        accepted = sidecar.post(
            "/prompt", json={"prompt": prompt, "id": "bin-hook", "webhook_v2": hook.url}
        )
        assert accepted.status_code == 202
        (request,) = hook.wait_for(1, timeout=60)
        body: dict[str, Any] = Webhook(SECRET).verify(request.body, request.headers)
        assert body["type"] == "prompt.complete" and body["id"] == "bin-hook"

        assert sidecar.get("/docs").status_code == 200
        for name in DOCS_ASSETS:  # Swagger UI's files, frozen in: /docs works offline
            assert sidecar.get(f"{DOCS_ASSETS_PATH}/{name}").status_code == 200, name
        assert sidecar.get("/openapi.json").json()["info"]["title"] == "comfy-sidecar"
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.wait_exit(60) == 0
    finally:
        sidecar.stop()
        files.stop()
        hook.stop()
        otlp.stop()
