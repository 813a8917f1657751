"""Redis window store: shared by every replica, survives restarts of the service.

Keys of one stream share the ``{stream}`` hash tag, so they live in one Redis Cluster slot
and the Lua scripts below may touch them together (``cluster=True``: ``url`` names a node
of a Redis Cluster; a command on many streams, like ``list_streams``, is split by slot):

    <prefix>:{<stream>}:meta    hash: channels, window, detector, names, counters
                                (points_seen, scored: the scored-up-to mark, version:
                                bumped by every write that changes what scoring sees)
    <prefix>:{<stream>}:win     list: the last points (``retained``, the last batch whole,
                                and points a crash left unscored), float64 bytes each
    <prefix>:{<stream>}:state   string: the stream's online detector + threshold state
    <prefix>:{<stream>}:nudges  list: (stored, sent) stamps of the last nudged points
    <prefix>:{<stream>}:lock    string: per-stream lease (token, PX expiry), renewed by
                                its holder while it works
    <prefix>:{<stream>}:idem:<h> string: a batch's kept response (Idempotency-Key,
                                h = its SHA-256), expiring
    <prefix>:streams            set: stream ids (an index; entries are checked on read)

Every append runs as one Lua script: the channel check, the RPUSH, the LTRIM and the
counters either all happen or none do. What to write is planned in Python
(``plan_append``, shared with the in-memory store) on the stream's state as read just
before; the script writes only if that state (last timestamp, points seen) is unchanged,
else the append plans again.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import json
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.redaction import redact_url
from service.stores.base import (
    HISTORY_EXTRA,
    NO_NUDGES,
    AppendResult,
    DuplicatePolicy,
    StoreRejection,
    StoreUnavailable,
    StreamMeta,
    TimestampPolicy,
    decode_points,
    encode_point,
    may_resend,
    plan_append,
    scoreable_unscored,
)

log = logging.getLogger("tsad.store")

# KEYS: meta, win, state, nudges. ARGV: channels, default window, default detector, ttl
# seconds, created_at, the last_ts and points_seen the plan was made on ("" and "0": no
# stream or no points), the new last_ts, n, m, the most unscored points to keep, the
# version the plan was made on, then n encoded points (the plan's rows), then m encoded
# (stored, sent) stamp pairs of nudged points. Returns 'ok', created, the stream's
# unscored points before the batch, the length of the meta hash and the hash after the
# append (field, value, ...), then the held points: up to that many unscored ones with
# their context, then the batch.
_APPEND = """
local meta, win, state, nudges = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local channels = tonumber(ARGV[1])
local ttl, n, m = tonumber(ARGV[4]), tonumber(ARGV[9]), tonumber(ARGV[10])
local cap = tonumber(ARGV[11])
local P = 12  -- ARGV[P + i]: the i-th encoded point
local created = 0
local window
local unscored = 0
if redis.call('EXISTS', meta) == 1 then
  local h = redis.call('HMGET', meta, 'channels', 'window', 'last_ts', 'points_seen',
                       'scored', 'version')
  if tonumber(h[1]) ~= channels then return {'err_channels', h[1]} end
  -- the plan was made on this state: another write since means plan again
  if (h[3] or '') ~= ARGV[6] or (h[4] or '0') ~= ARGV[7] or (h[6] or '0') ~= ARGV[12] then
    return {'err_stale'}
  end
  window = tonumber(h[2])
  -- stored but never scored (a crash before the commit): held until scored
  if h[5] then unscored = math.max(0, tonumber(h[4] or '0') - tonumber(h[5])) end
else
  if ARGV[6] ~= '' then return {'err_stale'} end
  window = tonumber(ARGV[2])
  created = 1
end
if created == 1 then
  redis.call('HSET', meta, 'channels', channels, 'window', window, 'detector', ARGV[3],
             'created_at', ARGV[5], 'points_seen', 0, 'scored', 0, 'version', 0)
end
-- held after the batch: the batch whole (a retry of it is recognised), the unscored
-- before it, and the context that scoring them needs
local keep = n + math.min(unscored, cap) + window - 1 + EXTRA
local context = {}
if n > 0 then
  for i = 1, n, 500 do
    redis.call('RPUSH', win, unpack(ARGV, P + i, P + math.min(i + 499, n)))
  end
  for i = 1, m, 500 do
    redis.call('RPUSH', nudges, unpack(ARGV, P + n + i, P + n + math.min(i + 499, m)))
  end
  if m > 0 then redis.call('LTRIM', nudges, -keep, -1) end
  context = redis.call('LRANGE', win, -keep, -1)
  redis.call('LTRIM', win, -keep, -1)
  redis.call('HINCRBY', meta, 'points_seen', n)
  redis.call('HINCRBY', meta, 'version', 1)
  redis.call('HSET', meta, 'last_ts', ARGV[8])
