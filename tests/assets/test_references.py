"""``core/ASSET`` references in a workflow: found at any depth with their location, malformed
and unknown ones refused (v2 ``missing_asset``), and replaced by staged file names."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from comfy_sidecar.assets.references import (
    find_asset_references,
    replace_asset_references,
    resolve_asset_references,
)
from comfy_sidecar.errors import MissingAsset

A, B = "9f8a1c0d-2b3e-4f56-8a7b-1c2d3e4f5a6b", "1c2d3e4f-0000-4f56-8a7b-9f8a1c0d2b3e"


def ref(asset_id: Any, **info: Any) -> dict[str, Any]:
    return {"__type": "core/ASSET", "info": {"id": asset_id, **info}}


def workflow() -> dict[str, Any]:
    return {
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "model": ["4", 0]}},
        "10": {
            "class_type": "LoadImage",
            "inputs": {"image": ref(A, hash="blake3:" + "a" * 64, file_path="photo.png")},
        },
        "12": {
            "class_type": "VHS_LoadImages",
            "inputs": {"images": ["plain.png", ref(B), {"nested": [ref(A)]}], "n": 2},
            "_meta": {"title": "frames"},
        },
    }


def test_every_reference_is_found_with_its_location_in_document_order() -> None:
    found = find_asset_references(workflow())
    assert [(r.location, r.id) for r in found] == [
        ("workflow.10.inputs.image", A),
        ("workflow.12.inputs.images.1", B),
        ("workflow.12.inputs.images.2.nested.0", A),
    ]
    assert found[0].hash == "blake3:" + "a" * 64 and found[0].file_path == "photo.png"
    assert found[1].hash is None and found[1].path == ("12", "inputs", "images", 1)
    assert find_asset_references({"1": {"class_type": "X", "inputs": {"a": {"b": 1}}}}) == []


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ({"__type": "core/ASSET"}, "no info"),
        ({"__type": "core/ASSET", "info": "x"}, "info not an object"),
        (ref(None), "no id"),
        (ref(""), "empty id"),
        (ref(7), "id not a string"),
        (ref(A, hash=5), "hash not a string"),
        (ref(A, file_path=["a"]), "file_path not a string"),
    ],
)
def test_a_malformed_reference_is_a_missing_asset_at_its_location(
    value: dict[str, Any], why: str
) -> None:
    wf = workflow()
    wf["12"]["inputs"]["images"][0] = value
    wf["20"] = {"class_type": "LoadImage", "inputs": {"image": {"__type": "core/ASSET"}}}
    with pytest.raises(MissingAsset) as caught:
        find_asset_references(wf)
    assert caught.value.location == "workflow.12.inputs.images.0", why
    assert caught.value.fields["missing"] == [
        "workflow.12.inputs.images.0",
        "workflow.20.inputs.image",
    ]
    assert caught.value.code == "missing_asset"


def test_references_resolve_through_the_lookup_and_unknown_ids_are_missing() -> None:
    known = {A: "asset A", B: "asset B"}
    resolved = resolve_asset_references(workflow(), known.get)
    assert [(r.reference.location, r.asset) for r in resolved] == [
        ("workflow.10.inputs.image", "asset A"),
        ("workflow.12.inputs.images.1", "asset B"),
        ("workflow.12.inputs.images.2.nested.0", "asset A"),
    ]
    with pytest.raises(MissingAsset) as caught:
        resolve_asset_references(workflow(), {A: "asset A"}.get)
    assert caught.value.location == "workflow.12.inputs.images.1"
    assert caught.value.fields == {"missing": ["workflow.12.inputs.images.1"], "asset_ids": [B]}


def test_replacing_puts_file_names_in_a_copy_and_leaves_the_original_alone() -> None:
    original = workflow()
    before = copy.deepcopy(original)
    replaced = replace_asset_references(original, {A: f"{A}.png", B: f"{B}.png"})
    assert original == before
    assert replaced["10"]["inputs"]["image"] == f"{A}.png"
    assert replaced["12"]["inputs"]["images"] == [
        "plain.png",
        f"{B}.png",
        {"nested": [f"{A}.png"]},
    ]
    assert replaced["3"] is original["3"]  # untouched nodes are shared, not copied
    assert replaced["12"]["_meta"] is original["12"]["_meta"]
    assert find_asset_references(replaced) == []
    with pytest.raises(KeyError):
        replace_asset_references(original, {A: "a.png"})


def test_a_deep_workflow_does_not_exhaust_the_stack() -> None:
    value: Any = ref(A)
    for _ in range(5000):
        value = [value]
    wf = {"1": {"class_type": "X", "inputs": {"deep": value}}}
    (found,) = find_asset_references(wf)
    assert found.location.startswith("workflow.1.inputs.deep.0.0.")
