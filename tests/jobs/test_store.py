"""The job store: idempotent ids, newest-first pages, retention, event replay and resume."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from comfy_sidecar.jobs.progress import Progress
from comfy_sidecar.jobs.record import SealedEvents
from comfy_sidecar.jobs.store import (
    MARKER,
    DifferentBody,
    JobRecord,
    JobStatus,
    JobStore,
    UnknownJob,
)


def make(store: JobStore, job_id: str, fingerprint: bytes = b"a") -> JobRecord:
    record, _ = store.add(JobRecord(id=job_id, endpoint="jobs", fingerprint=fingerprint))
    return record


def test_same_id_same_body_returns_the_job_and_a_different_body_conflicts(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        store = JobStore(tmp_path, 60, 10)
        first = make(store, "j1", b"body")
        again, created = store.add(JobRecord(id="j1", endpoint="jobs", fingerprint=b"body"))
        assert again is first and created is False
        with pytest.raises(DifferentBody):
            store.add(JobRecord(id="j1", endpoint="jobs", fingerprint=b"other"))

    asyncio.run(main())


def test_pages_are_newest_first_with_a_cursor_and_a_status_filter(tmp_path: Path) -> None:
    async def main() -> None:
        store = JobStore(tmp_path, 60, 100)
        records = [make(store, f"j{i}") for i in range(7)]
        for record in records[::2]:
            store.finish(record, JobStatus.COMPLETED)
        page, cursor = store.page(None, 3, None)
        assert [r.id for r in page] == ["j6", "j5", "j4"]
        page, cursor = store.page(None, 3, cursor)
        assert [r.id for r in page] == ["j3", "j2", "j1"]
        page, cursor = store.page(None, 3, cursor)
        assert [r.id for r in page] == ["j0"] and cursor is None
        done, _ = store.page(JobStatus.COMPLETED, 10, None)
        assert [r.id for r in done] == ["j6", "j4", "j2", "j0"]

    asyncio.run(main())


def test_ended_jobs_expire_with_their_files(tmp_path: Path) -> None:
    async def main() -> None:
        store = JobStore(tmp_path, 30, 100)
        record = make(store, "j1")
        folder = store.job_dir("j1")
        (folder / "out.png").write_bytes(b"x")
        record.files = [folder / "out.png"]
        running = make(store, "j2")
        store.finish(record, JobStatus.COMPLETED)
        assert store.expire(time.monotonic() + 29) == 0
        assert store.expire(time.monotonic() + 31) == 1
        assert not folder.exists()
        with pytest.raises(UnknownJob):
            store.get("j1")
        assert store.get("j2") is running  # a running job never expires

    asyncio.run(main())


def test_at_most_max_jobs_ended_jobs_are_kept(tmp_path: Path) -> None:
    async def main() -> None:
        store = JobStore(tmp_path, 3600, 2)
        records = [make(store, f"j{i}") for i in range(4)]
        for record in records:
            store.finish(record, JobStatus.FAILED, error={"error": "x"})
        assert [r.id for r in store] == ["j2", "j3"]

    asyncio.run(main())


def test_follow_replays_then_resumes_after_last_event_id(tmp_path: Path) -> None:
    async def main() -> None:
        store = JobStore(tmp_path, 60, 10)
        record = make(store, "j1")
        store.set_status(record, JobStatus.IN_PROGRESS)
        record.publish("progress", {"progress": 50})

        async def collect(after: int) -> list[tuple[int, str]]:
            return [(e.id, e.type) async for e in record.follow(after) if e is not None]

        task = asyncio.ensure_future(collect(0))
        await asyncio.sleep(0)  # let the subscriber catch up and wait (it must not end early)
        assert not task.done()
        store.finish(record, JobStatus.COMPLETED)
        events = await asyncio.wait_for(task, 5)
        assert events == [(1, "status"), (2, "status"), (3, "progress"), (4, "done")]
        assert await collect(2) == [(3, "progress"), (4, "done")]
        done = msgspec.json.decode(record.events[-1].data)
        assert done["status"] == "completed" and done["progress"] == 100.0

    asyncio.run(main())


def test_an_ended_job_keeps_its_log_and_body_exactly(tmp_path: Path) -> None:
    """A retained job's log is kept compressed once it ends (SealedEvents) and its stats only
    in its done body: what it replays (every event, from any Last-Event-ID) and its status
    body are what a job still in memory as published would give."""

    async def main() -> None:
        store = JobStore(tmp_path, 60, 10)
        record = make(store, "j1")
        record.progress = Progress({"1": "EmptyImage", "2": "SaveImage"}, {"1", "2"})
        store.set_status(record, JobStatus.IN_PROGRESS)
        for frame in ({"node": "1"}, {"node": "2"}, {"node": "2", "value": 3, "max": 4}):
            record.publish("progress", {"progress": 50, "frame": frame, "text": "é\n\u2028"})
        record.publish("output", {"node_id": "2", "filename": "a b.png"})
        published = [(e.id, e.type, e.data) for e in record.events]
        stats = {"comfy_execution": {"start": 1, "end": 2, "nodes": {"1": {"start": 1}}}}
        store.finish(record, JobStatus.COMPLETED, stats=stats)
        published.append((len(published) + 1, "done", record.events[-1].data))

        assert isinstance(record.events, SealedEvents) and record.stats is None
        for after in range(len(published) + 1):
            replayed = [(e.id, e.type, e.data) async for e in record.follow(after) if e]
            assert replayed == published[after:]
        assert [(e.id, e.type, e.data) for e in record.events] == published
        body = store.view(record).body()
        done = msgspec.json.decode(published[-1][2])
        assert body["stats"] == stats and body["progress"] == 100.0
        assert body["current_node_type"] is None and body["nodes_done"] == 2
        assert {k: v for k, v in body.items() if k != "last_event_time"} == {
            k: v for k, v in done.items() if k != "last_event_time"
        }
        links = record.view().urls
        assert links is not None and links.self == "/jobs/j1"
        record.publish("output", {"late": True})  # nothing is published after the end
        assert len(record.events) == len(published)

    asyncio.run(main())


def test_a_preview_followed_at_once_by_logged_events_still_reaches_followers(
    tmp_path: Path,
) -> None:
    """A live preview is given to a follower asking for previews in its place among the
    logged events even when more events came before the follower woke (ComfyUI sends the
    next node's frames right after a preview); one from before the follower started is not;
    a follower without previews gets none."""

    async def main() -> None:
        store = JobStore(tmp_path, 60, 10)
        record = make(store, "j1")
        store.set_status(record, JobStatus.IN_PROGRESS)
        record.publish("preview", {"node_id": "0"}, log_it=False)  # before anyone follows

        async def collect(previews: bool) -> list[tuple[int, str]]:
            return [(e.id, e.type) async for e in record.follow(2, previews=previews) if e]

        tasks = [asyncio.ensure_future(collect(p)) for p in (True, False)]
        await asyncio.sleep(0)  # both followers wait for the next event
        record.publish("preview", {"node_id": "1"}, log_it=False)
        record.publish("progress", {"progress": 50})  # before the followers wake
        store.finish(record, JobStatus.COMPLETED)
        with_previews, without = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert with_previews == [(3, "preview"), (3, "progress"), (4, "done")]
        assert without == [(3, "progress"), (4, "done")]

    asyncio.run(main())


def test_follow_sends_heartbeats_while_nothing_happens(tmp_path: Path) -> None:
    async def main() -> None:
        store = JobStore(tmp_path, 60, 10)
        record = make(store, "j1")
        stream = record.follow(1, heartbeat_s=0.01)
        assert await asyncio.wait_for(stream.__anext__(), 5) is None
        await stream.aclose()

    asyncio.run(main())


def test_clear_leftovers_empties_the_jobs_dir(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    JobStore(jobs, 1, 1).clear_leftovers()  # a new directory becomes the store's
    (jobs / "old").mkdir()
    (jobs / "old" / "f").write_bytes(b"1")
    (jobs / "stray").write_bytes(b"1")
    JobStore(jobs, 1, 1).clear_leftovers()
    assert [p.name for p in jobs.iterdir()] == [MARKER]


def test_clear_leftovers_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious").write_bytes(b"1")
    with pytest.raises(ValueError, match="not a comfy-sidecar jobs directory"):
        JobStore(tmp_path, 1, 1).clear_leftovers()
    assert (tmp_path / "precious").exists()


def test_an_idempotency_key_is_single_use_for_its_ttl(tmp_path: Path) -> None:
    store = JobStore(tmp_path, 60, 10)
    assert store.claim_key("k", "j1", ttl_s=100, now=0) is None
    assert store.claim_key("k", "j2", ttl_s=100, now=99.9) == "j1", "used: names its job"
    store.free_key("k", "j2")  # only the job that claimed it frees it
    assert store.claim_key("k", "j3", ttl_s=100, now=50) == "j1"
    store.free_key("k", "j1")  # a refused submission gives its key back
    assert store.claim_key("k", "j4", ttl_s=100, now=50) is None
    assert store.claim_key("k", "j5", ttl_s=100, now=150) is None, "usable again after the TTL"
    assert store.claim_key("other", "j6", ttl_s=100, now=400) is None
    assert list(store._keys) == ["other"], "keys past their time are forgotten"


def test_pages_filter_on_endpoint_and_labels(tmp_path: Path) -> None:
    async def main() -> None:
        store = JobStore(tmp_path, 60, 10)
        for job_id, endpoint, labels in [
            ("a", "comfy_v2", {"team": "x", "run": "1"}),
            ("b", "jobs", None),
            ("c", "comfy_v2", {"team": "x"}),
            ("d", "comfy_v2", None),
        ]:
            make(store, job_id).endpoint = endpoint
            store.find(job_id).metadata = labels  # type: ignore[union-attr]
        ids = lambda **kw: [r.id for r in store.page(None, 10, None, **kw)[0]]  # noqa: E731
        assert ids(endpoint="comfy_v2") == ["d", "c", "a"]
        assert ids(metadata={"team": "x"}) == ["c", "a"]
        assert ids(endpoint="comfy_v2", metadata={"team": "x", "run": "1"}) == ["a"]
        first, cursor = store.page(None, 1, None, metadata={"team": "x"})
        assert [r.id for r in first] == ["c"] and cursor is not None
        assert [r.id for r in store.page(None, 1, cursor, metadata={"team": "x"})[0]] == ["a"]

    asyncio.run(main())


def test_a_key_stays_used_when_the_answer_is_given_up_but_the_job_runs(tmp_path: Path) -> None:
    """The caller went away while its submission waited (ComfyUI's verdict): the job exists,
    so its Idempotency-Key must not make a second one."""
    from types import SimpleNamespace

    from comfy_sidecar.errors import IdempotencyKeyReuse
    from comfy_sidecar.jobs.local import LocalBackend
    from comfy_sidecar.jobs.spec import JobSpec
    from comfy_sidecar.schemas import PromptRequest

    async def main() -> None:
        store = JobStore(tmp_path, 60, 10)

        async def submit(spec: JobSpec) -> JobRecord:
            if spec.id == "kept":
                make(store, spec.id)  # the job exists ...
            raise asyncio.CancelledError  # ... and the request was cancelled

        backend = LocalBackend(SimpleNamespace(store=store, submit=submit))  # type: ignore[arg-type]
        request = PromptRequest(prompt={}, id="kept")
        for job_id in ("kept", "refused"):
            spec = JobSpec(
                request=msgspec.structs.replace(request, id=job_id),
                endpoint="comfy_v2",
                idempotency_key=f"key-{job_id}",
            )
            with pytest.raises(asyncio.CancelledError):
                await backend.submit(spec)
        again = JobSpec(request=request, endpoint="comfy_v2", idempotency_key="key-kept")
        with pytest.raises(IdempotencyKeyReuse):
            await backend.submit(again)
        assert store.claim_key("key-refused", "new", 60) is None, "no job: the key is free"

    asyncio.run(main())


def test_past_max_jobs_the_oldest_submitted_ended_job_goes_first(tmp_path: Path) -> None:
    async def main() -> None:
        store = JobStore(tmp_path, 3600, 2)
        first, second, third = (make(store, f"j{i}") for i in range(3))
        for record in (third, first, second):  # ended in another order than submitted
            store.finish(record, JobStatus.COMPLETED)
        assert [r.id for r in store] == ["j1", "j2"]
        assert store.expire(time.monotonic() + 3601) == 2

    asyncio.run(main())


def test_a_stand_in_record_ended_through_the_store_is_not_kept(tmp_path: Path) -> None:
    """Queue mode ends a job no replica runs (a cancelled pending job, one given up) through a
    stand-in record that was never added; its expiry must not drop the job now kept under
    that id, nor count against the cap."""

    async def main() -> None:
        store = JobStore(tmp_path, 30, 1)
        store.finish(JobRecord(id="x", endpoint="jobs"), JobStatus.CANCELLED)
        running = make(store, "x")
        store.set_status(running, JobStatus.IN_PROGRESS)
        done = make(store, "y")
        store.finish(done, JobStatus.COMPLETED)
        assert [r.id for r in store] == ["x", "y"]  # the stand-in took no place under the cap
        assert store.expire(time.monotonic() + 31) == 1
        assert store.get("x") is running

    asyncio.run(main())
