"""What a supervised ComfyUI is checked for while it runs: hangs, stalls, a stale websocket and
the recycling limits. Detection only; :mod:`comfy_sidecar.comfy.instance` acts on it.

- *Hung*: no answer to ``GET /system_stats`` (short timeout) and no websocket frame for
  COMFYUI_HANG_TIMEOUT_S. The websocket's own keepalive (:func:`keepalive_s`) drops a socket
  whose pongs stop.
- *Stalled*: jobs of ours queued in ComfyUI, none running, no frame of ours for
  COMFYUI_STALL_TIMEOUT_S and ``/queue`` running nothing: ComfyUI's prompt-worker thread died
  (a prompt nested too deep kills it in ``copy.deepcopy``) while its server still answers.
- *Stale socket* (comfyui-api issue #186): the socket is open but silent while ``/queue`` shows
  our jobs moving.
- *Recycle*: RECYCLE_AFTER_JOBS, RECYCLE_RSS_GB, RECYCLE_VRAM_GB (see :func:`recycle_reason`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from comfy_sidecar.comfy.client import ComfyClient, ComfyUnavailable
from comfy_sidecar.comfy.executions import JobRegistry, JobState
from comfy_sidecar.config import Settings

GB = 1024**3

#: (restart reason, job fail reason, message) of a child the watchdog gave up on; restart
#: reasons are ``hang`` and ``stall``, job fail reasons ``comfyui_hung`` and ``comfyui_stalled``.
Verdict = tuple[str, str, str]


def keepalive_s(hang_timeout_s: float) -> float:
    """The websocket ping interval, in seconds, for a COMFYUI_HANG_TIMEOUT_S: half of it, at most
    20 s, 20 s when hang detection is off; the pong is awaited half of the interval (aiohttp's
    heartbeat)."""
    return min(20.0, hang_timeout_s / 2) if hang_timeout_s > 0 else 20.0


def vram_used_bytes(stats: dict[str, Any]) -> int:
    """Used memory of ComfyUI's first device, in bytes, from ``/system_stats``
    (``devices[0].vram_total - devices[0].vram_free``); 0 when it does not say."""
    devices = stats.get("devices")
    if not isinstance(devices, list) or not devices or not isinstance(devices[0], dict):
        return 0
    try:
        return max(0, int(devices[0]["vram_total"]) - int(devices[0]["vram_free"]))
    except (KeyError, TypeError, ValueError):
        return 0


def recycle_reason(settings: Settings, jobs: int, rss_bytes: int, vram_bytes: int) -> str | None:
    """Which RECYCLE_* limit a child that ran ``jobs`` jobs and holds ``rss_bytes`` of resident
    memory and ``vram_bytes`` of GPU memory has reached, in words; None when none (a limit of 0
    is off)."""
    if settings.recycle_after_jobs and jobs >= settings.recycle_after_jobs:
        return f"RECYCLE_AFTER_JOBS: {jobs} jobs run"
    if settings.recycle_rss_gb and rss_bytes > settings.recycle_rss_gb * GB:
        return f"RECYCLE_RSS_GB: resident memory {rss_bytes / GB:.2f} GB"
    if settings.recycle_vram_gb and vram_bytes > settings.recycle_vram_gb * GB:
        return f"RECYCLE_VRAM_GB: GPU memory in use {vram_bytes / GB:.2f} GB"
    return None


async def socket_missed_progress(registry: JobRegistry, client: ComfyClient) -> bool:
    """True when ComfyUI's ``/queue`` shows one of ``registry``'s jobs running, or no longer
    shows one the socket never said ended: its frames did not reach us."""
    jobs = [
        j
        for j in registry.jobs()
        if j.state in (JobState.QUEUED, JobState.RUNNING) and not j.done.done()
    ]
    if not jobs:
        return False
    try:
        running, pending = await client.queue()
    except ComfyUnavailable:
        return False
    return any(j.prompt_id in running or j.prompt_id not in pending for j in jobs)


async def watch_child(
    settings: Settings,
    client: ComfyClient,
    registry: JobRegistry,
    last_frame_at: Callable[[], float],
    last_job_frame_at: Callable[[], float],
) -> Verdict | None:
    """Check a running child every min(5 s, smallest limit / 4) until it hangs or stalls, and
    return the :data:`Verdict`; None at once when COMFYUI_HANG_TIMEOUT_S and
    COMFYUI_STALL_TIMEOUT_S are both 0. ``last_frame_at()`` / ``last_job_frame_at()`` give the
    ``time.monotonic()`` of the last websocket frame / the last frame about one of our jobs."""
    hang_s = settings.comfyui_hang_timeout_s
    stall_s = settings.comfyui_stall_timeout_s
    limits = [t for t in (hang_s, stall_s) if t > 0]
    if not limits:
        return None
    interval = min(5.0, min(limits) / 4)
    last_answer = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        if hang_s:
            if await client.ping(timeout_s=min(2.0, hang_s / 2)):
                last_answer = time.monotonic()
            last_answer = max(last_answer, last_frame_at())
            silent = time.monotonic() - last_answer
            if silent > hang_s:
                return (
                    "hang",
                    "comfyui_hung",
                    f"hung: ComfyUI has not answered for {silent:.1f} s "
                    f"(COMFYUI_HANG_TIMEOUT_S={hang_s:g})",
                )
        if stall_s and await _stalled(registry, client, stall_s, last_job_frame_at()):
            return (
                "stall",
                "comfyui_stalled",
                f"stalled: ComfyUI holds queued jobs but started none for {stall_s:g} s "
                f"(COMFYUI_STALL_TIMEOUT_S); its prompt worker looks dead",
            )


async def _stalled(
    registry: JobRegistry, client: ComfyClient, stall_s: float, last_job_frame_at: float
) -> bool:
    since = registry.waiting_since()
    if since is None or time.monotonic() - max(since, last_job_frame_at) <= stall_s:
        return False
    try:
        running, _ = await client.queue()
    except ComfyUnavailable:
        return False  # not answering: the hang check's business
    return not running
