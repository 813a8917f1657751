"""The Redis backend's ingest state (``IngestStore``): what the Prometheus-native doors
keep, shared by every replica and surviving restarts.

    <prefix>:{<stream>}:held        hash: a grouped stream's rows waiting for a channel
                                    ("r:<ms>" -> JSON row) and "last" (the last stored
                                    row), in the stream's slot
    <prefix>:{<stream>}:held-lock   string: the lease serialising read-modify-write of it
    <prefix>:{~watches}:specs       hash: watch name -> JSON definition (the API's)
    <prefix>:{~watches}:cursors     hash: watch name -> last evaluated time (epoch s)
    <prefix>:{~watches}:lease:<n>   string: the replica running watch n, expiring

The watches' keys share one slot (``~`` is in no stream id), so a watch and its cursor
are deleted in one MULTI on a Redis Cluster too.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from contextlib import AbstractAsyncContextManager

from service.stores.base import HeldRows
from service.stores.redis.connection import RedisConnection
from service.stores.redis.lock import LeaseLock
from service.stores.redis.scripts import LEASE, UNLOCK

WATCHES = "~watches"


class RedisIngest:
    def __init__(self, conn: RedisConnection, *, lock_lease_seconds: float = 5.0,
                 lock_wait_seconds: float = 10.0) -> None:
        self.conn = conn
        self.redis = conn.client
        self._lock = LeaseLock(conn, lease_seconds=lock_lease_seconds,
                               wait_seconds=lock_wait_seconds, part="held-lock")
        self._lease = self.redis.register_script(LEASE)
        self._release = self.redis.register_script(UNLOCK)
        self.k_specs = conn.slot_key(WATCHES, "specs")
        self.k_cursors = conn.slot_key(WATCHES, "cursors")

    # --- held rows of grouped streams ----------------------------------------------------
    def _held_key(self, stream: str) -> str:
        return self.conn.stream_key(stream, "held")

    async def held(self, stream: str) -> HeldRows:
        raw = await self.conn.call(self.redis.hgetall(self._held_key(stream)))
        held = HeldRows()
        for name, value in raw.items():
            name = name.decode()
            if name == "last":
                held.last = json.loads(value)
            else:
                held.rows[int(name[2:])] = json.loads(value)
        return held

    async def hold(self, stream: str, held: HeldRows, removed: Collection[int]) -> None:
        key = self._held_key(stream)
        await self.conn.ready()
        pipe = self.conn.pipeline(transaction=True)
        if removed:
            pipe.hdel(key, *(f"r:{t}" for t in removed))
        fields = {f"r:{t}": json.dumps(row) for t, row in held.rows.items()}
        if held.last is not None:
            fields["last"] = json.dumps(held.last)
        if fields:
            pipe.hset(key, mapping=fields)
        await self.conn.call(pipe.execute())

    def holding(self, stream: str) -> AbstractAsyncContextManager[None]:
        return self._lock(stream)

    async def forget_stream(self, stream: str) -> None:
        await self.conn.call(self.redis.delete(self._held_key(stream)))

    # --- watches -------------------------------------------------------------------------
    async def watches(self) -> dict[str, dict]:
        raw = await self.conn.call(self.redis.hgetall(self.k_specs))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    async def put_watch(self, name: str, spec: dict) -> bool:
        return bool(await self.conn.call(self.redis.hset(self.k_specs, name,
                                                         json.dumps(spec))))

    async def delete_watch(self, name: str) -> bool:
        await self.conn.ready()
        pipe = self.conn.pipeline(transaction=True)
        pipe.hdel(self.k_specs, name)
        pipe.hdel(self.k_cursors, name)
        return bool((await self.conn.call(pipe.execute()))[0])

    async def cursor(self, name: str) -> float | None:
        raw = await self.conn.call(self.redis.hget(self.k_cursors, name))
        return None if raw is None else float(raw)

    async def set_cursor(self, name: str, t: float) -> None:
        await self.conn.call(self.redis.hset(self.k_cursors, name, repr(t)))

    def _lease_key(self, name: str) -> str:
        return self.conn.slot_key(WATCHES, f"lease:{name}")

    async def lease(self, name: str, owner: str, seconds: float) -> bool:
        return bool(await self.conn.call(self._lease(
            keys=[self._lease_key(name)], args=[owner, int(seconds * 1000)])))

    async def release(self, name: str, owner: str) -> None:
        await self.conn.call(self._release(keys=[self._lease_key(name)], args=[owner]))
