"""The Redis backend's webhooks: subscriptions, the delivery queue and the dead letters
(what they mean: ``service/webhooks/model.py``). Keys (``RedisConnection.shared_key``:
the alerts' hash slot on a cluster):

    <prefix>:webhooks                    hash: subscription id -> JSON (secret included)
    <prefix>:alerts:outbox               list: events to fan out (written by the commit)
    <prefix>:webhooks:fanout             list: events being fanned out (crash recovery)
    <prefix>:webhooks:deliveries         hash: delivery id -> JSON (event body, attempts)
    <prefix>:webhooks:due                zset: delivery id -> due time (epoch seconds)
    <prefix>:webhooks:waiting:<sub id>   zset: deliveries waiting on a backoff for the
                                         subscription -> the due time they wait for
    <prefix>:webhooks:dead               hash: delivery id -> JSON, after the last failure
                                         (deleted after the dead-letter retention)
    <prefix>:webhooks:dead:idx           zset: delivery id -> time of death
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import asdict
from typing import Any

from service.stores.redis.connection import RedisConnection
from service.webhooks.model import DELETED, Subscription, delivery_for, revived

_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  local body = redis.call('HGET', KEYS[2], id)
  if body then out[#out + 1] = body else redis.call('ZREM', KEYS[1], id) end
end
return out
"""

# KEYS: waiting, due, deliveries. ARGV: now. Deliveries still waiting for the due time they
# were given (not claimed since, not due anyway) are due at their event's time: at once,
# oldest first.
_RELEASE = """
local waiting = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local n = 0
for i = 1, #waiting, 2 do
  local id, at = waiting[i], tonumber(waiting[i + 1])
  local due = tonumber(redis.call('ZSCORE', KEYS[2], id) or '-1')
  local body = redis.call('HGET', KEYS[3], id)
  if body and due == at and due > tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[2], cjson.decode(body)['created'], id)
    n = n + 1
  end
end
redis.call('DEL', KEYS[1])
return n
"""


