"""The in-process backend's streams: the embedded default when no Redis is configured.

Single process only. Atomicity comes from the event loop: ``append`` and ``apply`` (the
commit's part) have no await between their checks and their writes, so no other request
can interleave.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from service.errors import Conflict, InvalidInput
from service.stores.base import (
    AppendResult,
    Commit,
    PendingReceipt,
    StreamMeta,
    StreamPolicy,
    retained,
)
from service.stores.plan import (
    NO_NUDGES,
    context_needed,
    may_resend,
    plan_append,
    scoreable_unscored,
)

# Receipts (Idempotency-Key responses) kept per stream, newest first: the in-process store
# bounds them by count as well as by age
RECEIPTS_PER_STREAM = 1000


@dataclass
class _Stream:
    meta: StreamMeta
    points: deque = field(default_factory=deque)  # of np.ndarray rows (1 + C,)
    nudges: deque = field(default_factory=deque)  # (stored, sent) stamps of nudged points
    sections: dict[str, bytes] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)
    receipts: OrderedDict = field(default_factory=OrderedDict)  # key -> (expiry, data)
    pending: set[str] = field(default_factory=set)  # keys of pending receipts


class MemoryStreams:
    def __init__(self, policy: StreamPolicy) -> None:
        self.policy = policy
        self._streams: dict[str, _Stream] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # outlive their stream: first posts race

    def _get(self, stream: str) -> _Stream | None:
        entry = self._streams.get(stream)
        ttl = self.policy.ttl_seconds
        if entry is not None and ttl and time.monotonic() - entry.touched > ttl:
            del self._streams[stream]  # idle past its TTL, like a Redis EXPIRE
            return None
        return entry

    async def put(self, meta: StreamMeta) -> tuple[StreamMeta, bool]:
        entry = self._get(meta.stream)
        if entry is None:
            self._streams[meta.stream] = _Stream(meta=replace(meta, points_seen=0,
                                                              points_scored=0))
            return replace(meta, points_scored=0), True
        old = entry.meta
        if old.channels != meta.channels:
            raise Conflict(("body", "channels"), f"stream {meta.stream!r} has "
                           f"{old.channels} channels; it cannot change")
        if (old.window, old.detector, old.params) != (meta.window, meta.detector, meta.params):
            entry.sections = {}  # a new detector starts afresh: nothing left to score
            old.points_scored = old.points_seen
        while len(entry.points) > retained(meta.window):
            entry.points.popleft()
        entry.meta = replace(old, window=meta.window, detector=meta.detector,
                             channel_names=meta.channel_names, threshold=meta.threshold,
                             alert_budget_per_day=meta.alert_budget_per_day,
                             timestamps=meta.timestamps, params=meta.params,
                             version=old.version + 1)
        entry.touched = time.monotonic()
        return replace(entry.meta), False

    async def get(self, stream: str) -> StreamMeta | None:
        entry = self._get(stream)
        return replace(entry.meta) if entry else None

    async def list(self, limit: int | None = None,
                           after: str | None = None) -> list[StreamMeta]:
        out = []
        for s in sorted(self._streams):
            if limit is not None and len(out) >= limit:
                break
            if (after is None or s > after) and (e := self._get(s)):
                out.append(replace(e.meta))
        return out

    async def count(self, exact: bool = False, prefix: str | None = None) -> int:
        if exact:
            for s in list(self._streams):
                self._get(s)  # drops it when idle past its TTL
        if prefix is None:
            return len(self._streams)
        return sum(s.startswith(prefix) for s in self._streams)

    async def versions(self, streams: Collection[str]) -> dict[str, tuple[float, int]]:
        return {s: (e.meta.created_at, e.meta.version) for s in streams
                if (e := self._get(s)) is not None}

    async def delete(self, stream: str) -> bool:
        lock = self._locks.get(stream)
        if lock is not None and not lock.locked():  # else its holder still needs it
            del self._locks[stream]
        return self._streams.pop(stream, None) is not None

    async def append(self, stream: str, points: np.ndarray, *,
                     known: StreamMeta | None = None,
                     pending: PendingReceipt | None = None,
                     lock: object = None) -> AppendResult:
        # this store's meta is always current: ``known`` only says that the caller scores
        # with a scorer it kept, which needs only the context scoring the batch takes
        policy = self.policy
        channels = points.shape[1] - 1
        entry = self._get(stream)
        # --- checks: nothing is written until all pass --------------------------------
        if entry is not None and entry.meta.channels != channels:
            raise InvalidInput(("body", "points", 0, "values"), f"stream {stream!r} has "
                               f"{entry.meta.channels} channels, got {channels}")
        last = entry.meta.last_timestamp if entry else None
        stored, nudges = np.empty((0, 1 + channels)), NO_NUDGES
        if entry is not None and entry.points and may_resend(points, last):
            stored = np.array(entry.points, dtype=np.float64)
            nudges = np.array(entry.nudges, dtype=np.float64).reshape(-1, 2)
        plan = plan_append(points, stored, last, policy.duplicates,
                           (entry and entry.meta.timestamps) or policy.timestamps, nudges,
                           policy.max_back_seconds)
        # --- writes ---------------------------------------------------------------------
        created = entry is None
        if entry is None:
            meta = StreamMeta(stream=stream, channels=channels, window=policy.window,
                              detector=policy.detector, points_scored=0)
            entry = self._streams[stream] = _Stream(meta=meta)
        new = plan.rows
        m = entry.meta
        # stored but never scored (the commit failed): held until scored
        unscored = 0 if m.points_scored is None else max(0, m.points_seen - m.points_scored)
        # held after the batch: the batch whole (a retry of it is recognised), the
        # unscored before it, and the context that scoring them needs
        before = min(unscored, policy.unscored_max_points) + retained(m.window) - 1
        wanted = before if unscored or known is None else context_needed(m, len(new))
        context = list(entry.points)[-wanted:] if wanted and (len(new) or unscored) else []
        for row in new:
            entry.points.append(np.array(row, dtype=np.float64))
        if len(new):
            while len(entry.points) > before + len(new):
                entry.points.popleft()
        entry.nudges.extend(map(tuple, plan.nudges.tolist()))
        while len(entry.nudges) > max(m.window, len(entry.points)):
            entry.nudges.popleft()  # no more of them can be held
        if len(new):
            m.points_seen += len(new)
            m.last_timestamp = float(new[-1, 0])
            m.version += 1
        entry.touched = time.monotonic()
        if pending is not None:
            self._keep_receipt(entry, pending.key,
                               pending.encode(plan.actions, plan.stamps, m.created_at))
            entry.pending.add(pending.key)
        rows = context + list(new)
        out = np.array(rows, dtype=np.float64).reshape(len(rows), 1 + channels)
        usable = scoreable_unscored(unscored, len(out), len(new), m.points_seen, m.window)
        return AppendResult(meta=replace(m), created=created,
                            duplicates=plan.duplicates, accepted=len(new), points=out,
                            actions=plan.actions, stamps=plan.stamps, unscored=usable,
                            skipped=unscored - usable)

    async def window(self, stream: str, last: int | None = None) -> np.ndarray:
        entry = self._get(stream)
        if entry is None or not entry.points:
            channels = entry.meta.channels if entry else 0
            return np.empty((0, 1 + channels))
        return np.array(entry.points, dtype=np.float64)[-(last or entry.meta.window):]

    async def sections(self, stream: str,
                       names: Collection[str] | None = None) -> dict[str, bytes]:
        entry = self._get(stream)
        if entry is None:
            return {}
        return {k: v for k, v in entry.sections.items() if names is None or k in names}

    async def receipt(self, stream: str, key: str) -> bytes | None:
        entry = self._get(stream)
        found = entry.receipts.get(key) if entry else None
        return found[1] if found and found[0] > time.monotonic() else None

    async def pending_receipts(self, stream: str) -> dict[str, bytes]:
        entry = self._get(stream)
        if entry is None:
            return {}
        found = {k: data for k in entry.pending if (data := await self.receipt(stream, k))}
        entry.pending.intersection_update(found)  # expired ones are gone
        return found

    # --- the commit's part (no await: atomic on the event loop) ---------------------------
    def apply(self, commit: Commit) -> int:
        """A commit's stream writes; the new version (0: no such stream, or only a
        receipt written)."""
        entry = self._get(commit.stream)
        if entry is None:
            return 0
        for key, data in commit.all_receipts:
            self._keep_receipt(entry, key, data)
            entry.pending.discard(key)
        if not commit.writes_state:
            return 0
        entry.sections.update(commit.sections)
        for name in commit.drop:
            entry.sections.pop(name, None)
        if commit.binding is not None:
            entry.meta = replace(entry.meta, **commit.binding)
        if commit.scored is not None:
            entry.meta.points_scored = commit.scored
        entry.meta.version += 1
        return entry.meta.version

    def _keep_receipt(self, entry: _Stream, key: str, data: bytes) -> None:
        now = time.monotonic()
        entry.receipts[key] = (now + self.policy.receipt_ttl_seconds, data)
        entry.receipts.move_to_end(key)
        while entry.receipts and (len(entry.receipts) > RECEIPTS_PER_STREAM
                                  or next(iter(entry.receipts.values()))[0] <= now):
            entry.receipts.popitem(last=False)  # the oldest: expired, or beyond the cap

    @asynccontextmanager
    async def lock(self, stream: str, deferred: bool = False) -> AsyncIterator[None]:
        # asyncio.Lock serves its waiters in arrival order: the memory store is fair; taken
        # at once (``deferred`` saves a round trip only where there is one)
        async with self._locks.setdefault(stream, asyncio.Lock()):
            yield
