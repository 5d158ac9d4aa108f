"""OpenTelemetry traces (issue 23) against a real OTLP/HTTP endpoint: the sidecar runs as a
process exporting to tests/otlp_server.py, which decodes the protobuf with
``opentelemetry-proto``. One trace per job: its span tree (a URL input downloaded, three
nodes run, outputs uploaded to S3 (moto), a webhook), the cache hit and cached nodes of the
same job again, a failed node, a queue-mode job claimed by another replica, and the
traceparent every outgoing call carries. The span tree of the first job is printed (run with
``-s``; the README shows it)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from comfy_sidecar import __version__
from comfy_sidecar.observability import tracing
from tests.conftest import BACKENDS, ROOT, Backend, Sidecar, make_sidecar, running_sidecar
from tests.conftest import png_bytes as make_png
from tests.otlp_server import Got, OtlpServer, children, tree
from tests.receiver import Receiver
from tests.redis_server import RedisServer, redis_server
from tests.storage.conftest import moto_server
from tests.storage.servers import FileServer

# The SDK reads OTEL_* from the process's environment and tracing is set up once per process:
# every sidecar here is a process of its own.
pytestmark = pytest.mark.sidecar_process

__all__ = ["moto_server", "redis_server"]  # fixtures, used by name

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
BUCKET = "traces"
#: Exports every 50 ms, so a test waits for spans, not for the SDK's 5 s default.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50", "LOG_FORMAT": "json"}


@pytest.fixture
def otlp() -> Iterator[OtlpServer]:
    server = OtlpServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    server = FileServer()
    server.files["red.png"] = make_png((18, 10), (200, 30, 10))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3(moto_server: str) -> Any:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    return client


def s3_env(moto_server: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_server,
    }


def invert(image: str, prefix: str = "traced") -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def job_root(otlp: OtlpServer, job_id: str, name: str = "job") -> Got:
    """The root span of job ``job_id`` once it arrived (it ends with the job)."""
    spans = otlp.wait_spans(
        lambda spans: any(s.name == name and s.attributes.get("job.id") == job_id for s in spans),
        what=f"the {name} span of {job_id}",
    )
    return next(s for s in spans if s.name == name and s.attributes.get("job.id") == job_id)


def named(spans: list[Got], parent: Got) -> list[str]:
    return [s.name for s in children(spans, parent.span_id)]


def only(spans: list[Got], parent: Got, name: str) -> Got:
    (found,) = [s for s in children(spans, parent.span_id) if s.name == name]
    return found


def traceparent_of(span: Got) -> str:
    return f"00-{span.trace_id}-{span.span_id}-01"


def within(child: Got, parent: Got) -> bool:
    return parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns


def json_logs(sidecar: Sidecar) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sidecar.log().splitlines() if line.startswith("{")]


def comfy_extra_data(sidecar: Sidecar, prompt_id: str) -> dict[str, Any]:
    """The ``extra_data`` ComfyUI keeps with a prompt (its history's ``prompt[3]``)."""
    history = httpx.get(f"http://127.0.0.1:{sidecar.comfy_port}/history/{prompt_id}", timeout=5)
    extra: dict[str, Any] = history.json()[prompt_id]["prompt"][3]
    return extra


@pytest.mark.parametrize("kind", BACKENDS)
def test_span_tree_of_a_job(
    kind: str,
    tmp_path: Path,
    otlp: OtlpServer,
    files: FileServer,
    s3: Any,
    moto_server: str,
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver()
    # Credentials in the URL: sent to the server, never put on a span.
    url = files.url("/files/red.png").replace("://", "://reader:s3cret@", 1)
    upload = {"bucket": BUCKET, "prefix": f"{kind}/"}
    with running_sidecar(
        kind,
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
        **FAST_EXPORT,
        **s3_env(moto_server),
    ) as sidecar:
        first = sidecar.post(
            "/prompt",
            json={"prompt": invert(url), "id": "traced", "s3": upload, "webhook_v2": hook.url},
            headers={"traceparent": TRACEPARENT},
        )
        assert first.status_code == 202, first.text
        (delivered,) = hook.wait_for(1, timeout=60)
        root = job_root(otlp, "traced")
        otlp.wait_spans(
            lambda spans: any(s.name == "webhook" for s in spans), what="the webhook span"
        )
        # The same job again (its id reused once it ended): the download is a cache hit and
        # ComfyUI serves the nodes before SaveImage from its cache.
        again = sidecar.post("/prompt", json={"prompt": invert(url), "id": "traced", "s3": upload})
        assert again.status_code == 200, again.text
        otlp.wait_spans(
            lambda spans: any(s.name == "job" and s.trace_id != TRACE_ID for s in spans),
            what="the second job's span",
        )
        (second_root,) = [s for s in otlp.received() if s.name == "job" and s.trace_id != TRACE_ID]
        execute = only(otlp.trace(TRACE_ID), root, "comfyui.execute")
        extra = comfy_extra_data(sidecar, execute.attributes["comfyui.prompt_id"])
        logs = json_logs(sidecar)

    trace = otlp.trace(TRACE_ID)
    print(f"\nspan tree of one job ({kind} ComfyUI):\n{tree(trace, root)}")
    # One trace, continuing the caller's: the root's parent is the caller's span.
    assert root.parent_id == CALLER_SPAN and root.kind == "server"
    assert root.attributes["job.endpoint"] == "prompt" and not root.failed
    assert root.resource["service.name"] == "comfy-sidecar"
    assert root.resource["service.version"] == __version__
    assert {s.trace_id for s in trace} == {TRACE_ID}
    ids = {s.span_id for s in trace}
    assert all(s.parent_id in ids for s in trace if s is not root), tree(trace, root)
    assert named(trace, root) == [
        "prepare",
        "queue.wait",
        "comfyui.execute",
        "outputs.collect",
        "upload",
        "webhook",
    ], tree(trace, root)
    assert all(within(s, root) for s in children(trace, root.span_id) if s.name != "webhook")
    assert not any(s.failed for s in trace), tree(trace, root)

    prepare = only(trace, root, "prepare")
    (download,) = children(trace, prepare.span_id)
    assert download.name == "download" and within(download, prepare)
    assert download.attributes["url.full"] == files.url("/files/red.png")
    assert "s3cret" not in json.dumps([s.attributes for s in trace])
    assert download.attributes["cache.hit"] is False
    assert download.attributes["download.bytes"] == len(files.files["red.png"])
    # The file server got the download span's traceparent.
    gets = [h for m, p, h in files.requests if m == "GET" and p == "/files/red.png"]
    assert {h.get("traceparent") for h in gets} == {traceparent_of(download)}

    assert extra["traceparent"] == traceparent_of(execute)  # ComfyUI's /prompt extra_data
    nodes = children(trace, execute.span_id)
    assert [n.name for n in nodes] == ["comfyui.node"] * 3
    assert [
        (n.attributes["comfyui.node.id"], n.attributes["comfyui.node.class_type"]) for n in nodes
    ] == [("1", "LoadImage"), ("2", "ImageInvert"), ("3", "SaveImage")]
    assert [n.attributes["comfyui.node.cached"] for n in nodes] == [False] * 3
    assert all(within(n, execute) for n in nodes)
    assert all(a.end_ns <= b.start_ns for a, b in itertools.pairwise(nodes))

    (collected,) = [s for s in trace if s.name == "outputs.collect"]
    assert collected.attributes["comfy_sidecar.outputs"] == 1
    upload_span = only(trace, root, "upload")
    key = upload_span.attributes["url.full"].removeprefix(f"s3://{BUCKET}/")
    assert key.startswith(f"{kind}/traced_")
    size = s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
    assert upload_span.attributes["upload.bytes"] == size

    webhook = only(trace, root, "webhook")
    assert webhook.kind == "client"
    assert webhook.attributes["url.full"] == hook.url
    assert webhook.attributes["webhook.attempt"] == 1
    assert webhook.attributes["http.response.status_code"] == 200
    assert delivered.headers["traceparent"] == traceparent_of(webhook)

    # The job's log records carry its trace id.
    records = [r for r in logs if r["job_id"] == "traced"]
    assert records and all(r["trace_id"] in (TRACE_ID, second_root.trace_id) for r in records)
    assert any(r["trace_id"] == TRACE_ID for r in records)
    assert any(r["trace_id"] == second_root.trace_id for r in records)

    # The second run: a new trace (no traceparent came), a cache hit, cached nodes.
    trace2 = otlp.trace(second_root.trace_id)
    assert second_root.parent_id == ""
    assert named(trace2, second_root) == [
        "prepare",
        "queue.wait",
        "comfyui.execute",
        "outputs.collect",
        "upload",
    ], tree(trace2, second_root)
    (hit,) = children(trace2, only(trace2, second_root, "prepare").span_id)
    assert hit.attributes["cache.hit"] is True
    assert hit.attributes["download.bytes"] == len(files.files["red.png"])
    nodes2 = children(trace2, only(trace2, second_root, "comfyui.execute").span_id)
    cached = {n.attributes["comfyui.node.id"]: n.attributes["comfyui.node.cached"] for n in nodes2}
    assert cached == {"1": True, "2": True, "3": False}, tree(trace2, second_root)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_failed_node_marks_its_span_with_the_error(
    kind: str, tmp_path: Path, otlp: OtlpServer
) -> None:
    with running_sidecar(
        kind, tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint, **FAST_EXPORT
    ) as sidecar:
        (sidecar.backend.input_dir / "broken.png").write_bytes(b"not an image at all")
        prompt = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
            },
            "2": save("1", "a"),
            "3": {"class_type": "LoadImage", "inputs": {"image": "broken.png"}},
            "4": save("3", "b"),
        }
        response = sidecar.post("/prompt", json={"prompt": prompt, "id": "broken"})
        assert response.status_code == 500, response.text
        root = job_root(otlp, "broken")
        input_dir = str(sidecar.backend.input_dir)

    trace = otlp.trace(root.trace_id)
    print(f"\nspan tree of a failed job ({kind} ComfyUI):\n{tree(trace, root)}")
    execute = only(trace, root, "comfyui.execute")
    nodes = children(trace, execute.span_id)
    failed = [n for n in nodes if n.failed]
    assert [n.attributes["comfyui.node.id"] for n in failed] == ["3"], tree(trace, root)
    (node,) = failed
    assert node.attributes["comfyui.node.class_type"] == "LoadImage"
    (event,) = [attrs for name, attrs in node.events if name == "exception"]
    assert event["exception.type"] == "PIL.UnidentifiedImageError"
    assert "cannot identify image file" in event["exception.message"]
    assert node.status_message.startswith("PIL.UnidentifiedImageError: ")
    assert input_dir not in node.status_message  # server paths are scrubbed
    assert "<INPUT_DIR>" in node.status_message
    # The nodes that ran before it did not fail; the execution and the job did.
    assert all(not n.failed for n in nodes if n is not node)
    assert execute.failed and root.failed
    assert "ExecutionFailed" in root.status_message
    assert not only(trace, root, "prepare").failed


