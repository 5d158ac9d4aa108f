"""A job's progress, computed from ComfyUI's websocket frames.

``progress`` follows the Modal jobs API (``modal-jobs-api-operator-guide.md``): a percentage,
``(nodes done + the running node's step fraction) / nodes to run * 100``, that never decreases
and reaches 100 only when the job completes. Nodes served from ComfyUI's cache
(``execution_cached``) count as done. ``progress_value`` / ``progress_max`` mirror ComfyUI's
``progress`` frames (sampler steps, upscale tiles) for the running node.

The nodes to run are the output nodes and every node they depend on through links
(``["<node id>", <output index>]``), which is what ComfyUI executes; nodes no output needs are
never run and are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: Progress is held below this until the job completes (a job whose last node finished is not
#: done until its outputs are collected).
BEFORE_COMPLETION = 99.0


def nodes_to_run(prompt: Mapping[str, Any], output_nodes: Iterable[str]) -> set[str]:
    """The ids of ``output_nodes`` and every node of ``prompt`` they reach through links.

    ``prompt`` is an API-format graph (node id -> ``{class_type, inputs}``). Unknown ids are
    ignored; a graph without known output nodes counts every node.
    """
    wanted: set[str] = set()
    stack = [str(node_id) for node_id in output_nodes if str(node_id) in prompt]
    while stack:
        node_id = stack.pop()
        if node_id in wanted:
            continue
        wanted.add(node_id)
        node = prompt.get(node_id)
        inputs = node.get("inputs") if isinstance(node, Mapping) else None
        if not isinstance(inputs, Mapping):
            continue
        for value in inputs.values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                source = str(value[0])
                if source in prompt and source not in wanted:
                    stack.append(source)
    return wanted or {str(node_id) for node_id in prompt}


class Progress:
    """Progress of one job, fed with ComfyUI frames through :meth:`apply`.

    ``class_types`` maps node id -> class_type (for ``current_node_type``); ``to_run`` is the
    set of node ids ComfyUI will execute (:func:`nodes_to_run`).
    """

    __slots__ = (
        "_class_types",
        "_percent",
        "cached",
        "current_node",
        "done",
        "step_max",
        "step_value",
        "to_run",
    )

    def __init__(self, class_types: Mapping[str, str], to_run: set[str]) -> None:
        self._class_types = dict(class_types)
        self.to_run = set(to_run)
        self.done: set[str] = set()
        self.cached: set[str] = set()
        self.current_node: str | None = None
        self.step_value = 0.0
        self.step_max = 0.0
        self._percent = 0.0

    @property
    def nodes_total(self) -> int:
        """Nodes ComfyUI runs for this job (cached ones included)."""
        return len(self.to_run)

    @property
    def nodes_done(self) -> int:
        """Nodes finished or served from the cache."""
        return len(self.done)

    @property
    def nodes_cached(self) -> int:
        """Nodes ComfyUI served from its cache."""
        return len(self.cached)

    @property
    def current_node_type(self) -> str | None:
        """The class_type of the running node."""
        return self._class_types.get(self.current_node) if self.current_node else None

    @property
    def percent(self) -> float:
        """0 to 100, never decreasing; 100 only after :meth:`complete`."""
        return self._percent

    def _finish_node(self, node_id: str | None) -> None:
        if node_id is not None:
            self.to_run.add(node_id)
            self.done.add(node_id)

    def apply(self, kind: str, data: Mapping[str, Any]) -> bool:
        """Apply one frame (``type``, ``data``) of this job; True when a reported field moved."""
        before = self._snapshot()
        if kind == "execution_cached":
            for node_id in data.get("nodes") or ():
                self.cached.add(str(node_id))
                self._finish_node(str(node_id))
        elif kind == "executing":
            node = data.get("node")
            self._finish_node(self.current_node)
            self.current_node = None if node is None else str(node)
            if self.current_node is not None:
                self.to_run.add(self.current_node)
            self.step_value = self.step_max = 0.0
        elif kind == "executed":
            self._finish_node(str(data.get("node")))
        elif kind == "progress":
            node = data.get("node")
            if node is None or str(node) == self.current_node:
                self.step_value = _number(data.get("value"))
                self.step_max = _number(data.get("max"))
        elif kind == "progress_state":
            self._apply_state(data.get("nodes"))
        else:
            return False
        self._recompute()
        return self._snapshot() != before

    def _apply_state(self, nodes: Any) -> None:
        if not isinstance(nodes, Mapping):
            return
        for node_id, state in nodes.items():
            if isinstance(state, Mapping) and state.get("state") == "finished":
                # Subgraph nodes report their real id; count what the prompt names.
                real = str(state.get("display_node_id") or node_id)
                self._finish_node(real)

    def _recompute(self) -> None:
        total = max(1, len(self.to_run))
        partial = 0.0
        running = self.current_node is not None and self.current_node not in self.done
        if running and self.step_max > 0:
            partial = min(1.0, self.step_value / self.step_max)
        value = 100.0 * (len(self.done & self.to_run) + partial) / total
        self._percent = max(self._percent, min(BEFORE_COMPLETION, value))

    def complete(self) -> None:
        """The job completed: every node is done and progress is 100."""
        self._finish_node(self.current_node)
        self.done |= self.to_run
        self.current_node = None
        self._percent = 100.0

    def _snapshot(self) -> tuple[Any, ...]:
        return (
            round(self._percent, 2),
            len(self.done),
            len(self.cached),
            self.current_node,
            self.step_value,
            self.step_max,
        )

    def ended(self) -> EndedProgress:
        """What an ended job keeps of its progress."""
        return EndedProgress(round(self._percent, 2))

    def view(self) -> dict[str, Any]:
        """The progress fields of a job's status body (Modal jobs API names)."""
        return {
            "progress": round(self._percent, 2),
            "progress_value": self.step_value,
            "progress_max": self.step_max,
            "nodes_total": self.nodes_total,
            "nodes_done": self.nodes_done,
            "nodes_cached": self.nodes_cached,
            "current_node": self.current_node,
            "current_node_type": self.current_node_type,
        }


class EndedProgress:
    """An ended job's progress: its percent as the job left it, rounded as in
    :meth:`Progress.view` (a retained job keeps this instead of its node sets and class
    types; the rest of its last progress is in its ``done`` body)."""

    __slots__ = ("percent",)

    def __init__(self, percent: float) -> None:
        self.percent = percent


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
