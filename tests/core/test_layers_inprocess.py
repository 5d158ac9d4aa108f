"""The layers below HTTP built in the test's own event loop (tests/inprocess.py
``running_container``), in front of the ComfyUI double as the instances' child: the pipeline
and the job lifecycle through both job backends, the dispatcher's slots over two instances, an
instance restarting its killed child, and two replicas sharing one Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from comfy_sidecar.comfy.executions import Job, JobState, OutcomeKind
from comfy_sidecar.comfy.instance import ComfyInstance
from comfy_sidecar.config import load_settings
from comfy_sidecar.jobs.model import JobStatus
from comfy_sidecar.jobs.spec import JobSpec
from comfy_sidecar.pipeline.deliver import Answered
from comfy_sidecar.schemas import PromptRequest
from tests.conftest import Backend, basic_prompt, sidecar_env, slow_prompt
from tests.inprocess import running_container
from tests.redis_server import RedisServer, redis_server
from tests.waiting import async_wait_for

__all__ = ["redis_server"]  # the fixture, used by name


def request(prompt: dict[str, Any], job_id: str) -> PromptRequest:
    return msgspec.convert({"prompt": prompt, "id": job_id}, PromptRequest)


def env_for(tmp: Path, **overrides: str) -> dict[str, str]:
    return sidecar_env(Backend("double", tmp / "comfy"), tmp, **overrides)[0]


def test_lifecycle_answers_a_prompt_and_the_local_backend_keeps_a_job(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_container(env_for(tmp_path)) as c:
            answered = await c.lifecycle.answer(request(basic_prompt(batch=2), "answered"))
            assert isinstance(answered, Answered)
            assert answered.body.filenames == [
                "answered_rec_00001_.png",
                "answered_rec_00002_.png",
            ]
            view = await c.jobs.submit(
                JobSpec(request=request(basic_prompt(batch=1), "kept"), endpoint="jobs")
            )
            assert view.id == "kept" and not view.status.terminal
            done = await c.jobs.wait("kept", 30)
            assert done is not None and done.status is JobStatus.COMPLETED, done
            assert [o.filename for o in done.outputs] == ["kept_rec_00001_.png"]
            blob = await c.jobs.output("kept", 0)
            assert blob is not None and (await blob.read()).startswith(b"\x89PNG")
            assert c.dispatcher.running == 0 and c.pipeline.active == 0

    asyncio.run(scenario())


def test_cancelling_a_running_job_ends_it_cancelled_and_frees_its_slot(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_container(env_for(tmp_path)) as c:
            await c.jobs.submit(
                JobSpec(request=request(slow_prompt(blurs=20), "slow"), endpoint="jobs")
            )
            instance = c.instances[0]
            await async_wait_for(
                lambda: c.dispatcher.running == 1 and len(instance.registry) == 1,
                what="the job to hold a slot",
            )
            cancelled = await c.jobs.cancel("slow")
            assert cancelled is not None and cancelled[0]
            done = await c.jobs.wait("slow", 30)
            assert done is not None and done.status is JobStatus.CANCELLED, done
            await async_wait_for(lambda: c.dispatcher.running == 0, what="the slot freed")
            # the lifecycle answers the next prompt on the same instance
            answered = await c.lifecycle.answer(request(basic_prompt(batch=1), "after"))
            assert isinstance(answered, Answered)

    asyncio.run(scenario())


def test_dispatcher_hands_out_slots_over_two_instances_in_turn(tmp_path: Path) -> None:
    env = env_for(tmp_path, COMFYUI_INSTANCES="2", MAX_JOBS_PER_INSTANCE="1")
    backend = Backend("double", tmp_path / "comfy")
    env["CMD"] = backend.cmd(0).replace("--port 0", "--port {port}")

    async def scenario() -> None:
        async with running_container(env) as c:
            dispatcher = c.dispatcher
            first = await dispatcher.acquire()
            second = await dispatcher.acquire()
            assert {first.name, second.name} == {"0", "1"}
            assert dispatcher.free_slots() == 0
            third = asyncio.ensure_future(dispatcher.acquire())
            await async_wait_for(lambda: dispatcher.waiting == 1, what="a job waiting")
            dispatcher.release(second)
            assert (await asyncio.wait_for(third, 5)).name == second.name
            dispatcher.release(first)
            dispatcher.release(second)
            assert dispatcher.running == 0 and dispatcher.free_slots() == 2
            # closing it fails the waiting jobs and every later one
            dispatcher.close("closed by the test")
            with pytest.raises(Exception, match="closed by the test"):
                await dispatcher.acquire()

    asyncio.run(scenario())


def test_instance_restarts_its_killed_child_and_fails_the_running_job(tmp_path: Path) -> None:
    env = env_for(tmp_path, ALWAYS_RESTART_COMFYUI="true")

    async def scenario() -> None:
        settings = load_settings(env)
        instance = ComfyInstance(0, settings, port=settings.comfyui_port, gpu=None, label="")
        running = asyncio.ensure_future(instance.run(None))
        try:
            await async_wait_for(lambda: instance.accepting, timeout=30, what="ComfyUI up")
            assert instance.process is not None and instance.process.pid is not None
            first = instance.process.pid
            job = Job(id="killed", prompt_id=str(uuid.uuid4()))
            instance.registry.add(job)
            await instance.client.queue_prompt(
                slow_prompt(blurs=20), job.prompt_id, instance.client_id
            )
            await async_wait_for(lambda: job.state is JobState.RUNNING, what="the prompt to run")
            os.killpg(first, signal.SIGKILL)
            outcome = await asyncio.wait_for(job.done, 30)
            assert (outcome.kind, outcome.reason) == (OutcomeKind.COMFY_LOST, "comfyui_exited")
            await async_wait_for(
                lambda: (
                    instance.accepting
                    and instance.process is not None
                    and instance.process.pid != first
                ),
                timeout=30,
                what="a new child, ready",
            )
            assert instance.restarts["exit"] == 1
        finally:
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            await instance.stop()
            await instance.aclose()

    asyncio.run(scenario())


def test_two_replicas_share_jobs_through_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    """Jobs submitted on one replica are run by whichever claims them and read the same
    through either; an output is read through the replica that did not submit it."""
    a_env = env_for(tmp_path / "a", JOB_QUEUE_URL=redis_server.url)
    b_env = env_for(tmp_path / "b", JOB_QUEUE_URL=redis_server.url)

    async def scenario() -> None:
        async with running_container(a_env) as a, running_container(b_env) as b:
            ids = [f"shared-{n}" for n in range(4)]
            for job_id in ids:
                await a.jobs.submit(
                    JobSpec(request=request(basic_prompt(batch=1), job_id), endpoint="jobs")
                )
            runners = set()
            for job_id in ids:
                done = await b.jobs.wait(job_id, 30)
                assert done is not None and done.status is JobStatus.COMPLETED, done
                assert done == await a.jobs.get(job_id)
                assert isinstance(done.replica, str)
                runners.add(done.replica)
                blob = await b.jobs.output(job_id, 0)
                assert blob is not None and (await blob.read()).startswith(b"\x89PNG")
            assert runners <= {a.jobs.jobs.replica, b.jobs.jobs.replica}  # type: ignore[attr-defined]

    asyncio.run(scenario())
