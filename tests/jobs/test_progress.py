"""Progress from ComfyUI frames: monotonic, cached nodes count as done, 100 only at the end."""

from __future__ import annotations

from typing import Any

from comfy_sidecar.jobs.progress import Progress, nodes_to_run

UPSCALE = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}},
    "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "m.safetensors"}},
    "3": {
        "class_type": "ImageUpscaleWithModel",
        "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]},
    },
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    "9": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}},
}


def frames(pid: str = "p") -> list[tuple[str, dict[str, Any]]]:
    """The frame sequence a real ComfyUI 0.8.0 sends for UPSCALE (progress_upscale_model)."""
    return [
        ("execution_start", {"prompt_id": pid}),
        ("execution_cached", {"nodes": [], "prompt_id": pid}),
        ("executing", {"node": "1", "prompt_id": pid}),
        ("progress_state", {"prompt_id": pid, "nodes": {"1": {"state": "finished"}}}),
        ("executing", {"node": "2", "prompt_id": pid}),
        ("executing", {"node": "3", "prompt_id": pid}),
        ("progress", {"value": 1, "max": 4, "node": "3", "prompt_id": pid}),
        ("progress", {"value": 2, "max": 4, "node": "3", "prompt_id": pid}),
        ("progress", {"value": 4, "max": 4, "node": "3", "prompt_id": pid}),
        ("executing", {"node": "4", "prompt_id": pid}),
        ("executed", {"node": "4", "output": {"images": []}, "prompt_id": pid}),
        ("executing", {"node": None, "prompt_id": pid}),
    ]


def class_types(prompt: dict[str, Any]) -> dict[str, str]:
    return {k: v["class_type"] for k, v in prompt.items()}


def test_nodes_to_run_follows_links_from_output_nodes() -> None:
    assert nodes_to_run(UPSCALE, ["4"]) == {"1", "2", "3", "4"}
    assert nodes_to_run(UPSCALE, []) == set(UPSCALE)  # unknown outputs: every node


def test_progress_never_decreases_and_reaches_100_only_on_completion() -> None:
    progress = Progress(class_types(UPSCALE), nodes_to_run(UPSCALE, ["4"]))
    seen = [progress.percent]
    for kind, data in frames():
        progress.apply(kind, data)
        seen.append(progress.percent)
    assert seen == sorted(seen)
    assert seen[-1] < 100
    assert progress.nodes_done == 4 and progress.nodes_total == 4
    progress.complete()
    assert progress.percent == 100


def test_step_fraction_of_running_node_moves_progress() -> None:
    progress = Progress(class_types(UPSCALE), nodes_to_run(UPSCALE, ["4"]))
    for kind, data in frames()[:6]:  # nodes 1 and 2 done, 3 running with no steps yet
        progress.apply(kind, data)
    assert progress.current_node == "3"
    assert progress.current_node_type == "ImageUpscaleWithModel"
    assert progress.percent == 50.0
    progress.apply("progress", {"value": 2, "max": 4, "node": "3"})
    assert progress.percent == 62.5
    assert (progress.step_value, progress.step_max) == (2.0, 4.0)


def test_cached_nodes_count_as_done() -> None:
    progress = Progress(class_types(UPSCALE), nodes_to_run(UPSCALE, ["4"]))
    progress.apply("execution_cached", {"nodes": ["1", "2", "3"]})
    assert progress.nodes_cached == 3
    assert progress.nodes_done == 3
    assert progress.percent == 75.0


def test_unrelated_frames_change_nothing() -> None:
    progress = Progress(class_types(UPSCALE), {"1"})
    assert progress.apply("status", {"status": {}}) is False
    assert progress.apply("progress", {"value": 1, "max": 2, "node": "7"}) is False