class RedisWebhooks:
    def __init__(self, conn: RedisConnection, outbox: str,
                 dead_retention_seconds: float) -> None:
        self.dead_retention_seconds = dead_retention_seconds
        self.conn = conn
        self.redis = conn.client
        self.outbox = outbox  # the alerts' outbox key: the commit writes events there
        k = conn.shared_key
        self.k_subs, self.k_fanout = k("webhooks"), k("webhooks:fanout")
        self.k_deliveries, self.k_due = k("webhooks:deliveries"), k("webhooks:due")
        self.k_dead, self.k_dead_idx = k("webhooks:dead"), k("webhooks:dead:idx")
        self._claim = self.redis.register_script(_CLAIM)
        self._release = self.redis.register_script(_RELEASE)

    def _waiting(self, sub_id: str) -> str:
        return self.conn.shared_key(f"webhooks:waiting:{sub_id}")

    async def _call(self, coro: Any) -> Any:
        return await self.conn.call(coro)

    async def add(self, sub: Subscription) -> None:
        await self._call(self.redis.hset(self.k_subs, sub.id, json.dumps(asdict(sub))))

    async def remove(self, sub_id: str) -> bool:
        if not await self._call(self.redis.hdel(self.k_subs, sub_id)):
            return False
        # its pending deliveries, read with HSCAN (the hash may be large), dead-lettered
        orphans, cursor = [], 0
        while True:
            cursor, batch = await self._call(self.redis.hscan(self.k_deliveries, cursor,
                                                              count=500))
            orphans += [d for raw in batch.values()
                        if (d := json.loads(raw))["subscription_id"] == sub_id]
            if not cursor:
                break
        for d in orphans:
            await self.bury(d | {"last_error": DELETED, "last_status": None})
        await self._call(self.redis.delete(self._waiting(sub_id)))
        return True

    async def subscriptions(self) -> dict[str, Subscription]:
        raw = await self._call(self.redis.hgetall(self.k_subs))
        return {k.decode(): Subscription(**json.loads(v)) for k, v in raw.items()}

    async def recover(self) -> None:
        """Events a crashed worker was fanning out go back to the outbox (the fan-out is
        idempotent, so a replica's in-flight event fanned out twice is harmless)."""
        while await self._call(self.redis.lmove(self.k_fanout, self.outbox, "RIGHT", "LEFT")):
            pass

    async def fan_out(self, subs: dict[str, Subscription], limit: int) -> int:
        n = 0
        while n < limit:
            raw = await self._call(self.redis.lmove(self.outbox, self.k_fanout, "LEFT", "RIGHT"))
            if raw is None:
                break
            event = json.loads(raw)
            pipe = self.redis.pipeline(transaction=True)
            now = time.time()
            for sub in subs.values():
                if sub.wants(event):
                    d = delivery_for(event, raw.decode(), sub)
                    pipe.hsetnx(self.k_deliveries, d["id"], json.dumps(d))
                    pipe.zadd(self.k_due, {d["id"]: now}, nx=True)
            pipe.lrem(self.k_fanout, 1, raw)
            await self._call(pipe.execute())
            n += 1
        return n

    async def claim_due(self, now: float, limit: int, lease: float) -> list[dict]:
        out = await self._call(self._claim(keys=[self.k_due, self.k_deliveries],
                                           args=[repr(now), limit, repr(now + lease)]))
        return [json.loads(b) for b in out]

    async def ack(self, delivery: dict) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.k_due, delivery["id"])
        pipe.hdel(self.k_deliveries, delivery["id"])
        pipe.zrem(self._waiting(delivery["subscription_id"]), delivery["id"])
        await self._call(pipe.execute())

    async def retry(self, delivery: dict, due: float) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.k_deliveries, delivery["id"], json.dumps(delivery))
        pipe.zadd(self.k_due, {delivery["id"]: due})
        pipe.zadd(self._waiting(delivery["subscription_id"]), {delivery["id"]: due})
        await self._call(pipe.execute())

    async def release(self, subscription_id: str) -> int:
        return int(await self._call(self._release(
            keys=[self._waiting(subscription_id), self.k_due, self.k_deliveries],
            args=[repr(time.time())])))

    async def pending(self, delivery_ids: Collection[str]) -> dict[str, float]:
        ids = list(delivery_ids)
        if not ids:
            return {}
        dues = await self._call(self.redis.zmscore(self.k_due, ids))
        return {i: float(d) for i, d in zip(ids, dues, strict=True) if d is not None}

    async def bury(self, delivery: dict) -> None:
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.k_due, delivery["id"])
        pipe.hdel(self.k_deliveries, delivery["id"])
        pipe.zrem(self._waiting(delivery["subscription_id"]), delivery["id"])
        pipe.hset(self.k_dead, delivery["id"], json.dumps(delivery | {"failed_at": now}))
        pipe.zadd(self.k_dead_idx, {delivery["id"]: now})
        await self._call(pipe.execute())
        await self._prune()

    async def _prune(self) -> None:
        """Dead letters past their retention: gone from the index and the hash."""
        cutoff = time.time() - self.dead_retention_seconds
        old = await self._call(self.redis.zrangebyscore(self.k_dead_idx, "-inf",
                                                        f"({cutoff!r}", start=0, num=1000))
        if old:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hdel(self.k_dead, *old)
            pipe.zrem(self.k_dead_idx, *old)
            await self._call(pipe.execute())

    async def dead_letters(self, limit: int) -> list[dict]:
        await self._prune()
        ids = await self._call(self.redis.zrevrange(self.k_dead_idx, 0, limit - 1))
        if not ids:
            return []
        raws = await self._call(self.redis.hmget(self.k_dead, ids))
        return [json.loads(r) for r in raws if r]

    async def dead_letter(self, delivery_id: str) -> dict | None:
        await self._prune()
        raw = await self._call(self.redis.hget(self.k_dead, delivery_id))
        return json.loads(raw) if raw else None

    async def replay(self, delivery_id: str) -> dict | None:
        raw = await self._call(self.redis.hget(self.k_dead, delivery_id))
        if raw is None:
            return None
        d = revived(json.loads(raw))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.k_dead, delivery_id)
        pipe.zrem(self.k_dead_idx, delivery_id)
        pipe.hset(self.k_deliveries, delivery_id, json.dumps(d))
        pipe.zadd(self.k_due, {delivery_id: time.time()})
        await self._call(pipe.execute())
        return d

    async def depth(self) -> int:
        return int(await self._call(self.redis.zcard(self.k_due)))
