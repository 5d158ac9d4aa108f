"""msgspec validation messages -> what is wrong and where, as the ``location`` of a 400 body.

msgspec writes ``"Expected `str`, got `int` - at `$.prompt[...].class_type`"``: struct fields
as ``.name``, array items as ``[0]``, dict values as ``[...]`` (``['key']`` is read too). The
``location`` of every 400 body (comfyui-api's ``{"error", "location"}``) is the dotted form.
"""

from __future__ import annotations

import json
import re

__all__ = ["msgspec_location", "nesting_location"]

_PATH_TOKEN = re.compile(r"\.([^.\[`]+)|\['((?:[^'\\]|\\.)*)'\]|\[(\d+|\.\.\.)\]")
_NAMED_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]*)`")
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def msgspec_location(message: str | Exception, *, top_level: str = "") -> tuple[str, str]:
    """Split a msgspec ``ValidationError`` (or its message) into (what is wrong, location).

    ``"Expected `str`, got `int` - at `$.prompt['1'].class_type`"`` gives
    ``("Expected `str`, got `int`", "prompt.1.class_type")``; ``$.models.before_start[2].url``
    gives ``"models.before_start[2].url"``; a dict value is ``[...]`` (msgspec omits the key).
    An unknown or missing field is appended: ``"Object missing required field `x` - at
    `$.input`"`` gives ``"input.x"``. A message without a path (the top level) gives
    ``top_level`` as the location (``""`` unless given).
    """
    what, sep, where = str(message).partition(" - at `")
    parts: list[str] = []
    if sep:
        for name, key, index in _PATH_TOKEN.findall(where.rstrip("`")):
            if index:
                parts.append(f"[{index}]")
            else:
                parts.append(("." if parts else "") + (name or key))
    location = "".join(parts)
    named = _NAMED_FIELD.search(what)
    if named:
        location = f"{location}.{named.group(1)}" if location else named.group(1)
    return what, location or top_level


def nesting_location(body: bytes, limit: int, *, max_keys: int = 4) -> str | None:
    """Where the JSON text ``body`` first nests lists and objects more than ``limit`` deep,
    as a ``location``: the object keys leading there, up to the first array index and at
    most ``max_keys`` of them (``{"prompt": {"1": {"inputs": {"a": [[[...`` gives
    ``"prompt.1.inputs.a"``; a top-level array ``"body"``). None when it nests no deeper.
    Scans tokens with an explicit stack (no recursion, any depth); the text need not be
    valid JSON past that point."""
    path: list[str | int | None] = []  # per open container: the key or index being read
    expect_key = False
    for match in _JSON_TOKEN.finditer(body):
        token = match.group()
        if token.startswith(b'"'):
            if expect_key and path:
                try:
                    path[-1] = str(json.loads(token))
                except ValueError:
                    path[-1] = token[1:-1].decode(errors="replace")
                expect_key = False
        elif token in (b"[", b"{"):
            path.append(0 if token == b"[" else None)
            expect_key = token == b"{"
            if len(path) > limit:
                keys: list[str] = []
                for part in path[:-1]:
                    if not isinstance(part, str) or len(keys) == max_keys:
                        break
                    keys.append(part)
                return ".".join(keys) or "body"
        elif token in (b"]", b"}"):
            if path:
                path.pop()
            expect_key = False
        elif path:  # ","
            last = path[-1]
            if isinstance(last, int):
                path[-1] = last + 1
            else:
                expect_key = True
    return None
