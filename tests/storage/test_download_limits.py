"""Every download is bounded: MAX_DOWNLOAD_GB (an endless body stops, nothing is cached),
DOWNLOAD_IDLE_TIMEOUT_S (a trickling server is cut), cancellation frees the download's thread
at once, and slow downloads never hold up another download."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfy_sidecar.storage import BackendError, Storage
from comfy_sidecar.storage.cache import PARTIAL_PREFIX
from tests.storage.conftest import make_settings
from tests.storage.slow_server import SlowServer
from tests.waiting import async_wait_for


@pytest.fixture
def slow() -> Iterator[SlowServer]:
    server = SlowServer()
    server.files["ok.bin"] = b"fine"
    yield server
    server.stop()


def run_with_storage(tmp_path: Path, body: object, **env: str) -> None:
    storage = Storage(make_settings(tmp_path, **env))

    async def main() -> None:
        await storage.start()
        try:
            await body(storage)  # type: ignore[operator]
        finally:
            await storage.close()

    asyncio.run(main())


def leftovers(storage: Storage) -> list[str]:
    return sorted(p.name for p in storage.cache.dir.iterdir() if p.name != "index.json")


def test_endless_body_stops_at_the_cap_and_caches_nothing(slow: SlowServer, tmp_path: Path) -> None:
    async def body(storage: Storage) -> None:
        url = slow.url("/endless")
        with pytest.raises(BackendError, match="MAX_DOWNLOAD_GB"):
            await storage.fetch(url, None)
        assert storage.cache.entry(url) is None
        assert [n for n in leftovers(storage) if not n.endswith(".json")] == []

    run_with_storage(tmp_path, body, MAX_DOWNLOAD_GB="0.002")


def test_declared_length_over_the_cap_is_refused_at_once(slow: SlowServer, tmp_path: Path) -> None:
    async def body(storage: Storage) -> None:
        with pytest.raises(BackendError, match="MAX_DOWNLOAD_GB"):
            await storage.fetch(slow.url("/huge"), None)

    run_with_storage(tmp_path, body, MAX_DOWNLOAD_GB="1")


def test_trickling_server_is_cut_by_the_idle_timeout(slow: SlowServer, tmp_path: Path) -> None:
    async def body(storage: Storage) -> None:
        with pytest.raises(BackendError, match="DOWNLOAD_IDLE_TIMEOUT_S"):
            await storage.fetch(slow.url("/trickle"), None)
        await async_wait_for(lambda: slow.open_now == 0, what="the server sees the cut")

    run_with_storage(tmp_path, body, DOWNLOAD_IDLE_TIMEOUT_S="1")


def test_cancelled_download_frees_its_connection_at_once(slow: SlowServer, tmp_path: Path) -> None:
    async def body(storage: Storage) -> None:
        task = asyncio.create_task(
            storage.http.download(slow.url("/trickle"), tmp_path / "part", None)
        )
        await async_wait_for(lambda: slow.open_now == 1, what="the download to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The thread's socket was shut down: the server's next write fails.
        await async_wait_for(lambda: slow.gone == 1, timeout=5, what="the connection to drop")

    run_with_storage(tmp_path, body, DOWNLOAD_IDLE_TIMEOUT_S="600")


def test_slow_downloads_do_not_starve_other_downloads(slow: SlowServer, tmp_path: Path) -> None:
    async def body(storage: Storage) -> None:
        stuck = [
            asyncio.create_task(storage.fetch(slow.url(f"/trickle?n={i}"), None)) for i in range(12)
        ]
        await async_wait_for(lambda: slow.open_now == 12, what="12 slow downloads in flight")
        path = await asyncio.wait_for(storage.fetch(slow.url("/files/ok.bin"), None), 30)
        assert path.read_bytes() == b"fine"
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)

    run_with_storage(tmp_path, body, DOWNLOAD_IDLE_TIMEOUT_S="600")


def test_a_download_no_caller_waits_for_is_stopped(slow: SlowServer, tmp_path: Path) -> None:
    # The job waiting for it was interrupted: the download itself stops (it went on, holding
    # its connection and its partial file in CACHE_DIR, until DOWNLOAD_IDLE_TIMEOUT_S).
    async def body(storage: Storage) -> None:
        url = slow.url("/trickle?stop=1")
        task = asyncio.create_task(storage.fetch(url, None))
        await async_wait_for(lambda: slow.sent > 0, what="the body to flow")
        assert storage.cache.progress(url) is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert storage.cache.progress(url) is None, "no download in flight"
        partials = [name for name in leftovers(storage) if name.startswith(PARTIAL_PREFIX)]
        assert partials == [], "its partial file is gone when the caller is released"
        await async_wait_for(lambda: slow.gone == 1, timeout=5, what="the connection to drop")
        assert storage.cache.entry(url) is None

    run_with_storage(tmp_path, body, DOWNLOAD_IDLE_TIMEOUT_S="600")


def test_a_shared_download_goes_on_for_the_caller_still_waiting(
    slow: SlowServer, tmp_path: Path
) -> None:
    # Two jobs want one URL: one download. The one interrupted leaves; the other gets the file.
    slow.files["shared.bin"] = bytes(range(256)) * 4096

    async def body(storage: Storage) -> None:
        url = slow.url("/held/shared.bin")
        leaving = asyncio.create_task(storage.fetch(url, None))
        staying = asyncio.create_task(storage.fetch(url, None))
        await async_wait_for(lambda: slow.sent > 0, what="the body to flow")
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert storage.cache.progress(url) is not None, "still downloading"
        slow.release.set()
        path = await asyncio.wait_for(staying, 30)
        assert path.read_bytes() == slow.files["shared.bin"]
        assert (slow.hits, slow.gone) == (1, 0), "one GET, never cut"

    run_with_storage(tmp_path, body, DOWNLOAD_IDLE_TIMEOUT_S="600")
