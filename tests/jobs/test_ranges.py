"""Range header parsing for output files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from comfy_sidecar.jobs.ranges import Unsatisfiable, parse_range, read_slice


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 99)),
        ("bytes=-5", (95, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=90-200", (90, 99)),
        ("bytes=0-1,5-6", None),  # several ranges: the whole file
        ("items=0-1", None),
        ("bytes=x-y", None),
        ("bytes=9-3", None),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-160", "bytes=-0"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, 100)


def test_read_slice(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = bytes(range(256)) * 2000
    path.write_bytes(data)

    async def collect() -> bytes:
        return b"".join([c async for c in read_slice(path, 1000, 300_000)])

    assert asyncio.run(collect()) == data[1000:300_001]
