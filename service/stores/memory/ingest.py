"""The in-process backend's ingest state (``IngestStore``): held rows of grouped
streams, watches, their cursors and leases (one process holds them all, but the lease
keeps the contract every backend keeps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager

from service.stores.base import HeldRows


class MemoryIngest:
    def __init__(self) -> None:
        self._held: dict[str, HeldRows] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watches: dict[str, dict] = {}
        self._cursors: dict[str, float] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # name -> (owner, until: monotonic)

    async def held(self, stream: str) -> HeldRows:
        kept = self._held.get(stream)
        return kept.copy() if kept else HeldRows()

    async def hold(self, stream: str, held: HeldRows, removed: Collection[int]) -> None:
        self._held[stream] = held.copy()  # the caller's stays the caller's

    @asynccontextmanager
    async def holding(self, stream: str) -> AsyncIterator[None]:
        async with self._locks.setdefault(stream, asyncio.Lock()):
            yield

    async def forget_stream(self, stream: str) -> None:
        self._held.pop(stream, None)
        lock = self._locks.get(stream)
        if lock is not None and not lock.locked():  # else its holder still needs it
            del self._locks[stream]

    async def watches(self) -> dict[str, dict]:
        return dict(self._watches)

    async def put_watch(self, name: str, spec: dict) -> bool:
        new = name not in self._watches
        self._watches[name] = spec
        return new

    async def delete_watch(self, name: str) -> bool:
        self._cursors.pop(name, None)
        return self._watches.pop(name, None) is not None

    async def cursor(self, name: str) -> float | None:
        return self._cursors.get(name)

    async def set_cursor(self, name: str, t: float) -> None:
        self._cursors[name] = t

    async def lease(self, name: str, owner: str, seconds: float) -> bool:
        now = time.monotonic()
        held = self._leases.get(name)
        if held is not None and held[0] != owner and held[1] > now:
            return False
        self._leases[name] = (owner, now + seconds)
        return True

    async def release(self, name: str, owner: str) -> None:
        if self._leases.get(name, ("",))[0] == owner:
            del self._leases[name]
