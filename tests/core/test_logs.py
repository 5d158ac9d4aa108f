"""Logs (issue 14): LOG_FORMAT=json gives one object a line with ts, level, logger, msg,
job_id, prompt_id, instance, trace_id; ComfyUI's lines are records of logger ``comfyui`` with
their instance; a W3C traceparent reaches the request's logs and its webhook; text stays as it
was."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from comfy_sidecar.observability import logs
from tests.conftest import Backend, basic_prompt, make_sidecar
from tests.receiver import Receiver

FIELDS = ["ts", "level", "logger", "msg", "job_id", "prompt_id", "instance", "trace_id"]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def _capture(log_format: str, level: str = "info") -> tuple[io.StringIO, logging.Handler]:
    logs.setup_logging(level, log_format)
    handler = logging.getLogger().handlers[0]
    stream = io.StringIO()
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    return stream, handler


@pytest.fixture
def restore_logging() -> Any:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_json_record_takes_ids_from_the_context() -> None:
    stream, _ = _capture("json")

    async def job() -> None:
        logs.bind_traceparent(TRACEPARENT)
        with logs.job_scope():
            logs.bind_job("job-1", "prompt-1")
            logging.getLogger("comfy_sidecar.x").warning("hello %s", "there")
            # a task started here inherits the ids
            await asyncio.create_task(_log_in_task())
        logging.getLogger("comfy_sidecar.x").info("after the job")

    asyncio.run(job())
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(first) == FIELDS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first | {"ts": None} == {
        "ts": None,
        "level": "warn",
        "logger": "comfy_sidecar.x",
        "msg": "hello there",
        "job_id": "job-1",
        "prompt_id": "prompt-1",
        "instance": None,
        "trace_id": TRACE_ID,
    }
    assert (second["job_id"], second["instance"], second["msg"]) == ("job-1", "7", "in a task")
    assert (third["job_id"], third["prompt_id"], third["trace_id"]) == (None, None, TRACE_ID)


async def _log_in_task() -> None:
    logs.INSTANCE.set("7")
    logging.getLogger("comfyui").info("in a task")


@pytest.mark.usefixtures("restore_logging")
def test_json_record_with_a_traceback_and_unknown_ids() -> None:
    stream, _ = _capture("json", "trace")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("t").exception("failed")
    logging.getLogger("t").log(logs.TRACE, "fine detail")
    failed, fine = (json.loads(line) for line in stream.getvalue().splitlines())
    assert failed["level"] == "error" and "ValueError: boom" in failed["exc"]
    assert [failed[k] for k in ("job_id", "prompt_id", "instance", "trace_id")] == [None] * 4
    assert fine["level"] == "trace"


@pytest.mark.usefixtures("restore_logging")
def test_text_stays_the_default_format() -> None:
    stream, _ = _capture("text")

    def log_in_job() -> None:
        logs.bind_job("job-1", "prompt-1")
        logging.getLogger("comfy_sidecar.x").warning("hello")

    contextvars.copy_context().run(log_in_job)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING comfy_sidecar.x: hello\n", stream.getvalue()
    )


@pytest.mark.parametrize(
    ("value", "trace_id"),
    [
        (TRACEPARENT, TRACE_ID),
        (f" {TRACEPARENT} ", TRACE_ID),
        (f"01-{TRACE_ID}-00f067aa0ba902b7-01-future", TRACE_ID),  # a later version may extend
        (f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra", None),  # version 00 may not
        (f"ff-{TRACE_ID}-00f067aa0ba902b7-01", None),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),
        (f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01", None),
        ("00-abc-def-01", None),
        ("", None),
        ("00-" + TRACE_ID + "-00f067aa0ba902b7-01\r\nx: y", None),
    ],
)
def test_traceparent_parsing(value: str, trace_id: str | None) -> None:
    assert logs.parse_traceparent(value) == trace_id


def test_json_logs_of_a_sidecar_carry_job_instance_and_trace(
    tmp_path: Path, receiver: Callable[..., Receiver]
) -> None:
    hook = receiver()
    sidecar = make_sidecar(Backend("double", tmp_path / "comfy"), tmp_path, LOG_FORMAT="json")
    sidecar.start()
    try:
        sidecar.wait_ready()
        response = sidecar.post(
            "/prompt",
            json={"prompt": basic_prompt(batch=1), "id": "job-traced", "webhook_v2": hook.url},
            headers={"traceparent": TRACEPARENT},
        )
        assert response.status_code == 202, response.text
        (delivered,) = hook.wait_for(1)
        plain = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1), "id": "job-plain"})
        assert plain.status_code == 200, plain.text
    finally:
        sidecar.stop()
    assert delivered.headers["traceparent"] == TRACEPARENT
    records = [json.loads(line) for line in sidecar.log().splitlines() if line.strip()]
    assert all(list(record)[: len(FIELDS)] == FIELDS for record in records)
    comfy = [r for r in records if r["logger"] == "comfyui"]
    assert comfy and all(r["instance"] == "0" for r in comfy)
    assert any("To see the GUI go to" in r["msg"] for r in comfy)
    traced = [r for r in records if r["job_id"] == "job-traced"]
    assert traced, "no record of the job"
    assert all(r["trace_id"] == TRACE_ID and r["prompt_id"] for r in traced)
    plain_records = [r for r in records if r["job_id"] == "job-plain"]
    assert plain_records and all(r["trace_id"] is None for r in plain_records)
