"""The chaos suite (issue 13): each scenario of tests/chaos/scenarios.py, run CHAOS_RUNS times
(default 2) against the ComfyUI double, and against a real ComfyUI when COMFY_HOME is set (the
scenarios that need no double-only knob). Nothing may hang or be lost, every job ends as the
scenario expects, and refusals happen only by design; the counts are printed.

RSS and fd figures are printed, not asserted, except that the sidecar's open fds come back to
within FD_SLACK of their baseline (a leak is a behaviour); bench/chaos.py prints the table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.scenarios import SCENARIOS, Harness, Outcome, Scenario
from tests.conftest import BACKENDS

# Subprocess sidecars: the scenarios kill, stop and freeze processes.
pytestmark = pytest.mark.sidecar_process

RUNS = int(os.environ.get("CHAOS_RUNS", "2"))

CASES = [
    pytest.param(
        scenario, backend.values[0], id=f"{scenario.name}-{backend.id}", marks=backend.marks
    )
    for scenario in SCENARIOS
    for backend in BACKENDS
    if scenario.real or backend.values[0] == "double"
]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("scenario", "kind"), CASES)
def test_scenario(scenario: Scenario, kind: str, spawn: Any, tmp_path: Path) -> None:
    out: Outcome = scenario(Harness(kind, tmp_path, spawn), RUNS)
    print(out)
    if out.skipped:
        pytest.skip(out.skipped)
    assert out.runs >= 1, out.notes
    assert out.hung == 0 and out.lost == 0, out
    assert out.wrong == 0, out.problems
    assert out.problems == [], out.problems
    assert out.completed + out.failed + out.refused == out.sent, out
