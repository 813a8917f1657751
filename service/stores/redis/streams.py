"""The Redis backend's streams: shared by every replica, surviving restarts of the service.

Keys of one stream share the ``{stream}`` hash tag, so they live in one Redis Cluster slot
and the Lua scripts (``scripts.py``) may touch them together (on a cluster, a command on
many streams, like ``list``, is split by slot):

    <prefix>:{<stream>}:meta     hash: channels, window, detector, names, counters
                                 (points_seen, scored: the scored-up-to mark, version:
                                 bumped by every write that changes what scoring sees)
    <prefix>:{<stream>}:win      list: the last points (``retained``, the last batch whole,
                                 and points a crash left unscored), float64 bytes each
    <prefix>:{<stream>}:sections hash: the stream's state sections (section name -> bytes)
    <prefix>:{<stream>}:state    string: the whole state as versions before sections kept
                                 it; read while no section is written, deleted by the
                                 first commit
    <prefix>:{<stream>}:nudges   list: (stored, sent) stamps of the last nudged points
    <prefix>:{<stream>}:lock     string: per-stream lease (``lock.py``)
    <prefix>:{<stream>}:idem:<h> string: a batch's kept response (Idempotency-Key,
                                 h = its SHA-256), expiring; pending until the commit
                                 that scores the batch completes it
    <prefix>:{<stream>}:pending  set: the Idempotency-Keys of pending receipts
    <prefix>:streams             set: stream ids (an index; entries are checked on read)

Every append runs as one Lua script: the channel check, the RPUSH, the LTRIM and the
counters either all happen or none do. What to write is planned in Python
(``service/stores/plan.py``, shared with the in-memory backend) on the stream's state as
read just before; the script writes only if that state (last timestamp, points seen,
version) is unchanged, else the append plans again.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import random
import time
from collections.abc import Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

import numpy as np

from service.errors import Conflict, InvalidInput, StoreUnavailable
from service.stores.base import (
    LEGACY_SECTION,
    AppendResult,
    Commit,
    PendingReceipt,
    StreamMeta,
    StreamPolicy,
)
from service.stores.plan import (
    NO_NUDGES,
    context_needed,
    decode_points,
    encode_points,
    may_resend,
    plan_append,
    scoreable_unscored,
)
from service.stores.redis.connection import RedisConnection
from service.stores.redis.lock import Held, LeaseLock
from service.stores.redis.scripts import APPEND, COMMIT, COMMIT_STREAM, LOCKED_APPEND, PUT


class RedisStreams:
    def __init__(self, conn: RedisConnection, policy: StreamPolicy, *,
                 lock_lease_seconds: float = 5.0, lock_wait_seconds: float = 10.0) -> None:
        self.conn = conn
        self.policy = policy
        self.lock_wait_seconds = lock_wait_seconds
        self._redis = conn.client
        self._append = self._redis.register_script(APPEND)
        self._locked_append = self._redis.register_script(LOCKED_APPEND)
        self._put = self._redis.register_script(PUT)
        self._commit = self._redis.register_script(COMMIT_STREAM)
        self._lock = LeaseLock(conn, lease_seconds=lock_lease_seconds,
                               wait_seconds=lock_wait_seconds)

    # --- keys --------------------------------------------------------------------------
    def _key(self, stream: str, part: str) -> str:
        return self.conn.stream_key(stream, part)

    def _receipt_key(self, stream: str, key: str) -> str:
        return self._key(stream, "idem:" + hashlib.sha256(key.encode()).hexdigest())

    def _keys(self, stream: str) -> list[str]:
        """What the scripts touch (and a delete removes): meta, points, state, nudges,
        the pending receipts' keys."""
        return [self._key(stream, p)
                for p in ("meta", "win", "sections", "nudges", "state", "pending")]

    @property
    def _index(self) -> str:
        return self.conn.key("streams")

    # --- the interface -------------------------------------------------------------------
    async def put(self, meta: StreamMeta) -> tuple[StreamMeta, bool]:
        names = json.dumps(meta.channel_names) if meta.channel_names else ""
        bound = _binding_fields(meta.to_dict())
        out = await self.conn.call(self._put(
            keys=self._keys(meta.stream),
            args=[meta.channels, meta.window, meta.detector, names, repr(meta.created_at),
                  self.policy.ttl_seconds, bound["threshold"], bound["alert_budget"],
                  meta.timestamps or "", bound["params"]],
        ))
        if isinstance(out, list):
            raise Conflict(("body", "channels"), f"stream {meta.stream!r} has "
                           f"{int(out[1])} channels; it cannot change")
        await self.conn.call(self._redis.sadd(self._index, meta.stream))
        stored = await self.get(meta.stream)
        assert stored is not None
        return stored, bool(out)

    async def get(self, stream: str) -> StreamMeta | None:
        raw = await self.conn.call(self._redis.hgetall(self._key(stream, "meta")))
        return _meta_from_hash(stream, raw) if raw else None

    async def list(self, limit: int | None = None,
                   after: str | None = None) -> list[StreamMeta]:
        # the index is a set: its ids are sorted here (cheap), the metadata of one page
        # is read in one pipelined round trip
        ids = sorted(s.decode() for s in await self.conn.call(self._redis.smembers(self._index)))
        if after is not None:
            ids = ids[bisect.bisect_right(ids, after):]
        out: list[StreamMeta] = []
        gone: list[str] = []
        while ids and (limit is None or len(out) < limit):
            page, ids = (ids, []) if limit is None else (ids[:limit - len(out)],
                                                         ids[limit - len(out):])
            pipe = self.conn.pipeline(transaction=False)
            for stream in page:
                pipe.hgetall(self._key(stream, "meta"))
            for stream, raw in zip(page, await self.conn.call(pipe.execute()), strict=True):
                if raw:
                    out.append(_meta_from_hash(stream, raw))
                else:
                    gone.append(stream)
        if gone:  # expired by TTL or deleted elsewhere: tidy the index
            await self.conn.call(self._redis.srem(self._index, *gone))
        return out

    async def count(self, exact: bool = False, prefix: str | None = None) -> int:
        if prefix is not None:  # a tenant's: scanned (ids and tenants hold no glob chars)
            ids, cursor = set(), 0
            while True:
                cursor, batch = await self.conn.call(self._redis.sscan(
                    self._index, cursor, match=f"{prefix}*", count=1000))
                ids.update(s.decode() for s in batch)
                if not cursor:
                    break
            return len(ids) - (len(await self._tidy(ids)) if exact else 0)
        if exact:
            ids = {s.decode() for s in await self.conn.call(self._redis.smembers(self._index))}
            await self._tidy(ids)
        return int(await self.conn.call(self._redis.scard(self._index)))

    async def _tidy(self, ids: Collection[str]) -> list[str]:
        """Streams of the index that are gone (expired by TTL): out of it; returns them."""
        ids = list(ids)
        pipe = self.conn.pipeline(transaction=False)
        for stream in ids:
            pipe.exists(self._key(stream, "meta"))
        gone = [s for s, n in zip(ids, await self.conn.call(pipe.execute()), strict=True)
                if not n]
        if gone:
            await self.conn.call(self._redis.srem(self._index, *gone))
        return gone

    async def versions(self, streams: Collection[str]) -> dict[str, tuple[float, int]]:
        streams = list(streams)
        if not streams:
            return {}
        pipe = self.conn.pipeline(transaction=False)
        for stream in streams:
            pipe.hmget(self._key(stream, "meta"), "created_at", "version")
        found = await self.conn.call(pipe.execute())
        return {s: (float(c or 0.0), int(v or 0)) for s, (c, v) in zip(streams, found,
                                                                        strict=True)
                if c is not None or v is not None}

    async def delete(self, stream: str) -> bool:
        removed = await self.conn.call(self._redis.delete(*self._keys(stream)))
        await self.conn.call(self._redis.srem(self._index, stream))
        return bool(removed)

    async def append(self, stream: str, points: np.ndarray, *,
                     known: StreamMeta | None = None,
                     pending: PendingReceipt | None = None,
                     lock: object = None) -> AppendResult:
        """``lock``: the stream's lock, taken deferred (``lock(stream, deferred=True)``)
        and not yet held: the append's script takes it first, in the same round trip;
        busy, the append waits its turn in the lock's queue, then goes on. A refusal is
        decided holding it."""
        policy = self.policy
        taking = lock if isinstance(lock, Held) and not lock.acquired else None
        channels = points.shape[1] - 1
        deadline = time.monotonic() + self.lock_wait_seconds
        delay = 0.002
        while True:
            cached = None
            if known is not None:  # planned on the caller's meta: the script checks it
                meta = cached = known
                known = None
            else:
                raw = await self.conn.call(self._redis.hgetall(self._key(stream, "meta")))
                meta = _meta_from_hash(stream, raw) if raw else None
            if meta is not None and meta.channels != channels:
                if cached is not None:
                    continue  # a refusal is decided on the stored meta, never a kept one
                if taking is not None:  # ... read holding the lock
                    await self._lock.acquire(taking)
                    taking = None
                    continue
                raise _channel_rejection(stream, meta.channels, channels)
            last = meta.last_timestamp if meta else None
            stored, nudges = np.empty((0, 1 + channels)), NO_NUDGES
            if meta is not None and may_resend(points, last):
                blobs = await self.conn.call(self._redis.lrange(self._key(stream, "win"),
                                                                0, -1))
                stored = decode_points(blobs, channels)
                pairs = await self.conn.call(self._redis.lrange(self._key(stream, "nudges"),
                                                                0, -1))
                nudges = decode_points(pairs, 1)
            try:
                plan = plan_append(points, stored, last, policy.duplicates,
                                   (meta and meta.timestamps) or policy.timestamps, nudges,
                                   policy.max_back_seconds)
            except InvalidInput:
                if cached is not None:
                    continue  # the kept meta may be stale (a PUT changed the policy)
                if taking is not None:  # decided holding the lock, on what it protects
                    await self._lock.acquire(taking)
                    taking = None
                    continue
                raise
            rows = plan.rows
            now = repr(time.time())  # the created_at of a stream this append creates
            args: list = [channels, policy.window, policy.detector, policy.ttl_seconds, now,
                          "" if last is None else repr(last),
                          str(meta.points_seen if meta else 0),
                          repr(float(rows[-1, 0])) if len(rows) else "", len(rows),
                          len(plan.nudges), policy.unscored_max_points,
                          str(meta.version if meta else 0), encode_points(rows),
                          encode_points(plan.nudges),
                          "" if cached is None else context_needed(cached, len(rows))]
            receipt_key = self._receipt_key(stream, pending.key if pending else "")
            args += [pending.key, pending.encode(plan.actions, plan.stamps,
                                                 meta.created_at if meta else float(now)),
                     self.policy.receipt_ttl_seconds] if pending else ["", "", 0]
            keys = [*self._keys(stream), receipt_key]
            if taking is not None:  # the lock first, then the append, in one call
                out = await self.conn.call(self._locked_append(
                    keys=keys + taking.keys, args=args + [taking.token, taking.lease_ms]))
                if out[0] == b"err_locked":  # busy: queued for it, and nothing appended
                    await self._lock.queued(taking, [0, *out[1:]])
                    taking, known = None, cached  # the same plan, holding it now
                    continue
                self._lock.taken(taking)
                taking = None
            else:
                out = await self.conn.call(self._append(keys=keys, args=args))
            status = out[0].decode()
            if status == "err_stale":  # another append got in between: plan again
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"stream {stream!r} is busy (appends kept racing "
                                           "other writers)")
                await asyncio.sleep(random.uniform(0, delay))  # jitter: racers spread out
                delay = min(delay * 2, 0.05)
                continue
            if status == "err_channels":
                raise _channel_rejection(stream, int(out[1]), channels)
            created, unscored = int(out[1]), int(out[2])
            if created:
                await self.conn.call(self._redis.sadd(self._index, stream))
                meta = StreamMeta(stream=stream, channels=channels, window=policy.window,
                                  detector=policy.detector, created_at=float(now),
                                  points_scored=0)
            assert meta is not None
            if len(rows):  # what the script did to the meta it checked
                meta = replace(meta, points_seen=meta.points_seen + len(rows),
                               last_timestamp=float(rows[-1, 0]), version=meta.version + 1)
            held = decode_points(out[3], channels)
            usable = scoreable_unscored(unscored, len(held), len(rows), meta.points_seen,
                                        meta.window)
            return AppendResult(meta=meta, created=bool(created), duplicates=plan.duplicates,
                                accepted=len(rows), points=held, actions=plan.actions,
                                stamps=plan.stamps, unscored=usable, skipped=unscored - usable)

    async def window(self, stream: str, last: int | None = None) -> np.ndarray:
        meta = await self.get(stream)
        if meta is None:
            return np.empty((0, 1))
        blobs = await self.conn.call(self._redis.lrange(self._key(stream, "win"),
                                                        -(last or meta.window), -1))
        return decode_points(blobs, meta.channels)

    async def sections(self, stream: str,
                       names: Collection[str] | None = None) -> dict[str, bytes]:
        key = self._key(stream, "sections")
        if names is None:
            raw = await self.conn.call(self._redis.hgetall(key))
            found = {k.decode(): v for k, v in raw.items()}
        else:
            names = list(names)
            values = await self.conn.call(self._redis.hmget(key, names)) if names else []
            found = {k: v for k, v in zip(names, values, strict=True) if v is not None}
        if found or await self.conn.call(self._redis.exists(key)):
            return found
        legacy = await self.conn.call(self._redis.get(self._key(stream, "state")))
        return {LEGACY_SECTION: legacy} if legacy else {}

    async def receipt(self, stream: str, key: str) -> bytes | None:
        return await self.conn.call(self._redis.get(self._receipt_key(stream, key)))

    async def pending_receipts(self, stream: str) -> dict[str, bytes]:
        keys = sorted(k.decode() for k in await self.conn.call(
            self._redis.smembers(self._key(stream, "pending"))))
        if not keys:
            return {}
        found = await self.conn.call(self._redis.mget(
            [self._receipt_key(stream, k) for k in keys]))  # one slot: the stream's
        gone = [k for k, data in zip(keys, found, strict=True) if data is None]
        if gone:  # expired
            await self.conn.call(self._redis.srem(self._key(stream, "pending"), *gone))
        return {k: data for k, data in zip(keys, found, strict=True) if data is not None}

    def lock(self, stream: str, deferred: bool = False) -> AbstractAsyncContextManager[Held]:
        return self._lock(stream, deferred)

    # --- the commit's part -------------------------------------------------------------
    async def commit_alone(self, commit: Commit) -> int:
        """A commit that changed no alert: one script writes all of it (the MULTI's
        writes), then releases the stream's lock when ``commit.release`` holds it."""
        stream, held = commit.stream, commit.release
        if not (isinstance(held, Held) and held.stream == stream and held.acquired):
            held = None
        keys = [self._key(stream, p) for p in ("meta", "sections", "state")]
        keys += held.keys if held else self._lock._keys(stream)
        keys.append(self._key(stream, "pending"))
        keys += [self._receipt_key(stream, key) for key, _ in commit.all_receipts]
        args: list = ["" if commit.scored is None else commit.scored,
                      self.policy.ttl_seconds, self.policy.receipt_ttl_seconds,
                      held.token if held else "", held.lease_ms if held else 0,
                      len(commit.sections), len(commit.drop)]
        for name, blob in commit.sections.items():
            args += [name, blob]
        args += list(commit.drop)
        args += [data for _, data in commit.all_receipts]
        args += [key for key, _ in commit.all_receipts]
        version, granted = await self.conn.call(self._commit(keys=keys, args=args))
        if held:
            held.released, held.granted = True, granted
        return int(version)

    def stage_commit(self, pipe: Any, commit: Commit) -> None:
        """Queue a commit's stream writes on a MULTI pipeline, the version bump first (its
        result, the new version, is the transaction's first); the backend adds the alert
        writes to the same transaction (or, on a cluster, runs them first)."""
        stream, ttl = commit.stream, self.policy.ttl_seconds or None
        scored = "" if commit.scored is None else commit.scored
        bound = _binding_fields(commit.binding) if commit.binding is not None else {}
        pipe.eval(COMMIT, 1, self._key(stream, "meta"), scored,
                  *(x for pair in bound.items() for x in pair))
        sections = self._key(stream, "sections")
        if commit.sections:
            pipe.hset(sections, mapping=commit.sections)
            pipe.delete(self._key(stream, "state"))  # the whole-blob state it replaces
        if commit.drop:
            pipe.hdel(sections, *commit.drop)
        if ttl and (commit.sections or commit.drop):
            pipe.expire(sections, ttl)
        self.stage_receipt(pipe, commit)

    def stage_receipt(self, pipe: Any, commit: Commit) -> None:
        """The batch's receipts and those it completed; none of them pending any more."""
        kept = commit.all_receipts
        for key, data in kept:
            pipe.set(self._receipt_key(commit.stream, key), data,
                     ex=self.policy.receipt_ttl_seconds)
        if kept:
            pipe.srem(self._key(commit.stream, "pending"), *(key for key, _ in kept))


