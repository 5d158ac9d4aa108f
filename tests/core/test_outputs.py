"""The streamed 200 body (results above INLINE_LIMIT) equals the one-piece body."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

from comfy_sidecar.pipeline.outputs import CHUNK, OutputFile, render_result, stream_result


def test_streamed_body_matches_rendered_body(tmp_path: Path) -> None:
    files = []
    for name, size in (("a.png", CHUNK * 2 + 1), ("b.webp", 5), ("c.mp4", 0)):
        path = tmp_path / name
        path.write_bytes(os.urandom(size))
        files.append(OutputFile(path, name, "9", "images"))
    head = {"id": "big", "prompt": {"1": {"class_type": "SaveImage", "inputs": {}}}}
    finished: list[bool] = []

    async def collect() -> bytes:
        parts = [
            chunk
            async for chunk in stream_result(
                head, files, lambda: {"stats": {"total_time": 1}}, lambda: finished.append(True)
            )
        ]
        return b"".join(parts)

    streamed = json.loads(asyncio.run(collect()))
    rendered = json.loads(render_result(head, files, None, {"stats": {"total_time": 1}}))
    assert streamed == rendered
    assert [base64.b64decode(i) for i in streamed["images"]] == [f.path.read_bytes() for f in files]
    assert streamed["filenames"] == ["a.png", "b.webp", "c.mp4"]
    assert finished == [True]
