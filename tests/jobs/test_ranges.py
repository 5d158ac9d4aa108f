"""Range header parsing for output files."""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path

import pytest

from comfy_sidecar.http.ranges import Unsatisfiable, parse_range
from comfy_sidecar.storage.files import read_slice


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
        ("bytes=1_0-", None),  # int() takes it; RFC 9110's DIGIT does not
        ("bytes=\u0661-", None),  # ARABIC-INDIC DIGIT ONE: likewise
        (f"bytes=0-{'9' * 5000}", (0, 99)),  # an end past any file's: to the end
        (f"bytes=-{'9' * 5000}", (0, 99)),  # a suffix longer than any file: all of it
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize(
    "header", ["bytes=100-", "bytes=150-160", "bytes=-0", f"bytes={'9' * 5000}-"]
)
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, 100)


def test_read_slice(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = bytes(range(256)) * 2000
    path.write_bytes(data)

    async def collect(first: int = 1000, last: int = 300_000) -> bytes:
        return b"".join([c async for c in read_slice(path, first, last)])

    assert asyncio.run(collect()) == data[1000:300_001]
    # A small slice is one read on the event loop: the same bytes, the same bounds.
    assert asyncio.run(collect(5, 5)) == data[5:6]
    assert asyncio.run(collect(511_990, 511_999)) == data[511_990:]
    assert asyncio.run(collect(7, 7 + 64 * 1024 - 1)) == data[7 : 7 + 64 * 1024]


@pytest.mark.parametrize(
    ("filename", "fallback"),
    [
        ("x_00001_.png", "x_00001_.png"),
        ('a"b\\c%d.png', "a_b_c_d.png"),
        ("é✓.png", "__.png"),
        ("a\r\nX-Injected: 1.png", "a__X-Injected: 1.png"),
    ],
)
def test_content_disposition_is_ascii_with_the_exact_name_in_filename_star(
    filename: str, fallback: str
) -> None:
    """RFC 6266: a quoted ASCII fallback and the exact name percent-encoded in `filename*`;
    a header h11 (uvicorn's HTTP/1.1) accepts whatever the name holds."""
    import h11

    from comfy_sidecar.http.routes.jobs import content_disposition

    value = content_disposition(filename)
    assert value == (
        f"inline; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(filename)}"
    )
    assert urllib.parse.unquote(value.rsplit("''", 1)[1]) == filename
    h11.Response(status_code=200, headers=[("content-disposition", value)])  # raises if invalid
