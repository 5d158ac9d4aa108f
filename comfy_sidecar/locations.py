"""msgspec validation messages -> what is wrong and where, as the ``location`` of a 400 body.

msgspec writes ``"Expected `str`, got `int` - at `$.prompt[...].class_type`"``: struct fields
as ``.name``, array items as ``[0]``, dict values as ``[...]`` (``['key']`` is read too). The
``location`` of every 400 body (comfyui-api's ``{"error", "location"}``) is the dotted form.
"""

from __future__ import annotations

import re

__all__ = ["msgspec_location"]

_PATH_TOKEN = re.compile(r"\.([^.\[`]+)|\['((?:[^'\\]|\\.)*)'\]|\[(\d+|\.\.\.)\]")
_NAMED_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]*)`")


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
