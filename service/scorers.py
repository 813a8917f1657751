"""The per-process scorer cache: each stream's decoded scorer as last committed, kept
between requests so that a request whose stream nobody else wrote since skips reading and
decoding its state. Valid while the store's version of the stream is the cached one (plus
this process's own append): another replica's append, commit, feedback or configuration
change bumps the version, and a stream deleted and created again has another
``created_at``. Bounded by state bytes, least recently used out.

A request checks its own stream's entry; an entry no request asks for again (its stream
deleted, or now served by another replica) is found by ``check``, which compares every
entry with the store in one round trip per thousand streams, every
``TSAD_SCORER_CACHE_CHECK_SECONDS`` (``run_checks``, in the app's lifespan): a stream
deleted through one replica leaves every replica's cache within that time.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace

from service.errors import StoreUnavailable
from service.scoring import StreamScorer
from service.stores.base import AppendResult, StreamMeta, StreamStore

log = logging.getLogger("tsad.pipeline")


@dataclass
class Cached:
    meta: StreamMeta  # as committed
    scorer: StreamScorer
    nbytes: int  # the size of its state: what the cache's bound counts


class ScorerCache:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[str, Cached] = OrderedDict()  # least recent first
        self._bytes = 0
        # entries a request has taken and not put back yet: a shadow's commit while the
        # request waits for the stream's lock still reaches them (``bumped``)
        self._out: weakref.WeakValueDictionary[str, Cached] = weakref.WeakValueDictionary()

    def take(self, stream: str) -> Cached | None:
        """The stream's entry, out of the cache (it goes back in once committed)."""
        cached = self._drop(stream)
        if cached is not None:
            self._out[stream] = cached
        return cached

    def evict(self, stream: str) -> None:
        """A deleted stream's scorer must not outlive it."""
        self._out.pop(stream, None)
        self._drop(stream)

    def _drop(self, stream: str) -> Cached | None:
        cached = self._entries.pop(stream, None)
        if cached is not None:
            self._bytes -= cached.nbytes
        return cached

    @staticmethod
    def valid(cached: Cached | None, appended: AppendResult,
              writes: int | None = None) -> StreamScorer | None:
        """The cached scorer if nothing but our own appends wrote the stream since it was
        committed (``appended`` the last of them; ``writes``: how many stored points,
        by default the one append's)."""
        if cached is None:
            return None
        ours = (1 if appended.accepted else 0) if writes is None else writes
        if (cached.meta.created_at, cached.meta.version + ours) != (
                appended.meta.created_at, appended.meta.version):
            return None
        return cached.scorer

    def bumped(self, stream: str, version: int) -> None:
        """A write that changed nothing a cached scorer holds (a costly shadow's own
        sections) moved the stream to ``version``: the scorer stays valid if it was the
        stream's state just before. An entry a request has taken counts too: the lock is
        taken by the request's append (one script), so a shadow may commit between the
        take and the append, and its bump, missed, would make the request decode the
        stream's state again."""
        entry = self._entries.get(stream) or self._out.get(stream)
        if entry is not None and entry.meta.version == version - 1:
            entry.meta = replace(entry.meta, version=version)

    def __len__(self) -> int:
        return len(self._entries)

    async def check(self, streams: StreamStore, chunk: int = 1000) -> int:
        """Evict the entries no request could use any more: their stream was deleted,
        or written since by another replica (its version moved on: versions only grow).
        Returns how many went."""
        snapshot = list(self._entries.items())
        gone = 0
        for at in range(0, len(snapshot), chunk):
            part = snapshot[at:at + chunk]
            stored = await streams.versions([s for s, _ in part])
            for stream, entry in part:
                if self._entries.get(stream) is not entry:  # taken or replaced meanwhile
                    continue
                if stored.get(stream) != (entry.meta.created_at, entry.meta.version):
                    self._drop(stream)
                    gone += 1
        return gone

    async def run_checks(self, streams: StreamStore, seconds: float) -> None:
        """``check`` every ``seconds``, for the process's life (a task of the lifespan)."""
        while True:
            await asyncio.sleep(seconds)
            try:
                if gone := await self.check(streams):
                    log.debug("scorer cache: stale entries evicted",
                              extra={"evicted": gone, "kept": len(self)})
            except StoreUnavailable:  # checked again next time
                continue
            except Exception:  # the checks must outlive any bug in one of them
                log.exception("scorer cache check failed")

    def put(self, stream: str, entry: Cached) -> None:
        self._out.pop(stream, None)
        if entry.nbytes > self.limit_bytes:
            return
        self._entries[stream] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.limit_bytes:  # least recently used first
            self._bytes -= self._entries.popitem(last=False)[1].nbytes
