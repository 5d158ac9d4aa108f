"""The Comfy API v2 jobs driven by the official comfy-sdk, the way its quickstart does:
``workflows.from_json`` -> ``run`` -> ``get_outputs(...).to_file`` (with a Range), ``events()``
with pattern matching, ``cancel``, ``list_jobs(metadata=...)``, an idempotent resubmit, and
every error class the SDK maps for the job routes. Against the ComfyUI double, and against a
real ComfyUI with COMFY_HOME (``-m real_comfyui``)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from blake3 import blake3
from comfy_sdk import exceptions as sdk_errors
from comfy_sdk.events import Log, OutputReady, Progress, StatusChange

from tests.conftest import Sidecar, slow_prompt
from tests.jobs.test_jobs_api import sse_events
from tests.v2.support import quickstart, sdk, sse, two_outputs
from tests.waiting import wait_for


def test_quickstart_run_then_download_with_a_range(shared_sidecar: Sidecar, tmp_path: Path) -> None:
    with sdk(shared_sidecar) as client:
        workflow = client.workflows.from_json(quickstart())
        job = client.run(workflow, timeout=120)
        assert job.status == "succeeded"
        outputs = job.get_outputs("3")
        assert len(outputs) == 1 and job.get_outputs("2") == []
        output = outputs[0]
        assert output.type == "image" and output.content_type == "image/png"
        assert output.job_id == job.id and output.id == f"{job.id}.0"
        path = output.to_file(tmp_path / "out.png")
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) == output.size_bytes
        assert output._model.hash == "blake3:" + blake3(data).hexdigest()
        assert output.to_bytes(range=(1, 3)) == b"PNG"
        assert str(output._model.url).startswith(shared_sidecar.url + "/api/v2/assets/")
        # The job rehydrated by id says the same, and its workflow is the one submitted.
        again = client.jobs.get(job.id)
        assert again.status == "succeeded" and [o.id for o in again.outputs] == [output.id]
        graph = again.get_workflow()
        assert graph.format == "api" and graph.graph == workflow.json
        body = shared_sidecar.get(f"/api/v2/jobs/{job.id}").json()
        for name in ("created_at", "started_at", "completed_at", "expires_at"):
            assert body[name].endswith("+00:00"), body
        assert body["progress"]["value"] == 1.0 and body["error"] is None
        assert body["urls"] == {
            "self": f"/api/v2/jobs/{job.id}",
            "events": f"/api/v2/jobs/{job.id}/events",
            "cancel": f"/api/v2/jobs/{job.id}/cancel",
        }


def test_events_are_typed_and_end_with_the_terminal_status(shared_sidecar: Sidecar) -> None:
    with sdk(shared_sidecar) as client:
        # A job queued behind another one: its stream starts at `queued`.
        ahead = client.submit(client.workflows.from_json(slow_prompt(blurs=2, size=1024)))
        job = client.submit(client.workflows.from_json(slow_prompt(blurs=3, size=1024)))
        seen: list[Any] = []
        for event in job.events():
            match event:
                case StatusChange(status=status):
                    seen.append(("status", status))
                case Progress(value=value, nodes_done=done, nodes_total=total):
                    seen.append(("progress", value, done, total))
                case OutputReady(output=output):
                    seen.append(("output", output.name, output.to_bytes()[:4]))
                case Log(level=level):
                    seen.append(("log", level))
        statuses = [entry[1] for entry in seen if entry[0] == "status"]
        assert statuses[0] == "queued" and statuses[-2:] == ["running", "succeeded"], seen
        assert seen[-1] == ("status", "succeeded"), "the stream ends with the terminal status"
        values = [entry[1] for entry in seen if entry[0] == "progress"]
        assert values == sorted(values) and values[-1] == 1.0, seen
        assert any(0.0 < value < 1.0 for value in values), "intermediate values"
        assert all(value < 1.0 for value in values[:-1]), "1 only at the end"
        totals = {entry[3] for entry in seen if entry[0] == "progress"}
        assert totals == {5}, seen
        outputs = [entry for entry in seen if entry[0] == "output"]
        assert len(outputs) == 1 and outputs[0][2] == b"\x89PNG", seen
        job.refresh()
        assert [o.name for o in job.outputs] == [outputs[0][1]]
        ahead.wait(timeout=120)


def test_outputs_appear_while_the_job_runs(shared_sidecar: Sidecar) -> None:
    with sdk(shared_sidecar) as client:
        job = client.submit(client.workflows.from_json(two_outputs()))
        order: list[str] = []
        for event in job.events():
            match event:
                case OutputReady(output=output) if "output 2" not in order:
                    # The early output is announced while the late node still runs: the job
                    # is running, lists it, and its bytes are served already.
                    now = client.jobs.get(job.id)
                    assert now.status == "running", now
                    assert [o.node_id for o in now.outputs] == ["2"]
                    assert output.node_id == "2" and output.to_bytes()[:4] == b"\x89PNG"
                    order.append("output 2")
                case OutputReady(output=output):
                    order.append(f"output {output.node_id}")
                case Progress():
                    if order and order[-1] != "progress":
                        order.append("progress")
                case StatusChange(status=status):
                    order.append(status)
        assert order[-1] == "succeeded"
        early, late = order.index("output 2"), order.index("output 9")
        assert "progress" in order[early:late], ("the late node ran after it", order)
        job.refresh()
        assert [(o.node_id, o.id) for o in job.outputs] == [
            ("2", f"{job.id}.0"),
            ("9", f"{job.id}.1"),
        ]
        # /jobs shows the same job the same way: the outputs in the order they were published.
        native = httpx.get(f"{shared_sidecar.url}/jobs/{job.id}").json()
        assert [o["node_id"] for o in native["outputs"]] == ["2", "9"]
        assert [o["url"] for o in native["outputs"]] == [
            f"/jobs/{job.id}/outputs/0",
            f"/jobs/{job.id}/outputs/1",
        ]
        # ... and its own stream announced each output once, as its final body lists them.
        events = sse_events(shared_sidecar, job.id)
        announced = [e["data"] for e in events if e["event"] == "output"]
        assert announced == native["outputs"] == events[-1]["data"]["outputs"]
        early = next(i for i, e in enumerate(events) if e["event"] == "output")
        assert any(e["event"] == "progress" for e in events[early:-1]), "announced while it ran"


def test_cancel_is_idempotent_and_an_ended_job_answers_itself(shared_sidecar: Sidecar) -> None:
    with sdk(shared_sidecar) as client:
        job = client.submit(client.workflows.from_json(slow_prompt(blurs=8, size=2048)))
        stream = shared_sidecar.client
        wait_for(
            lambda: client.jobs.get(job.id).status == "running",
            timeout=60,
            interval=0.05,
            what="the job to run",
        )
        job.cancel()
        assert job.status in ("canceling", "canceled")
        job.wait(timeout=60)
        assert job.status == "canceled"
        assert job.error is not None and job.error.code == "canceled"
        assert job.cancel().status == "canceled", "a second cancel answers the ended job"
        with pytest.raises(sdk_errors.JobFailed):
            job.result()
        # The stream of a cancelled job: canceling, then canceled, and it ends there.
        events = sse(
            stream, f"{shared_sidecar.url}/api/v2/jobs/{job.id}/events", {"last-event-id": "1"}
        )
        statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
        assert statuses[-2:] == ["canceling", "canceled"], events
        done = client.run(client.workflows.from_json(quickstart()), timeout=120)
        assert done.cancel().status == "succeeded"


def test_list_jobs_filters_by_metadata_newest_first(shared_sidecar: Sidecar) -> None:
    batch = uuid.uuid4().hex
    with sdk(shared_sidecar) as client:
        submitted = [
            client.submit(
                client.workflows.from_json(quickstart(size=16)),
                metadata={"batch": batch, "i": str(i)},
            )
            for i in range(3)
        ]
        client.submit(client.workflows.from_json(quickstart(size=16)), metadata={"batch": "x"})
        for job in submitted:
            job.wait(timeout=60)
        found = list(client.list_jobs(metadata={"batch": batch}, limit=2))  # two pages
        assert [s.id for s in found] == [j.id for j in reversed(submitted)]
        assert [s.metadata for s in found] == [{"batch": batch, "i": str(i)} for i in (2, 1, 0)]
        assert all(s.status == "succeeded" and s.create_time is not None for s in found)
        only = list(client.list_jobs(metadata={"batch": batch, "i": "1"}))
        assert [s.id for s in only] == [submitted[1].id]
        assert client.jobs.get(submitted[0].id).metadata == {"batch": batch, "i": "0"}


def test_an_idempotency_key_is_single_use(shared_sidecar: Sidecar) -> None:
    key = f"key-{uuid.uuid4()}"
    batch = uuid.uuid4().hex
    workflow = quickstart(size=16)
    with sdk(shared_sidecar) as client:
        first = client.submit(
            client.workflows.from_json(workflow), idempotency_key=key, metadata={"b": batch}
        )
        with pytest.raises(sdk_errors.IdempotencyKeyReuse) as reused:
            client.submit(
                client.workflows.from_json(workflow), idempotency_key=key, metadata={"b": batch}
            )
        assert reused.value.http_status == 422 and first.id in str(reused.value)
        assert [s.id for s in client.list_jobs(metadata={"b": batch})] == [first.id]
        # A refused submission leaves its key unused.
        other = f"key-{uuid.uuid4()}"
        with pytest.raises(sdk_errors.InvalidWorkflow):
            client.submit(client.workflows.from_json({"1": {"inputs": {}}}), idempotency_key=other)
        client.submit(client.workflows.from_json(workflow), idempotency_key=other).wait(timeout=60)


def test_the_sdk_raises_its_class_for_each_refusal(shared_sidecar: Sidecar) -> None:
    with sdk(shared_sidecar) as client:
        with pytest.raises(sdk_errors.InvalidWorkflow) as bad:
            client.submit(client.workflows.from_json({"1": {"class_type": "SaveImage"}}))
        assert bad.value.details["location"] == "workflow.1.inputs"
        no_output = quickstart()
        del no_output["3"]
        with pytest.raises(sdk_errors.InvalidWorkflow) as nothing_saved:
            client.submit(client.workflows.from_json(no_output))
        assert nothing_saved.value.details["location"] == "workflow"
        # The SDK refuses a full UI export itself; one without `last_node_id` reaches us.
        with pytest.raises(sdk_errors.WorkflowFormatUi):
            client.submit(client.workflows.from_json({"nodes": [], "links": []}))
        asset = {"__type": "core/ASSET", "info": {"id": str(uuid.uuid4())}}
        referring = quickstart()
        referring["4"] = {"class_type": "LoadImage", "inputs": {"image": asset}}
        with pytest.raises(sdk_errors.MissingAsset) as missing:
            client.submit(client.workflows.from_json(referring))
        assert missing.value.details["location"] == "workflow.4.inputs.image"
        with pytest.raises(sdk_errors.ComfyError) as labels:
            client.submit(client.workflows.from_json(quickstart()), metadata={"n": 1})  # type: ignore[dict-item]
        assert labels.value.code == "metadata_invalid" and labels.value.http_status == 422
        with pytest.raises(sdk_errors.NotFound):
            client.jobs.get(str(uuid.uuid4()))
        with pytest.raises(sdk_errors.ComfyError) as cursor, sdk_errors.translating():
            client._low.list_jobs(cursor="not-a-cursor")  # the SDK's own pages never do
        assert cursor.value.code == "invalid_cursor"
        # A job of another API is not a v2 job.
        native = httpx.post(f"{shared_sidecar.url}/jobs", json={"prompt": quickstart(size=8)})
        with pytest.raises(sdk_errors.NotFound):
            client.jobs.get(native.json()["id"])


def test_the_partner_key_reaches_comfyui_and_nothing_else(tmp_path: Path, spawn: Any) -> None:
    from tests.conftest import Backend

    sidecar = spawn(Backend("double", tmp_path / "comfy"))
    sidecar.wait_ready()
    secret = f"comfyui-{uuid.uuid4()}"
    with sdk(sidecar) as client:
        job = client.run(client.workflows.from_json(quickstart()), api_key=secret, timeout=60)
        answers = [
            sidecar.get(f"/api/v2/jobs/{job.id}").text,
            sidecar.get(f"/api/v2/jobs/{job.id}/workflow").text,
            sidecar.get(f"/jobs/{job.id}").text,
            str(
                sse(
                    sidecar.client,
                    f"{sidecar.url}/api/v2/jobs/{job.id}/events",
                    {"last-event-id": "0"},
                )
            ),
        ]
    keys = httpx.get(f"http://127.0.0.1:{sidecar.comfy_port}/__double__/partner_keys").json()
    assert hashlib.sha256(secret.encode()).hexdigest() in keys.values()
    for text in [*answers, sidecar.log()]:
        assert secret not in text


def test_comfyuis_refusal_answers_the_submission_with_its_node_errors(
    shared_sidecar: Sidecar,
) -> None:
    batch = uuid.uuid4().hex
    bad = quickstart()
    bad["1"]["inputs"]["width"] = "wide"
    with sdk(shared_sidecar) as client:
        with pytest.raises(sdk_errors.InvalidWorkflow) as refused:
            client.submit(client.workflows.from_json(bad), metadata={"b": batch})
        assert refused.value.http_status == 422
        node_errors = refused.value.details["node_errors"]
        assert node_errors["1"]["errors"][0]["type"] == "invalid_input_type", node_errors
        assert list(client.list_jobs(metadata={"b": batch})) == [], "no job was made"


def test_a_refusal_after_waiting_for_a_slot_fails_the_job(tmp_path: Path, spawn: Any) -> None:
    from tests.conftest import Backend

    sidecar = spawn(Backend("double", tmp_path / "comfy"), MAX_JOBS_PER_INSTANCE="1")
    sidecar.wait_ready()
    bad = quickstart()
    bad["1"]["inputs"]["width"] = "wide"
    with sdk(sidecar) as client:
        ahead = client.submit(client.workflows.from_json(slow_prompt(blurs=2, size=2048)))
        job = client.submit(client.workflows.from_json(bad))  # waits for the slot: 201
        assert job.status == "queued"
        job.wait(timeout=60)
        assert job.status == "failed" and job.error.code == "invalid_workflow"
        details = sidecar.get(f"/api/v2/jobs/{job.id}").json()["error"]["details"]
        assert details["node_errors"]["1"]["errors"][0]["type"] == "invalid_input_type"
        ahead.wait(timeout=60)
