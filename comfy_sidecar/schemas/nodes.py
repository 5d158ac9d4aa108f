"""Ordering of prompt node ids, shared by the pipeline's outputs and the workflow builders."""

from __future__ import annotations

__all__ = ["node_order_key"]


def node_order_key(node_id: str) -> tuple[int, int, str, str]:
    """Sort key for prompt node ids: numeric ids (ASCII digits only) in numeric order, then
    every other id by name. Never raises.

    ``sorted(["10", "a", "2", "²"], key=node_order_key)`` -> ``["2", "10", "a", "²"]``.
    Ids such as ``"²"`` or ``"③"`` (``str.isdigit()`` is true, ``int()`` fails) and ``""``
    count as names. Numbers are compared by length then digits, without ``int()``, so ids of
    any length work; equal numbers (``"07"``, ``"7"``) go by text. ComfyUI's API-format
    prompts and comfyui-api's examples use numeric ids.
    """
    if node_id.isascii() and node_id.isdigit():
        digits = node_id.lstrip("0") or "0"
        return (0, len(digits), digits, node_id)
    return (1, 0, "", node_id)