elseif unscored > 0 then
  context = redis.call('LRANGE', win, -keep, -1)
end
if ttl > 0 then
  redis.call('EXPIRE', meta, ttl)
  redis.call('EXPIRE', win, ttl)
  if redis.call('EXISTS', state) == 1 then redis.call('EXPIRE', state, ttl) end
  if redis.call('EXISTS', nudges) == 1 then redis.call('EXPIRE', nudges, ttl) end
end
local h = redis.call('HGETALL', meta)
local out = {'ok', tostring(created), tostring(unscored), tostring(#h)}
for _, e in ipairs(h) do out[#out + 1] = e end
for _, e in ipairs(context) do out[#out + 1] = e end
return out
""".replace("EXTRA", str(HISTORY_EXTRA))

# KEYS: meta, win, state. ARGV: channels, window, detector, names json, created_at, ttl,
# threshold json, alert budget ("" = unset), timestamp policy ("" = server default).
_PUT = """
local meta, win, state = KEYS[1], KEYS[2], KEYS[3]
local channels, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local created = 0
if redis.call('EXISTS', meta) == 1 then
  local m = redis.call('HMGET', meta, 'channels', 'window', 'detector')
  if tonumber(m[1]) ~= channels then return {'err_channels', m[1]} end
  if tonumber(m[2]) ~= window or m[3] ~= ARGV[3] then
    redis.call('DEL', state)  -- a new detector starts afresh: nothing left to score
    redis.call('HSET', meta, 'scored', redis.call('HGET', meta, 'points_seen') or 0)
  end
  redis.call('LTRIM', win, -(window + EXTRA), -1)
else
  created = 1
  redis.call('HSET', meta, 'created_at', ARGV[5], 'points_seen', 0, 'scored', 0)
end
redis.call('HSET', meta, 'channels', channels, 'window', window, 'detector', ARGV[3],
           'names', ARGV[4], 'threshold', ARGV[7], 'alert_budget', ARGV[8],
           'timestamps', ARGV[9])
redis.call('HINCRBY', meta, 'version', 1)
if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', meta, tonumber(ARGV[6])) end
return created
""".replace("EXTRA", str(HISTORY_EXTRA))

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lock. ARGV: token, lease ms. The holder extends its own lease only.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: meta. ARGV: points scored ("": unchanged). A state commit: set the mark, bump the
# version, return it. Only on a stream that still exists (a mark alone would be a meta
# hash without its fields): 0.
_COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'scored', ARGV[1]) end
return redis.call('HINCRBY', KEYS[1], 'version', 1)
"""


class RedisWindowStore:
    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tsad",
        ttl_seconds: int = 0,
        timeout_seconds: float = 2.0,
        lock_lease_seconds: float = 5.0,
        lock_wait_seconds: float = 10.0,
        unscored_max_points: int = 10_000,
        receipt_ttl_seconds: int = 86_400,
        cluster: bool = False,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.lock_lease_seconds = lock_lease_seconds
        self.lock_wait_seconds = lock_wait_seconds
        self.unscored_max_points = unscored_max_points
        self.receipt_ttl_seconds = receipt_ttl_seconds
        self.cluster = cluster
        self._redis = connect(url, cluster=cluster, timeout_seconds=timeout_seconds)
        self._append = self._redis.register_script(_APPEND)
        self._put = self._redis.register_script(_PUT)
        self._unlock = self._redis.register_script(_UNLOCK)
        self._renew = self._redis.register_script(_RENEW)

    # --- keys --------------------------------------------------------------------------
    def _key(self, stream: str, part: str) -> str:
        return f"{self.prefix}:{{{stream}}}:{part}"

    def _receipt_key(self, stream: str, key: str) -> str:
        return self._key(stream, "idem:" + hashlib.sha256(key.encode()).hexdigest())

    def _keys(self, stream: str) -> list[str]:
        return [self._key(stream, p) for p in ("meta", "win", "state", "nudges")]

    @property
    def _index(self) -> str:
        return f"{self.prefix}:streams"

    async def _call(self, coro):  # noqa: ANN001, ANN202 - any redis coroutine
        try:
            return await coro
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(  # the URL may carry the password: never shown
                f"Redis unreachable at {redact_url(self.url)}: {exc}") from exc
        except RedisError as exc:
            raise StoreUnavailable(f"Redis error: {exc}") from exc

    # --- protocol ----------------------------------------------------------------------
    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()

    async def put_stream(self, meta: StreamMeta) -> tuple[StreamMeta, bool]:
        names = json.dumps(meta.channel_names) if meta.channel_names else ""
        threshold = json.dumps(meta.threshold) if meta.threshold else ""
        budget = repr(meta.alert_budget_per_day) if meta.alert_budget_per_day else ""
        out = await self._call(self._put(
            keys=self._keys(meta.stream),
            args=[meta.channels, meta.window, meta.detector, names, repr(meta.created_at),
                  self.ttl_seconds, threshold, budget, meta.timestamps or ""],
        ))
        if isinstance(out, list):
            raise StoreRejection(
                ("body", "channels"),
                f"stream {meta.stream!r} has {int(out[1])} channels; it cannot change",
                status=409,
            )
        await self._call(self._redis.sadd(self._index, meta.stream))
        stored = await self.get_stream(meta.stream)
        assert stored is not None
        return stored, bool(out)

    async def get_stream(self, stream: str) -> StreamMeta | None:
        raw = await self._call(self._redis.hgetall(self._key(stream, "meta")))
        return _meta_from_hash(stream, raw) if raw else None

    async def list_streams(self, limit: int | None = None,
                           after: str | None = None) -> list[StreamMeta]:
        # the index is a set: its ids are sorted here (cheap), the metadata of one page
        # is read in one pipelined round trip
        ids = sorted(s.decode() for s in await self._call(self._redis.smembers(self._index)))
        if after is not None:
            ids = ids[bisect.bisect_right(ids, after):]
        out: list[StreamMeta] = []
        gone: list[str] = []
        while ids and (limit is None or len(out) < limit):
            page, ids = (ids, []) if limit is None else (ids[:limit - len(out)],
                                                         ids[limit - len(out):])
            pipe = self._redis.pipeline(transaction=False)
            for stream in page:
                pipe.hgetall(self._key(stream, "meta"))
            for stream, raw in zip(page, await self._call(pipe.execute()), strict=True):
                if raw:
                    out.append(_meta_from_hash(stream, raw))
                else:
                    gone.append(stream)
        if gone:  # expired by TTL or deleted elsewhere: tidy the index
            await self._call(self._redis.srem(self._index, *gone))
        return out

    async def count_streams(self, exact: bool = False) -> int:
        if exact:
            ids = [s.decode() for s in await self._call(self._redis.smembers(self._index))]
            pipe = self._redis.pipeline(transaction=False)
            for stream in ids:
                pipe.exists(self._key(stream, "meta"))
            gone = [s for s, n in zip(ids, await self._call(pipe.execute()), strict=True)
                    if not n]
            if gone:
                await self._call(self._redis.srem(self._index, *gone))
        return int(await self._call(self._redis.scard(self._index)))

    async def delete_stream(self, stream: str) -> bool:
        removed = await self._call(self._redis.delete(*self._keys(stream)))
        await self._call(self._redis.srem(self._index, stream))
        return bool(removed)

    async def append(
        self,
        stream: str,
        points: np.ndarray,
        *,
        default_window: int,
        default_detector: str,
        duplicates: DuplicatePolicy = "reject",
        default_timestamps: TimestampPolicy = "reject",
        max_back_seconds: float = math.inf,
        known: StreamMeta | None = None,
    ) -> AppendResult:
        channels = points.shape[1] - 1
        deadline = time.monotonic() + self.lock_wait_seconds
        delay = 0.002
        while True:
            if known is not None:  # planned on the caller's meta: the script checks it
                meta, known = known, None
            else:
                raw = await self._call(self._redis.hgetall(self._key(stream, "meta")))
                meta = _meta_from_hash(stream, raw) if raw else None
            if meta is not None and meta.channels != channels:
                raise _channel_rejection(stream, meta.channels, channels)
            last = meta.last_timestamp if meta else None
            stored, nudges = np.empty((0, 1 + channels)), NO_NUDGES
            if meta is not None and may_resend(points, last):
                blobs = await self._call(self._redis.lrange(self._key(stream, "win"), 0, -1))
                stored = decode_points(blobs, channels)
                pairs = await self._call(self._redis.lrange(self._key(stream, "nudges"), 0, -1))
                nudges = decode_points(pairs, 1)
            plan = plan_append(points, stored, last, duplicates,
                               (meta and meta.timestamps) or default_timestamps, nudges,
                               max_back_seconds)
            rows = plan.rows
            args: list = [channels, default_window, default_detector, self.ttl_seconds,
                          repr(time.time()), "" if last is None else repr(last),
                          str(meta.points_seen if meta else 0),
                          repr(float(rows[-1, 0])) if len(rows) else "", len(rows),
                          len(plan.nudges), self.unscored_max_points,
                          str(meta.version if meta else 0)]
            args += [encode_point(row) for row in rows]
            args += [encode_point(pair) for pair in plan.nudges]
            out = await self._call(self._append(keys=self._keys(stream), args=args))
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
            created = int(out[1])
            if created:
                await self._call(self._redis.sadd(self._index, stream))
            fields = int(out[3])
            flat = out[4:4 + fields]
            meta = _meta_from_hash(stream, dict(zip(flat[::2], flat[1::2], strict=True)))
            held = decode_points(out[4 + fields:], channels)
            unscored = int(out[2])
            usable = scoreable_unscored(unscored, len(held), len(rows), meta.points_seen,
                                        meta.window)
            return AppendResult(meta=meta, created=bool(created), duplicates=plan.duplicates,
                                accepted=len(rows), points=held, actions=plan.actions,
                                stamps=plan.stamps, unscored=usable, skipped=unscored - usable)

    async def window(self, stream: str) -> np.ndarray:
        meta = await self.get_stream(stream)
        if meta is None:
            return np.empty((0, 1))
        blobs = await self._call(self._redis.lrange(self._key(stream, "win"), -meta.window, -1))
        return decode_points(blobs, meta.channels)

    async def load_state(self, stream: str) -> bytes | None:
        return await self._call(self._redis.get(self._key(stream, "state")))

    async def save_state(self, stream: str, blob: bytes, *, scored: int | None = None,
                         receipt: tuple[str, bytes] | None = None) -> int:
        pipe = self._redis.pipeline(transaction=True)
        self.stage_state(pipe, stream, blob, scored, receipt)
        return int((await self._call(pipe.execute()))[0])

    def stage_state(self, pipe: Pipeline, stream: str, blob: bytes, scored: int | None = None,
                    receipt: tuple[str, bytes] | None = None) -> None:
        """Queue the writes of ``save_state`` on a MULTI pipeline, the version bump first
        (its result, the new version, is the transaction's first); the alert store's
        commit adds its own writes to the same transaction."""
        pipe.eval(_COMMIT, 1, self._key(stream, "meta"), "" if scored is None else scored)
        pipe.set(self._key(stream, "state"), blob, ex=self.ttl_seconds or None)
        if receipt is not None:
            pipe.set(self._receipt_key(stream, receipt[0]), receipt[1],
                     ex=self.receipt_ttl_seconds)

    async def get_receipt(self, stream: str, key: str) -> bytes | None:
        return await self._call(self._redis.get(self._receipt_key(stream, key)))

    async def put_receipt(self, stream: str, key: str, data: bytes) -> None:
        await self._call(self._redis.set(self._receipt_key(stream, key), data,
                                         ex=self.receipt_ttl_seconds))

    @asynccontextmanager
    async def lock(self, stream: str) -> AsyncIterator[None]:
        # A lease, not a mutex: the holder renews it every third of lock_lease_seconds
        # while it works, so a crashed holder's lock lapses within one lease.
        key, token = self._key(stream, "lock"), secrets.token_hex(8)
        lease_ms = int(self.lock_lease_seconds * 1000)
        deadline = time.monotonic() + self.lock_wait_seconds
        delay = 0.002
        while not await self._call(self._redis.set(key, token, nx=True, px=lease_ms)):
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"stream {stream!r} is busy (lock wait timed out)")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        heartbeat = asyncio.create_task(self._hold(stream, key, token, lease_ms))
        try:
            yield
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            with contextlib.suppress(RedisError):  # the lease expires by itself
                await self._unlock(keys=[key], args=[token])

    async def _hold(self, stream: str, key: str, token: str, lease_ms: int) -> None:
        """Renew the lease while its holder is alive; stop if another holder has it."""
        while True:
            await asyncio.sleep(lease_ms / 3000)
            try:
                if not await self._renew(keys=[key], args=[token, lease_ms]):
                    log.warning("stream lock lost: its lease ran out before renewal",
                                extra={"stream": stream})
                    return
            except (RedisError, OSError) as exc:  # unreachable now: try next period
                log.warning("stream lock renewal failed", extra={"stream": stream,
                                                                 "error": str(exc)})


def connect(url: str, *, cluster: bool = False,
            timeout_seconds: float = 2.0) -> aioredis.Redis | RedisCluster:
    """A client of one Redis, or of a Redis Cluster that ``url`` names one node of (the
    client finds the others and routes each command to its key's slot)."""
    kind = RedisCluster if cluster else aioredis.Redis
    return kind.from_url(url, socket_timeout=timeout_seconds,
                         socket_connect_timeout=timeout_seconds, health_check_interval=15)


def _channel_rejection(stream: str, stored: int, sent: int) -> StoreRejection:
    return StoreRejection(("body", "points", 0, "values"),
                          f"stream {stream!r} has {stored} channels, got {sent}")


def _meta_from_hash(stream: str, raw: dict[bytes, bytes]) -> StreamMeta:
    get = {k.decode(): v.decode() for k, v in raw.items()}
    names = get.get("names") or ""
    last = get.get("last_ts")
    threshold = get.get("threshold") or ""
    budget = get.get("alert_budget") or ""
    timestamps = get.get("timestamps") or None  # absent in metas stored before the field
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
        version=int(get.get("version", 0)),
    )
