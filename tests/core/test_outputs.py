"""The streamed 200 body (results above INLINE_LIMIT) is byte for byte the one-piece body, a
PromptResponse."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import msgspec

from comfy_sidecar.pipeline.outputs import CHUNK, OutputFile, result_body, stream_result
from comfy_sidecar.schemas import ComfyExecution, PromptResponse, ResultHead, Stats


def test_streamed_body_matches_rendered_body(tmp_path: Path) -> None:
    files = []
    for name, size in (("a.png", CHUNK * 2 + 1), ("b.webp", 5), ("c.mp4", 0)):
        path = tmp_path / name
        path.write_bytes(os.urandom(size))
        files.append(OutputFile(path, name, "9", "images"))
    head = ResultHead(
        id="big",
        prompt={"1": {"class_type": "SaveImage", "inputs": {}}},
        webhook_v2="http://hook",
        input={"width": 8},
        conversion_errors={"c.mp4": "not an image"},
    )
    stats = Stats(
        comfy_execution=ComfyExecution(start=1, end=2, duration=1),
        preprocess_time=0,
        comfy_round_trip_time=1,
        postprocess_time=0,
        upload_time=0,
        total_time=1,
    )
    finished: list[bool] = []

    async def collect() -> bytes:
        parts = [
            chunk
            async for chunk in stream_result(
                head, files, lambda: stats, lambda: finished.append(True)
            )
        ]
        return b"".join(parts)

    streamed = asyncio.run(collect())
    assert finished == [True]
    assert streamed == msgspec.json.encode(result_body(head, files, None, stats))
    body = msgspec.json.decode(streamed, type=PromptResponse)
    assert [base64.b64decode(i) for i in body.images] == [f.path.read_bytes() for f in files]
    assert body.filenames == ["a.png", "b.webp", "c.mp4"]
    assert list(msgspec.json.decode(streamed)) == [
        "webhook_v2",
        "input",
        "id",
        "prompt",
        "conversion_errors",
        "filenames",
        "images",
        "stats",
    ]


def test_uploaded_urls_replace_the_base64(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"png")
    head = ResultHead(id="up", prompt={})
    stats = msgspec.convert(
        {
            "comfy_execution": {"start": 1, "end": 1, "duration": 0},
            "preprocess_time": 0,
            "comfy_round_trip_time": 0,
            "postprocess_time": 0,
            "upload_time": 3,
            "total_time": 3,
        },
        Stats,
    )
    body = result_body(head, [OutputFile(path, "a.png", "2", "images")], ["s3://b/a.png"], stats)
    assert msgspec.to_builtins(body)["images"] == ["s3://b/a.png"]
    assert "conversion_errors" not in msgspec.to_builtins(body)
