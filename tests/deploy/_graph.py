"""Structural checks for API-format ComfyUI prompts (the warmup prompts shipped in docker/)."""

from __future__ import annotations

from typing import Any

OUTPUT_NODES = {"SaveImage", "PreviewImage", "SaveAnimatedWEBP", "SaveAnimatedPNG"}


def check_prompt_graph(graph: Any) -> list[str]:
    """Problems with ``graph`` as an API-format prompt (empty list = none).

    Node ids map to ``{"class_type": str, "inputs": {...}}``; a link is ``[node_id, output_index]``
    and must name a node of the graph; at least one output node must exist (ComfyUI answers 400
    ``prompt_no_outputs`` otherwise).
    """
    problems: list[str] = []
    if not isinstance(graph, dict) or not graph:
        return ["not a non-empty object of nodes"]
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            problems.append(f"node {node_id}: no class_type")
            continue
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            problems.append(f"node {node_id}: inputs is not an object")
            continue
        for name, value in inputs.items():
            is_link = isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)
            if is_link and str(value[0]) not in graph:
                problems.append(f"node {node_id}.{name}: link to missing node {value[0]}")
    if not any(isinstance(n, dict) and n.get("class_type") in OUTPUT_NODES for n in graph.values()):
        problems.append("no output node")
    return problems