def _binding_fields(binding: dict) -> dict[str, str]:
    """A stream's detector binding (``BINDING`` fields) as its meta hash stores it ("":
    unset)."""
    params, threshold = binding["params"], binding["threshold"]
    budget = binding["alert_budget_per_day"]
    return {"detector": binding["detector"], "params": json.dumps(params) if params else "",
            "threshold": json.dumps(threshold) if threshold else "",
            "alert_budget": repr(budget) if budget else ""}


def _channel_rejection(stream: str, stored: int, sent: int) -> InvalidInput:
    return InvalidInput(("body", "points", 0, "values"),
                        f"stream {stream!r} has {stored} channels, got {sent}")


def _meta_from_hash(stream: str, raw: dict[bytes, bytes]) -> StreamMeta:
    get = {k.decode(): v.decode() for k, v in raw.items()}
    names = get.get("names") or ""
    last = get.get("last_ts")
    threshold = get.get("threshold") or ""
    budget = get.get("alert_budget") or ""
    timestamps = get.get("timestamps") or None  # absent in metas stored before the field
    params = get.get("params") or ""
    return StreamMeta(
        stream=stream,
        channels=int(get["channels"]),
        window=int(get["window"]),
        detector=get["detector"],
        channel_names=json.loads(names) if names else None,
        created_at=float(get.get("created_at", 0.0)),
        points_seen=int(get.get("points_seen", 0)),
        last_timestamp=float(last) if last else None,
        threshold=json.loads(threshold) if threshold else None,
        alert_budget_per_day=float(budget) if budget else None,
        timestamps=timestamps,
        points_scored=int(get["scored"]) if "scored" in get else None,
        params=json.loads(params) if params else None,
        version=int(get.get("version", 0)),
    )
