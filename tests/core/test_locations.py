"""comfy_sidecar.schemas.locations.msgspec_location: msgspec messages -> (what is wrong,
location)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from comfy_sidecar.schemas.locations import msgspec_location, nesting_location


class Item(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    odd_name: int = msgspec.field(default=0, name="odd-name")


class Doc(msgspec.Struct, forbid_unknown_fields=True):
    models: list[Item] = []
    nodes: dict[str, Item] = {}
    pair: tuple[int, int] = (0, 0)


def error_of(obj: Any) -> msgspec.ValidationError:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(obj, Doc)
    return info.value


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Expected `str`, got `int` - at `$.prompt['1'].class_type`",
            ("Expected `str`, got `int`", "prompt.1.class_type"),
        ),
        (
            "Expected `object`, got `str` - at `$.prompt[...]`",
            ("Expected `object`, got `str`", "prompt[...]"),
        ),
        (
            "Object contains unknown field `effort` - at `$.convert_output.options`",
            ("Object contains unknown field `effort`", "convert_output.options.effort"),
        ),
        (
            "Object missing required field `prompt`",
            ("Object missing required field `prompt`", "prompt"),
        ),
        ("Expected `object`, got `int`", ("Expected `object`, got `int`", "")),
    ],
)
def test_messages(message: str, expected: tuple[str, str]) -> None:
    assert msgspec_location(message) == expected


def test_real_errors_from_msgspec() -> None:
    cases = [
        ({"models": [{"url": "u"}, {"url": 3}]}, "models[1].url"),
        ({"models": [{}]}, "models[0].url"),
        ({"nodes": {"k": {"url": "u", "extra": 1}}}, "nodes[...].extra"),
        ({"pair": [1, "x"]}, "pair[1]"),
        ({"models": [{"url": "u", "odd-name": "x"}]}, "models[0].odd-name"),
        ({"typo": 1}, "typo"),
    ]
    for obj, location in cases:
        err = error_of(obj)
        what, where = msgspec_location(err)
        assert where == location, obj
        assert " - at " not in what and what in str(err)
        assert msgspec_location(str(err)) == (what, where)


def test_top_level_location() -> None:
    err = error_of(5)
    assert msgspec_location(err) == ("Expected `object`, got `int`", "")
    assert msgspec_location(err, top_level="(top level)")[1] == "(top level)"
    assert msgspec_location(error_of({"pair": "x"}), top_level="(top level)")[1] == "pair"


@pytest.mark.parametrize(
    ("body", "location"),
    [
        (
            b'{"prompt": {"1": {"class_type": "X", "inputs": {"a": [1], "deep": ' + b"[" * 70,
            "prompt.1.inputs.deep",
        ),
        (b'{"id": ' + b"[" * 5000, "id"),
        (b"[" * 5000, "body"),
        (b'{"a": ' * 100, "a.a.a.a"),  # at most 4 keys
        (b'{"k\\"[{": ' + b"[" * 70, 'k"[{'),  # brackets inside a string are text
        (b'{"a": [[1]], "b": {"c": 2}}', None),
    ],
)
def test_nesting_location_names_where_a_body_nests_too_deep(
    body: bytes, location: str | None
) -> None:
    assert nesting_location(body, 64) == location