def submitter_and_runner(
    spawn: Callable[..., Sidecar], tmp_path: Path, env: dict[str, str]
) -> tuple[Sidecar, Sidecar]:
    """Two replicas on one queue: one that takes requests but claims nothing (its ComfyUI stops
    taking websockets, so it is not ready), and one that runs what the first submits."""
    submitter = spawn(Backend("double", tmp_path / "comfy-a"), **env)
    submitter.wait_ready()
    comfy_a = f"http://127.0.0.1:{submitter.comfy_port}/__double__"
    httpx.post(f"{comfy_a}/refuse_websockets", json={"refused": True}, timeout=5)
    httpx.post(f"{comfy_a}/drop_websockets", timeout=5)
    submitter.wait_status("/ready", 503, 30)
    runner = spawn(Backend("double", tmp_path / "comfy-b"), **env)
    runner.wait_ready()
    return submitter, runner


def test_a_queued_job_claimed_by_another_replica_is_one_trace(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    otlp: OtlpServer,
    receiver: Callable[..., Receiver],
) -> None:
    hook = receiver()
    env = {
        "JOB_QUEUE_URL": redis_server.url,
        "JOB_LEASE_S": "2",
        "SHUTDOWN_GRACE_S": "5",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        **FAST_EXPORT,
    }
    submitter, runner = submitter_and_runner(spawn, tmp_path, env)

    response = submitter.post(
        "/jobs",
        json={"prompt": invert_empty(), "id": "queued", "webhook_v2": hook.url},
        headers={"traceparent": TRACEPARENT},
    )
    assert response.status_code == 202, response.text
    (delivered,) = hook.wait_for(1, timeout=60)
    root = job_root(otlp, "queued")
    submit = job_root(otlp, "queued", "job.submit")
    trace = otlp.wait_spans(
        lambda spans: any(s.name == "webhook" and s.trace_id == TRACE_ID for s in spans),
        what="the webhook span",
    )
    trace = otlp.trace(TRACE_ID)
    print(f"\nspan tree of a queued job:\n{tree(trace, submit)}")
    assert submit.parent_id == CALLER_SPAN and submit.kind == "producer"
    assert root.parent_id == submit.span_id and root.kind == "consumer"
    assert root.trace_id == submit.trace_id == TRACE_ID
    # Two processes: the submitter's span and the runner's are from different instances.
    assert submit.resource["service.instance.id"] != root.resource["service.instance.id"]
    assert {s.resource["service.instance.id"] for s in trace if s is not submit} == {
        root.resource["service.instance.id"]
    }
    assert named(trace, root) == [
        "prepare",
        "queue.wait",
        "comfyui.execute",
        "outputs.collect",
        "webhook",
    ], tree(trace, submit)
    assert len(children(trace, only(trace, root, "comfyui.execute").span_id)) == 2
    assert delivered.headers["traceparent"] == traceparent_of(only(trace, root, "webhook"))
    # The runner's log records of the job carry the caller's trace id.
    records = [r for r in json_logs(runner) if r["job_id"] == "queued"]
    assert records and all(r["trace_id"] == TRACE_ID for r in records)


