"""comfy_sidecar.schemas.nodes.node_order_key: numeric node ids in numeric order, others after."""

from __future__ import annotations

from pathlib import Path

from comfy_sidecar.pipeline.outputs import collect_outputs
from comfy_sidecar.schemas.nodes import node_order_key


def test_numeric_ids_first_in_numeric_order_then_names() -> None:
    ids = ["a", "10", "²", "", "2", "③", "9", "b"]
    assert sorted(ids, key=node_order_key) == ["2", "9", "10", "", "a", "b", "²", "③"]


def test_non_ascii_digits_are_names_and_never_raise() -> None:
    for node_id in ("²", "③", "١٢", "", "-1", "1.5", " 1"):
        assert node_order_key(node_id)[0] == 1, node_id  # after every numeric id
    assert node_order_key("²") > node_order_key("10")


def test_long_and_zero_padded_ids() -> None:
    huge = "9" * 5000  # int() refuses strings this long (sys.get_int_max_str_digits)
    assert sorted([huge, "10", "007", "8"], key=node_order_key) == ["007", "8", "10", huge]
    assert sorted(["07", "7", "0", "00"], key=node_order_key) == ["0", "00", "07", "7"]


def test_outputs_of_a_node_named_superscript_two_are_collected(tmp_path: Path) -> None:
    """ComfyUI accepts any string as a node id; the outputs are still read, in node order."""
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    outputs = {
        "²": {"images": [{"filename": "c.png", "subfolder": "", "type": "output"}]},
        "10": {"images": [{"filename": "b.png", "subfolder": "", "type": "output"}]},
        "2": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]},
    }
    files = collect_outputs(outputs, str(tmp_path))
    assert [(f.node_id, f.filename) for f in files] == [
        ("2", "a.png"),
        ("10", "b.png"),
        ("²", "c.png"),
    ]
