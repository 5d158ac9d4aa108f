"""Helpers for the asset store tests: a started store, async byte sources, file listings."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from comfy_sidecar.assets import AssetStore


@contextlib.asynccontextmanager
async def started(directory: Path, **options: Any) -> AsyncIterator[AssetStore]:
    """An :class:`AssetStore` on ``directory``, started, closed at the end."""
    store = AssetStore(directory, **options)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def chunks_of(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    """``data`` in pieces of ``size`` bytes, as a request body arrives."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def read_all(store: AssetStore, asset_id: str) -> bytes:
    """Every byte of the asset, through :meth:`AssetStore.open`."""
    content = await store.open(asset_id)
    return b"".join([chunk async for chunk in content.chunks()])


def files(directory: Path) -> list[str]:
    """Names of the files in ``directory`` (sorted; [] when it does not exist)."""
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


class Clock:
    """A settable clock in unix seconds for expiry tests."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def walk(directory: Path) -> Iterator[Path]:
    """Every file under ``directory``."""
    return (p for p in directory.rglob("*") if p.is_file())