def save(node: str, prefix: str) -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": [node, 0], "filename_prefix": prefix}}


def invert_empty() -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "q"}},
    }


def test_queue_mode_without_tracing_carries_the_callers_traceparent(
    redis_server: RedisServer,
    spawn: Callable[..., Sidecar],
    tmp_path: Path,
    receiver: Callable[..., Receiver],
) -> None:
    """Tracing off: the replica that runs a queued job logs the caller's trace id and sends
    the caller's traceparent on the job's webhook, as the submitting replica would."""
    hook = receiver()
    env = {"JOB_QUEUE_URL": redis_server.url, "LOG_FORMAT": "json", "SHUTDOWN_GRACE_S": "5"}
    submitter, runner = submitter_and_runner(spawn, tmp_path, env)
    response = submitter.post(
        "/jobs",
        json={"prompt": invert_empty(), "id": "plain", "webhook_v2": hook.url},
        headers={"traceparent": TRACEPARENT},
    )
    assert response.status_code == 202, response.text
    (delivered,) = hook.wait_for(1, timeout=60)
    assert delivered.headers["traceparent"] == TRACEPARENT
    records = [r for r in json_logs(runner) if r["job_id"] == "plain"]
    assert records and all(r["trace_id"] == TRACE_ID for r in records)


def test_tracing_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    """Without an endpoint nothing of OpenTelemetry (nor protobuf) is imported, also once
    the whole sidecar is built as ``__main__`` builds it; with one, setup imports the
    SDK."""
    sidecar = make_sidecar(Backend("double", tmp_path / "comfy"), tmp_path)
    code = (
        "import sys, asyncio\n"
        "from comfy_sidecar.__main__ import skip_unused_imports\n"
        "skip_unused_imports()\n"
        "from comfy_sidecar.config import load_settings\n"
        "from comfy_sidecar.observability import tracing\n"
        "from comfy_sidecar.runtime.container import build\n"
        "from comfy_sidecar.http.app import create_app\n"
        "import comfy_sidecar.runtime.lifecycle\n"
        "async def main():\n"
        "    create_app(build(load_settings()))\n"
        "asyncio.run(main())\n"
        "on = tracing.setup('test')\n"
        "print(on, sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'google'))))\n"
    )
    env = {k: v for k, v in sidecar.env.items() if not k.startswith("OTEL_")}
    off = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "False []"
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
    on = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert on.returncode == 0, on.stderr
    assert on.stdout.startswith("True [") and "opentelemetry.sdk.trace" in on.stdout


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_tracing_is_on_only_with_an_endpoint(env: dict[str, str], on: bool) -> None:
    assert tracing.configured(env) is on


