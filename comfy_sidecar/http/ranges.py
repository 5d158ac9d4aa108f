"""HTTP ``Range`` for output files and assets (RFC 9110 section 14): one byte range, or the
whole file.

Litestar's ``File`` response has no Range support, so ``GET /jobs/{id}/outputs/{n}`` parses the
header here and streams the slice itself. Multi-range requests are answered with the whole file
(200), which RFC 9110 allows; a syntactically bad header is ignored (200) as the RFC says;
a range that starts past the end is :class:`Unsatisfiable` (416). Positions are ASCII digits
(``int()`` would also take `` 1``, ``1_0`` and other scripts' digits); one longer than
:data:`MAX_POSITION_DIGITS` is past the end of any file, so it is never converted (Python
refuses more than 4,300 digits): a start that long is unsatisfiable, an end or suffix that long
means the whole file.
"""

from __future__ import annotations


class Unsatisfiable(Exception):
    """The range starts at or past the end of the file (answer 416 with ``bytes */size``)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte offsets, inclusive, of a single ``bytes=`` range of a file of
    ``size`` bytes; None to send the whole file. Raises :class:`Unsatisfiable`."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return None
    if not first_text:  # suffix: the last N bytes
        suffix = _position(last_text)
        if suffix is None:
            return None
        if suffix <= 0:
            raise Unsatisfiable(spec)
        return max(0, size - suffix), size - 1
    first = _position(first_text)
    last = _position(last_text) if last_text else size - 1
    if first is None or last is None:
        return None
    if first >= size:
        raise Unsatisfiable(spec)
    if first < 0 or last < first:
        return None
    return first, min(last, size - 1)


#: The most digits of a byte position that are read as a number: 10^18 bytes is past the end
#: of any file.
MAX_POSITION_DIGITS = 18
#: What a longer position stands for: more than any file's size.
PAST_ANY_END = 10**MAX_POSITION_DIGITS


def _position(text: str) -> int | None:
    """A byte position of a ``Range`` (RFC 9110 ``1*DIGIT``, spaces around it tolerated):
    None unless ASCII digits; :data:`PAST_ANY_END` for one of more than
    :data:`MAX_POSITION_DIGITS` digits."""
    text = text.strip()
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text) if len(text) <= MAX_POSITION_DIGITS else PAST_ANY_END
