"""The job model as the Comfy API v2 shows it (comfy_sidecar/http/adapters/comfy_v2/views.py):
statuses, progress snapshots, errors, outputs as signed assets, and the SSE mapping; each body
checked against comfy-sdk's own pydantic models (comfy_low.models), the v2 spec."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from comfy_low.models import Job as SdkJob
from comfy_low.models import LogEvent, PreviewEvent, StatusEvent
from comfy_low.models import Output as SdkOutput
from comfy_low.models import Progress as SdkProgress

from comfy_sidecar.assets.signing import UrlSigner
from comfy_sidecar.http.adapters.comfy_v2.assets import output_asset_id, parse_output_asset_id
from comfy_sidecar.http.adapters.comfy_v2.views import (
    EventMapper,
    job_error,
    output_type,
    progress_of,
    v2_job,
    v2_status,
)
from comfy_sidecar.jobs.model import JobStatus, JobView, OutputInfo, ms_of

SIGNER = UrlSigner("secret", 600)
ORIGIN = "http://sidecar.test:3000"


def view(status: JobStatus = JobStatus.IN_PROGRESS, **fields: Any) -> JobView:
    base: dict[str, Any] = {
        "id": "job-1",
        "status": status,
        "endpoint": "comfy_v2",
        "created_at": "2026-01-01T00:00:00.000+00:00",
    }
    return JobView(**{**base, **fields})


def output(index: int = 0, name: str = "a.png", mime: str = "image/png", **kw: Any) -> OutputInfo:
    return OutputInfo(
        node_id="9",
        filename=name,
        media_type=mime.split("/")[0] if mime.split("/")[0] in ("image", "text") else "other",
        mime_type=mime,
        size_bytes=10,
        url=f"/jobs/job-1/outputs/{index}",
        **kw,
    )


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (JobStatus.PENDING, "queued"),
        (JobStatus.IN_PROGRESS, "running"),
        (JobStatus.COMPLETED, "succeeded"),
        (JobStatus.FAILED, "failed"),
        (JobStatus.CANCELLED, "canceled"),
        (JobStatus.TIMED_OUT, "expired"),
    ],
)
def test_statuses(status: JobStatus, expected: str) -> None:
    assert v2_status(view(status)) == expected


def test_a_cancel_that_reached_a_running_job_is_canceling_until_it_ends() -> None:
    assert v2_status(view(JobStatus.IN_PROGRESS, cancel_requested=True)) == "canceling"
    assert v2_status(view(JobStatus.CANCELLED, cancel_requested=True)) == "canceled"
    assert v2_status(view(JobStatus.COMPLETED, cancel_requested=True)) == "succeeded"


def test_progress_is_a_complete_snapshot() -> None:
    fields = {
        "progress": 42.5,
        "progress_value": 21.0,
        "progress_max": 50.0,
        "nodes_done": 11,
        "nodes_total": 31,
        "current_node": "12",
        "current_node_type": "KSampler",
    }
    progress = progress_of(fields)
    assert msgspec.to_builtins(progress) == {
        "value": 0.425,
        "nodes_done": 11,
        "nodes_total": 31,
        "current_node": "12",
        "current_node_class": "KSampler",
        "step": 21,
        "steps": 50,
        "message": "KSampler 21/50",
    }
    SdkProgress.model_validate(msgspec.to_builtins(progress))
    idle = progress_of({"progress": 0.0, "nodes_total": 3, "current_node_type": "SaveImage"})
    assert (idle.step, idle.steps, idle.message, idle.value) == (None, None, "SaveImage", 0.0)


def test_the_error_of_a_node_that_raised() -> None:
    failed = view(
        JobStatus.FAILED,
        error={
            "error": "ComfyUI execution error",
            "id": "job-1",
            "node_id": "7",
            "node_type": "KSampler",
            "exception_type": "RuntimeError",
            "exception_message": "boom",
            "traceback": ["  File x\n", "    raise\n"],
        },
    )
    error = job_error(failed)
    assert error is not None
    assert (error.code, error.message, error.node_id, error.class_type) == (
        "node_execution_error",
        "boom",
        "7",
        "KSampler",
    )
    assert error.traceback == "  File x\n    raise\n"
    assert error.details == {"exception_type": "RuntimeError"}


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (JobStatus.CANCELLED, {"error": "interrupted"}, "canceled"),
        (JobStatus.TIMED_OUT, {"error": "too long"}, "timeout"),
        (JobStatus.FAILED, {"error": "gone", "reason": "comfyui_exited"}, "comfyui_exited"),
        (
            JobStatus.FAILED,
            {"error": "Prompt outputs failed validation", "node_errors": {"3": {}}},
            "invalid_workflow",
        ),
        (JobStatus.FAILED, {"error": "outputs too large"}, "execution_failed"),
    ],
)
def test_error_codes(status: JobStatus, error: dict[str, Any], code: str) -> None:
    found = job_error(view(status, error=error))
    assert found is not None and found.code == code and found.message == error["error"]


def test_no_error_while_running_or_once_succeeded() -> None:
    assert job_error(view(JobStatus.IN_PROGRESS)) is None
    assert job_error(view(JobStatus.COMPLETED)) is None


@pytest.mark.parametrize(
    ("name", "mime", "kind"),
    [
        ("a.png", "image/png", "image"),
        ("a.txt", "text/plain", "text"),
        ("a.latent", "application/octet-stream", "latent"),
        ("a.bin", "application/octet-stream", "file"),
    ],
)
def test_output_types(name: str, mime: str, kind: str) -> None:
    assert output_type(output(name=name, mime=mime)) == kind


def test_output_asset_ids() -> None:
    assert output_asset_id("job-1", 3) == "job-1.3"
    assert parse_output_asset_id("job-1.3") == ("job-1", 3)
    for bad in ("job-1", ".3", "job-1.x", "job-1.-1", "9f8a1c0d-2b3e-4f56-8a7b-1c2d3e4f5a6b"):
        assert parse_output_asset_id(bad) is None


def test_a_job_is_what_the_sdk_reads() -> None:
    ended = view(
        JobStatus.COMPLETED,
        started_at="2026-01-01T00:00:01.000+00:00",
        completed_at="2026-01-01T00:00:03.500+00:00",
        progress=100.0,
        nodes_total=3,
        nodes_done=3,
        outputs=[output(0, hash="blake3:" + "a" * 64)],
        metadata={"client": "acme"},
    )
    job = v2_job(ended, SIGNER, ORIGIN, retention_s=3600)
    body = msgspec.to_builtins(job)
    model = SdkJob.model_validate(body)
    assert model.status.value == "succeeded" and model.progress is not None
    assert model.progress.value == 1.0
    assert ms_of(body["expires_at"]) == ms_of(ended.completed_at) + 3_600_000  # type: ignore[operator]
    assert body["metrics"] == {"queue_ms": 1000, "execution_ms": 2500}
    assert body["metadata"] == {"client": "acme"} and body["queue_position"] is None
    out = SdkOutput.model_validate(body["outputs"][0])
    assert out.id == "job-1.0" and out.hash == "blake3:" + "a" * 64 and out.job_id == "job-1"
    url = str(out.url)
    assert url.startswith(f"{ORIGIN}/api/v2/assets/job-1.0/content?exp=")
    query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
    SIGNER.verify("job-1.0", query["exp"], query["sig"])
    queued = msgspec.to_builtins(
        v2_job(view(JobStatus.PENDING, queue_position=2), SIGNER, ORIGIN, 60)
    )
    assert queued["queue_position"] == 2 and queued["status"] == "queued"


def test_the_stream_of_a_job() -> None:
    mapper = EventMapper("job-1", SIGNER, ORIGIN)
    start = mapper.snapshot(view(JobStatus.PENDING, queue_position=1))
    assert start == [("status", {"status": "queued", "queue_position": 1})]
    assert mapper.logged("status", {"status": "pending"}) == [], "a status is sent once"
    assert mapper.logged("status", {"status": "in_progress"}) == [
        ("status", {"status": "running", "queue_position": None})
    ]
    canceling = mapper.logged("status", {"status": "in_progress", "cancel_requested": True})
    assert [kind for kind, _ in canceling] == ["status", "log"]
    LogEvent.model_validate(canceling[1][1])
    progress = mapper.logged("progress", {"progress": 50.0, "nodes_total": 2, "nodes_done": 1})
    assert progress[0][0] == "progress" and progress[0][1].value == 0.5
    first = mapper.output(0, output(0))
    assert first[0][0] == "output" and mapper.output(0, output(0)) == [], "each output once"
    failed = view(
        JobStatus.FAILED,
        outputs=[output(0), output(1, name="b.png")],
        error={"error": "boom", "node_id": "9", "node_type": "SaveImage"},
        progress=50.0,
    )
    end = mapper.ended(failed)
    kinds = [kind for kind, _ in end]
    assert kinds == ["output", "progress", "log", "status"], end
    assert end[0][1].id == "job-1.1", "only the output not sent yet"
    assert end[2][1] == {"level": "error", "message": "node_execution_error: boom"}
    for kind, body in [*start, *end]:
        if kind == "status":
            StatusEvent.model_validate(body)
    assert end[-1][1]["status"] == "failed"
    preview = mapper.preview({"node_id": "3", "mime_type": "image/jpeg", "data": "AAAA"})
    PreviewEvent.model_validate(preview[1])