def test_helpers_do_nothing_when_tracing_is_off() -> None:
    assert not tracing.enabled()
    assert tracing.job_span("job", TRACEPARENT) is tracing.NO_SPAN
    with tracing.span("prepare") as span:
        assert span is tracing.NO_SPAN
        assert tracing.current() is tracing.NO_SPAN
    assert tracing.start("x") is tracing.NO_SPAN
    assert tracing.use(tracing.NO_SPAN) is tracing.NO_SPAN
    assert tracing.traceparent() is None


def finished_spans() -> list[Any]:
    """Spans of every shape the sidecar makes, and more: a remote parent with a tracestate,
    attributes of every type, an exception event, statuses, kinds, two instrumentation
    scopes, two resources."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    memory = InMemorySpanExporter()
    remote = TraceContextTextMapPropagator().extract(
        {"traceparent": TRACEPARENT, "tracestate": "vendor=a,other=b"}
    )
    for name in ("first", "second"):
        provider = TracerProvider(
            resource=Resource.create({"service.name": name, "n": 3}), shutdown_on_exit=False
        )
        provider.add_span_processor(SimpleSpanProcessor(memory))
        for scope in ("comfy_sidecar", "other"):
            tracer = provider.get_tracer(scope, "1.2" if scope == "other" else None)
            root = tracer.start_span(
                "job",
                context=remote,
                kind=SpanKind.SERVER,
                attributes={
                    "text": "ü€ \x00",
                    "empty": "",
                    "yes": True,
                    "no": False,
                    "zero": 0,
                    "negative": -7,
                    "large": 2**62,
                    "ratio": 0.25,
                    "strings": ["a", "b"],
                    "ints": [1, -2],
                    "flags": [True, False],
                },
            )
            root.add_event("exception", {"exception.type": "X", "exception.message": "m"})
            root.set_status(Status(StatusCode.ERROR, "it failed"))
            for kind in (SpanKind.INTERNAL, SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER):
                child = tracer.start_span(
                    "comfyui.node",
                    context=set_span_in_context(root),
                    kind=kind,
                    attributes={"comfyui.node.id": "1", "comfyui.node.cached": kind.value > 1},
                    start_time=1_000,
                )
                child.set_status(Status(StatusCode.OK))
                child.end(end_time=2_000)
            root.end()
    return list(memory.get_finished_spans())


def test_an_ended_span_is_exported_as_it_ended(otlp: OtlpServer) -> None:
    """The batch processor holds the sidecar's Span itself and the exporter
    (span_export.SidecarSpans, in the exporter's thread, later) makes it the SDK's
    ReadableSpan for the SDK's OTLP/HTTP exporter: it is sent as it was when it ended (an
    attribute set or an end given afterwards is not), under the process's resource and scope,
    beside an SDK ReadableSpan of the same batch."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from comfy_sidecar.observability.span_export import SidecarSpans

    exporter = SidecarSpans(
        OTLPSpanExporter(endpoint=f"{otlp.endpoint}/v1/traces"),
        Resource({"service.name": "ours"}),
        InstrumentationScope("comfy_sidecar", "9"),
    )
    root = tracing.Span("job", 1, 0xABC, 0x1, None, True, None, {"job.id": "a"}, 1_000)
    child = tracing.Span("prepare", 0, 0xABC, 0x2, root, True, None, None, 2_000)
    child.set("before", 1)
    child.end(3_000)
    child.set("after", 2)
    child.end(5_000)
    root.end(4_000)
    sdk_span = finished_spans()[0]

    try:
        assert exporter.export([child, sdk_span, root]) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    received = otlp.received()
    ours = [s for s in received if s.resource == {"service.name": "ours"}]
    others = [s for s in received if s not in ours]
    assert {s.scope for s in ours} == {("comfy_sidecar", "9")}
    sent_child, sent_root = ours
    assert (sent_child.name, sent_child.start_ns, sent_child.end_ns) == ("prepare", 2_000, 3_000)
    assert sent_child.attributes == {"before": 1}
    assert sent_child.parent_id == sent_root.span_id == f"{1:016x}"
    assert sent_child.trace_id == sent_root.trace_id == f"{0xABC:032x}"
    assert (sent_root.name, sent_root.end_ns, sent_root.kind) == ("job", 4_000, "server")
    assert sent_root.attributes == {"job.id": "a"} and sent_root.parent_id == ""
    assert [s.name for s in others] == [sdk_span.name]
