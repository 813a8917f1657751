"""Redis window store: shared by every replica, survives restarts of the service.

Keys of one stream share the ``{stream}`` hash tag, so they live in one Redis Cluster slot
and the Lua scripts below may touch them together (``cluster=True``: ``url`` names a node
of a Redis Cluster; a command on many streams, like ``list_streams``, is split by slot):

    <prefix>:{<stream>}:meta    hash: channels, window, detector, names, counters
    <prefix>:{<stream>}:win     list: the last ``window`` points, float64 bytes each
    <prefix>:{<stream>}:state   string: the stream's online detector + threshold state
    <prefix>:{<stream>}:nudges  list: (stored, sent) stamps of the last nudged points
    <prefix>:{<stream>}:lock    string: per-stream lease (token, PX expiry)
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
import json
import math
import random
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
)

# KEYS: meta, win, state, nudges. ARGV: channels, default window, default detector, ttl
# seconds, created_at, the last_ts and points_seen the plan was made on ("" and "0": no
# stream or no points), the new last_ts, n, m, then n encoded points (the plan's rows),
# then m encoded (stored, sent) stamp pairs of nudged points.
_APPEND = """
local meta, win, state, nudges = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local channels = tonumber(ARGV[1])
local ttl, n, m = tonumber(ARGV[4]), tonumber(ARGV[9]), tonumber(ARGV[10])
local created = 0
local window
if redis.call('EXISTS', meta) == 1 then
  local h = redis.call('HMGET', meta, 'channels', 'window', 'last_ts', 'points_seen')
  if tonumber(h[1]) ~= channels then return {'err_channels', h[1]} end
  -- the plan was made on this state: another append since means plan again
  if (h[3] or '') ~= ARGV[6] or (h[4] or '0') ~= ARGV[7] then return {'err_stale'} end
  window = tonumber(h[2])
else
  if ARGV[6] ~= '' then return {'err_stale'} end
  window = tonumber(ARGV[2])
  created = 1
end
if created == 1 then
  redis.call('HSET', meta, 'channels', channels, 'window', window, 'detector', ARGV[3],
             'created_at', ARGV[5], 'points_seen', 0)
end
local context = {}
if n > 0 then
  for i = 1, n, 500 do
    redis.call('RPUSH', win, unpack(ARGV, 10 + i, 10 + math.min(i + 499, n)))
  end
  for i = 1, m, 500 do
    redis.call('RPUSH', nudges, unpack(ARGV, 10 + n + i, 10 + n + math.min(i + 499, m)))
  end
  if m > 0 then redis.call('LTRIM', nudges, -window, -1) end
  context = redis.call('LRANGE', win, -(n + window - 1 + EXTRA), -1)
  redis.call('LTRIM', win, -(window + EXTRA), -1)
  redis.call('HINCRBY', meta, 'points_seen', n)
  redis.call('HSET', meta, 'last_ts', ARGV[8])
end
if ttl > 0 then
  redis.call('EXPIRE', meta, ttl)
  redis.call('EXPIRE', win, ttl)
  if redis.call('EXISTS', state) == 1 then redis.call('EXPIRE', state, ttl) end
  if redis.call('EXISTS', nudges) == 1 then redis.call('EXPIRE', nudges, ttl) end
end
local out = {'ok', tostring(created)}
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
  if tonumber(m[2]) ~= window or m[3] ~= ARGV[3] then redis.call('DEL', state) end
  redis.call('LTRIM', win, -(window + EXTRA), -1)
else
  created = 1
  redis.call('HSET', meta, 'created_at', ARGV[5], 'points_seen', 0)
end
redis.call('HSET', meta, 'channels', channels, 'window', window, 'detector', ARGV[3],
           'names', ARGV[4], 'threshold', ARGV[7], 'alert_budget', ARGV[8],
           'timestamps', ARGV[9])
if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', meta, tonumber(ARGV[6])) end
return created
""".replace("EXTRA", str(HISTORY_EXTRA))

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
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
        lock_lease_seconds: float = 30.0,
        lock_wait_seconds: float = 10.0,
        cluster: bool = False,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.lock_lease_seconds = lock_lease_seconds
        self.lock_wait_seconds = lock_wait_seconds
        self.cluster = cluster
        self._redis = connect(url, cluster=cluster, timeout_seconds=timeout_seconds)
        self._append = self._redis.register_script(_APPEND)
        self._put = self._redis.register_script(_PUT)
        self._unlock = self._redis.register_script(_UNLOCK)

    # --- keys --------------------------------------------------------------------------
    def _key(self, stream: str, part: str) -> str:
        return f"{self.prefix}:{{{stream}}}:{part}"

    def _keys(self, stream: str) -> list[str]:
        return [self._key(stream, p) for p in ("meta", "win", "state", "nudges")]

    @property
    def _index(self) -> str:
        return f"{self.prefix}:streams"

    async def _call(self, coro):  # noqa: ANN001, ANN202 - any redis coroutine
        try:
            return await coro
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable at {self.url}: {exc}") from exc
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
    ) -> AppendResult:
        channels = points.shape[1] - 1
        deadline = time.monotonic() + self.lock_wait_seconds
        delay = 0.002
        while True:
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
                          repr(time.time()), (raw or {}).get(b"last_ts", b"").decode(),
                          (raw or {}).get(b"points_seen", b"0").decode(),
                          repr(float(rows[-1, 0])) if len(rows) else "", len(rows),
                          len(plan.nudges)]
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
            meta = await self.get_stream(stream)
            assert meta is not None
            return AppendResult(meta=meta, created=bool(created), duplicates=plan.duplicates,
                                accepted=len(rows), points=decode_points(out[2:], channels),
                                actions=plan.actions, stamps=plan.stamps)

    async def window(self, stream: str) -> np.ndarray:
        meta = await self.get_stream(stream)
        if meta is None:
            return np.empty((0, 1))
        blobs = await self._call(self._redis.lrange(self._key(stream, "win"), -meta.window, -1))
        return decode_points(blobs, meta.channels)

    async def load_state(self, stream: str) -> bytes | None:
        return await self._call(self._redis.get(self._key(stream, "state")))

    async def save_state(self, stream: str, blob: bytes) -> None:
        ex = self.ttl_seconds or None
        await self._call(self._redis.set(self._key(stream, "state"), blob, ex=ex))

    @asynccontextmanager
    async def lock(self, stream: str) -> AsyncIterator[None]:
        # A lease, not a mutex: a crashed replica's lock expires after lock_lease_seconds.
        key, token = self._key(stream, "lock"), secrets.token_hex(8)
        lease_ms = int(self.lock_lease_seconds * 1000)
        deadline = time.monotonic() + self.lock_wait_seconds
        delay = 0.002
        while not await self._call(self._redis.set(key, token, nx=True, px=lease_ms)):
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"stream {stream!r} is busy (lock wait timed out)")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            with contextlib.suppress(RedisError):  # the lease expires by itself
                await self._unlock(keys=[key], args=[token])


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
    )
