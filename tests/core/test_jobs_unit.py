"""JobRegistry fed with the frames a real ComfyUI sent (tests/transcripts): states, progress,
outputs and outcomes, and reconciliation through a fake client's /queue and /history."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from comfy_sidecar.comfy.client import ComfyUnavailable
from comfy_sidecar.comfy.executions import (
    DuplicateJob,
    Job,
    JobOutcome,
    JobRegistry,
    JobState,
    OutcomeKind,
    outcome_from_history,
)
from tests.transcripts import history, posted_prompts, ws_frames
from tests.waiting import async_wait_for

T = TypeVar("T")


def run(test: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(test())


def registry_with(scenario: str, index: int = 0) -> tuple[JobRegistry, Job]:
    """A registry holding one queued job for the ``index``-th prompt the scenario posted."""
    registry = JobRegistry()
    prompt_id = posted_prompts(scenario)[index]["prompt_id"]
    job = Job(id=f"api-{index}", prompt_id=prompt_id)
    registry.add(job)
    job.state = JobState.QUEUED
    return registry, job


def replay(registry: JobRegistry, scenario: str) -> None:
    for frame in ws_frames(scenario):
        registry.on_frame(frame)


class FakeClient:
    """The two ComfyClient calls reconcile makes, answered from a transcript."""

    def __init__(
        self,
        running: set[str] | None = None,
        pending: set[str] | None = None,
        entries: dict[str, dict[str, Any]] | None = None,
        down: bool = False,
    ) -> None:
        self.running, self.pending = running or set(), pending or set()
        self.entries = entries or {}
        self.down = down
        self.history_calls: list[str] = []

    async def queue(self) -> tuple[set[str], set[str]]:
        if self.down:
            raise ComfyUnavailable("connection refused")
        return self.running, self.pending

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        self.history_calls.append(prompt_id)
        if self.down:
            raise ComfyUnavailable("connection refused")
        return self.entries.get(prompt_id)


def attach(registry: JobRegistry, client: FakeClient) -> None:
    registry.attach(client)  # type: ignore[arg-type]  # duck-typed: queue() and history()


# --- frames -> states, progress, outputs ------------------------------------------------------


def test_success_moves_through_states_and_collects_the_history_outputs() -> None:
    async def scenario() -> None:
        registry, job = registry_with("success_basic")
        states = []
        for frame in ws_frames("success_basic"):
            registry.on_frame(frame)
            states.append(job.state)
        assert states[0] is JobState.QUEUED  # the status frame before execution_start
        assert JobState.RUNNING in states
        assert states[-1] is JobState.COMPLETED
        outcome = await job.done
        entry = history("success_basic", job.prompt_id)
        assert outcome.kind is OutcomeKind.SUCCESS
        assert outcome.outputs == entry["outputs"]  # two images from SaveImage "3"
        assert len(outcome.outputs["3"]["images"]) == 2
        start = next(f for f in ws_frames("success_basic") if f["type"] == "execution_start")
        assert job.exec_start_ms == start["data"]["timestamp"]
        assert (job.nodes_done, job.nodes_total) == (3, 3)

    run(scenario)


def test_progress_frames_set_node_and_step_progress() -> None:
    async def scenario() -> None:
        registry, job = registry_with("progress_upscale_model")
        seen: list[tuple[float, float]] = []
        nodes: list[str | None] = []
        for frame in ws_frames("progress_upscale_model"):
            registry.on_frame(frame)
            if frame["type"] == "progress":
                seen.append((job.step_value, job.step_max))
                expected = (float(frame["data"]["value"]), float(frame["data"]["max"]))
                assert seen[-1] == expected
            if frame["type"] == "executing" and frame["data"]["node"] is not None:
                nodes.append(job.current_node)
                assert (job.step_value, job.step_max) == (0.0, 0.0)  # a new node starts at 0
        assert seen, "the transcript has progress frames"
        assert nodes == ["1", "2", "3", "4"]
        assert set(job.node_starts) == {"1", "2", "3", "4"}
        outcome = await job.done
        assert outcome.outputs == history("progress_upscale_model", job.prompt_id)["outputs"]

    run(scenario)


def test_outputs_of_every_output_node_type() -> None:
    async def scenario() -> None:
        registry, job = registry_with("multi_output_types")
        replay(registry, "multi_output_types")
        outcome = await job.done
        entry = history("multi_output_types", job.prompt_id)
        assert outcome.outputs == entry["outputs"]
        assert outcome.outputs["2"]["images"][0]["subfolder"] == "sub"
        assert outcome.outputs["3"]["images"][0]["type"] == "temp"
        assert outcome.outputs["4"]["animated"] == [True]

    run(scenario)


def test_a_cached_rerun_still_completes_with_its_outputs() -> None:
    async def scenario() -> None:
        registry, first = registry_with("success_then_cached", 0)
        second_id = posted_prompts("success_then_cached")[1]["prompt_id"]
        second = Job(id="api-1", prompt_id=second_id)
        registry.add(second)
        second.state = JobState.QUEUED
        cached_counts = []
        for frame in ws_frames("success_then_cached"):
            registry.on_frame(frame)
            if frame["type"] == "execution_cached" and frame["data"]["prompt_id"] == second_id:
                cached_counts.append((len(frame["data"]["nodes"]), second.nodes_done))
        for job in (first, second):
            outcome = await job.done
            assert outcome.kind is OutcomeKind.SUCCESS
            assert outcome.outputs == history("success_then_cached", job.prompt_id)["outputs"]
        # The second run is served from ComfyUI's cache: its cached nodes count as done.
        assert cached_counts == [(3, 3)]
        assert second.nodes_done == second.nodes_total > 0

    run(scenario)


def test_execution_error_fails_the_job_with_comfyuis_error() -> None:
    async def scenario() -> None:
        registry, job = registry_with("execution_error_bad_image")
        replay(registry, "execution_error_bad_image")  # `executing` null after it is ignored
        outcome = await job.done
        assert job.state is JobState.FAILED
        assert outcome.kind is OutcomeKind.EXECUTION_ERROR
        assert outcome.error is not None
        assert (outcome.error["node_id"], outcome.error["node_type"]) == ("1", "LoadImage")
        assert outcome.error["exception_type"] == "PIL.UnidentifiedImageError"

    run(scenario)


def test_interrupt_ends_the_job_as_interrupted() -> None:
    async def scenario() -> None:
        registry, job = registry_with("interrupt_running")
        replay(registry, "interrupt_running")
        outcome = await job.done
        assert job.state is JobState.INTERRUPTED
        assert outcome.kind is OutcomeKind.INTERRUPTED
        assert outcome.error is not None and outcome.error["node_type"] == "ImageBlur"

    run(scenario)


def test_frames_of_prompts_not_ours_change_nothing() -> None:
    async def scenario() -> None:
        registry, job = registry_with("success_basic")
        replay(registry, "multi_output_types")  # another prompt_id
        assert job.state is JobState.QUEUED and not job.done.done() and not job.outputs

    run(scenario)


def test_registry_bookkeeping() -> None:
    async def scenario() -> None:
        registry, job = registry_with("execution_error_bad_image")
        with pytest.raises(DuplicateJob):
            registry.add(Job(id=job.id, prompt_id="another"))
        assert registry.by_id(job.id) is job and len(registry) == 1
        replay(registry, "execution_error_bad_image")
        registry.remove(job)
        assert registry.by_id(job.id) is None and len(registry) == 0
        # Frames that arrive after the end (executing null) still map to the API id.
        assert registry.api_id_for(job.prompt_id) == job.id

    run(scenario)


def test_fail_all_fails_queued_jobs_but_not_preprocessing_ones() -> None:
    async def scenario() -> None:
        registry, queued = registry_with("success_basic")
        fresh = Job(id="fresh", prompt_id="p-fresh")
        registry.add(fresh)
        registry.fail_all("ComfyUI exited with code -9")
        outcome = await queued.done
        assert outcome.kind is OutcomeKind.COMFY_LOST
        assert outcome.error == {"message": "ComfyUI exited with code -9"}
        assert not fresh.done.done()

    run(scenario)


# --- missed frames and reconciliation ----------------------------------------------------------


def frames_without(scenario: str, kind: str) -> list[dict[str, Any]]:
    return [f for f in ws_frames(scenario) if f["type"] != kind]


def test_after_missed_frames_the_end_is_read_from_history() -> None:
    async def scenario() -> None:
        registry, job = registry_with("success_basic")
        entry = history("success_basic", job.prompt_id)
        attach(registry, FakeClient(entries={job.prompt_id: entry}))
        job.state = JobState.RUNNING
        registry.mark_missed_frames()
        for frame in frames_without("success_basic", "executed"):  # the lost frames
            registry.on_frame(frame)
        outcome = await asyncio.wait_for(job.done, 5)
        assert outcome.kind is OutcomeKind.SUCCESS
        assert outcome.outputs == entry["outputs"]

    run(scenario)


@pytest.mark.parametrize(
    ("scenario", "kind", "state"),
    [
        ("success_basic", OutcomeKind.SUCCESS, JobState.COMPLETED),
        ("execution_error_bad_image", OutcomeKind.EXECUTION_ERROR, JobState.FAILED),
        ("interrupt_running", OutcomeKind.INTERRUPTED, JobState.INTERRUPTED),
    ],
)
def test_reconcile_settles_a_job_that_left_the_queue_from_history(
    scenario: str, kind: OutcomeKind, state: JobState
) -> None:
    async def check() -> None:
        registry, job = registry_with(scenario)
        entry = history(scenario, job.prompt_id)
        attach(registry, FakeClient(entries={job.prompt_id: entry}))
        await registry.reconcile()
        outcome = await asyncio.wait_for(job.done, 1)
        assert (outcome.kind, job.state) == (kind, state)
        assert outcome.outputs == entry["outputs"]
        assert outcome_from_history(entry).kind is kind

    run(check)


def test_reconcile_leaves_queued_and_running_prompts_alone() -> None:
    async def scenario() -> None:
        registry, pending = registry_with("queue_delete_pending", 0)
        running = Job(id="api-1", prompt_id=posted_prompts("queue_delete_pending")[1]["prompt_id"])
        registry.add(running)
        running.state = JobState.RUNNING
        client = FakeClient(running={running.prompt_id}, pending={pending.prompt_id})
        attach(registry, client)
        await registry.reconcile()
        assert not pending.done.done() and not running.done.done()
        assert client.history_calls == []

    run(scenario)


@pytest.mark.parametrize(
    ("interrupt_requested", "kind"),
    [(True, OutcomeKind.INTERRUPTED), (False, OutcomeKind.COMFY_LOST)],
)
def test_reconcile_of_a_prompt_comfyui_forgot(interrupt_requested: bool, kind: OutcomeKind) -> None:
    """queue_delete_pending: a pending prompt deleted from the queue never runs and has no
    history; it was interrupted when we asked for that, lost otherwise."""

    async def scenario() -> None:
        registry, job = registry_with("queue_delete_pending", 2)
        job.interrupt_requested = interrupt_requested
        attach(registry, FakeClient())
        await registry.reconcile()
        outcome = await asyncio.wait_for(job.done, 1)
        assert outcome.kind is kind

    run(scenario)


def test_reconcile_while_comfyui_is_down_changes_nothing() -> None:
    async def scenario() -> None:
        registry, job = registry_with("success_basic")
        attach(registry, FakeClient(down=True))
        await registry.reconcile()
        assert not job.done.done() and job.state is JobState.QUEUED

    run(scenario)


def test_history_lookup_failing_after_missed_frames_is_comfy_lost() -> None:
    async def scenario() -> None:
        registry, job = registry_with("success_basic")
        attach(registry, FakeClient(down=True))
        job.state = JobState.RUNNING
        registry.mark_missed_frames()
        replay(registry, "success_basic")
        await async_wait_for(job.done.done, timeout=5, what="the history look-up to settle")
        outcome: JobOutcome = job.done.result()
        assert outcome.kind is OutcomeKind.COMFY_LOST

    run(scenario)


def test_cancel_and_end_are_decided_once() -> None:
    """An interrupt that wins turns any later outcome into INTERRUPTED (outputs kept); one
    that comes after the end changes nothing (issue 13, finding 9)."""

    async def scenario() -> None:
        won = Job(id="a", prompt_id="pa")
        assert won.cancel()
        won.finish(JobOutcome(OutcomeKind.SUCCESS, outputs={"9": {"images": []}}))
        outcome = won.done.result()
        assert outcome.kind is OutcomeKind.INTERRUPTED and outcome.outputs == {"9": {"images": []}}
        assert won.state is JobState.INTERRUPTED
        late = Job(id="b", prompt_id="pb")
        late.finish(JobOutcome(OutcomeKind.SUCCESS))
        assert not late.cancel()
        assert not late.interrupt_requested
        assert late.done.result().kind is OutcomeKind.SUCCESS

    run(scenario)
