"""Subscriptions, the delivery queue and the dead-letter list.

Life of an event: the scoring commit appends it to the alert outbox (atomically with the
alert). The worker *fans it out*: one delivery per matching subscription, id =
hash(event id, subscription id), written if absent and scheduled now, and only then is
the event removed from the outbox: a crash in between fans it out again onto the same
delivery ids, so nothing doubles. Due deliveries are *claimed* with a lease (their due
time moves to now + lease); a success deletes them, a failure reschedules them with
backoff, the N-th failure moves them to the dead-letter list, and a worker that dies
mid-delivery simply lets the lease run out: the delivery is sent again (at-least-once;
receivers deduplicate on the ``Idempotency-Key`` header, the event id).

Nothing pending is dropped silently: deleting a subscription dead-letters its pending
deliveries with ``last_error`` "subscription deleted" (as does the worker for one that
races the deletion). Dead letters are deleted after a retention period.

Redis keys:

    <prefix>:webhooks                    hash: subscription id -> JSON (secret included)
    <prefix>:alerts:outbox               list: events to fan out (written by the alert store)
    <prefix>:webhooks:fanout             list: events being fanned out (crash recovery)
    <prefix>:webhooks:deliveries         hash: delivery id -> JSON (event body, attempts)
    <prefix>:webhooks:due                zset: delivery id -> due time (epoch seconds)
    <prefix>:webhooks:dead               hash: delivery id -> JSON, after the last failure
                                         (deleted after the dead-letter retention)
    <prefix>:webhooks:dead:idx           zset: delivery id -> time of death
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Protocol

from service.alerts.model import SEVERITIES
from service.alerts.store import AlertStore, RedisAlertStore
from service.redaction import redact_url


@dataclass
class Subscription:
    id: str
    url: str
    streams: str  # glob over stream ids
    min_severity: str
    secret: str
    created_at: float
    description: str | None = None

    def wants(self, event: dict) -> bool:
        alert = event["alert"]
        return (fnmatch.fnmatchcase(alert["stream"], self.streams)
                and SEVERITIES.index(alert["severity"]) >= SEVERITIES.index(self.min_severity))

    def public(self) -> dict:
        d = asdict(self)
        d.pop("secret")
        d["url"] = redact_url(d["url"])  # a receiver's basic-auth password is a secret too
        return d


def delivery_for(event: dict, raw: str, sub: Subscription) -> dict:
    digest = hashlib.sha256(f"{event['id']}\0{sub.id}".encode()).hexdigest()[:24]
    return {"id": f"dl_{digest}", "event_id": event["id"], "event_type": event["type"],
            "subscription_id": sub.id, "body": raw, "attempts": 0,
            "created": event["created"], "last_error": None, "last_status": None}


DELETED = "subscription deleted"  # last_error of deliveries orphaned by an unsubscribe


def revived(dead: dict) -> dict:
    """A dead letter queued again: attempts start over, and so does the retry horizon."""
    return {k: v for k, v in dead.items() if k != "failed_at"} | {
        "attempts": 0, "retry_from": time.time()}


class WebhookStore(Protocol):
    async def add(self, sub: Subscription) -> None: ...
    async def remove(self, sub_id: str) -> bool:
        """Unsubscribe; its pending deliveries become dead letters (reason DELETED)."""
        ...
    async def subscriptions(self) -> dict[str, Subscription]: ...
    async def recover(self) -> None: ...
    async def fan_out(self, subs: dict[str, Subscription], limit: int) -> int: ...
    async def claim_due(self, now: float, limit: int, lease: float) -> list[dict]: ...
    async def ack(self, delivery: dict) -> None: ...
    async def retry(self, delivery: dict, due: float) -> None: ...
    async def bury(self, delivery: dict) -> None: ...
    async def dead_letters(self, limit: int) -> list[dict]: ...
    async def dead_letter(self, delivery_id: str) -> dict | None: ...
    async def replay(self, delivery_id: str) -> dict | None: ...
    async def depth(self) -> int: ...


class MemoryWebhookStore:
    """In process: same semantics, lost on restart (use Redis for durability)."""

    def __init__(self, alert_store, dead_retention_seconds: float) -> None:  # noqa: ANN001
        self.outbox = alert_store.outbox  # of a MemoryAlertStore
        self.dead_retention_seconds = dead_retention_seconds
        self.subs: dict[str, Subscription] = {}
        self.deliveries: dict[str, dict] = {}
        self.due: dict[str, float] = {}
        self.dead: dict[str, dict] = {}

    async def add(self, sub: Subscription) -> None:
        self.subs[sub.id] = sub

    async def remove(self, sub_id: str) -> bool:
        if self.subs.pop(sub_id, None) is None:
            return False
        for d in [d for d in self.deliveries.values() if d["subscription_id"] == sub_id]:
            await self.bury(d | {"last_error": DELETED, "last_status": None})
        return True

    async def subscriptions(self) -> dict[str, Subscription]:
        return dict(self.subs)

    async def recover(self) -> None:
        return None

    async def fan_out(self, subs: dict[str, Subscription], limit: int) -> int:
        n = 0
        while self.outbox and n < limit:
            raw = self.outbox.popleft()
            event = json.loads(raw)
            for sub in subs.values():
                if sub.wants(event):
                    d = delivery_for(event, raw, sub)
                    if d["id"] not in self.deliveries:
                        self.deliveries[d["id"]] = d
                        self.due[d["id"]] = time.time()
            n += 1
        return n

    async def claim_due(self, now: float, limit: int, lease: float) -> list[dict]:
        ids = sorted((t, i) for i, t in self.due.items() if t <= now)[:limit]
        for _, i in ids:
            self.due[i] = now + lease
        return [dict(self.deliveries[i]) for _, i in ids]

    async def ack(self, delivery: dict) -> None:
        self.deliveries.pop(delivery["id"], None)
        self.due.pop(delivery["id"], None)

    async def retry(self, delivery: dict, due: float) -> None:
        self.deliveries[delivery["id"]] = delivery
        self.due[delivery["id"]] = due

    async def bury(self, delivery: dict) -> None:
        await self.ack(delivery)
        self.dead[delivery["id"]] = delivery | {"failed_at": time.time()}
        self._prune()

    def _prune(self) -> None:
        cutoff = time.time() - self.dead_retention_seconds
        for i in [i for i, d in self.dead.items() if d["failed_at"] < cutoff]:
            del self.dead[i]

    async def dead_letters(self, limit: int) -> list[dict]:
        self._prune()
        return sorted(self.dead.values(), key=lambda d: d["failed_at"], reverse=True)[:limit]

    async def dead_letter(self, delivery_id: str) -> dict | None:
        self._prune()
        return self.dead.get(delivery_id)

    async def replay(self, delivery_id: str) -> dict | None:
        dead = self.dead.pop(delivery_id, None)
        if dead is None:
            return None
        d = revived(dead)
        self.deliveries[d["id"]] = d
        self.due[d["id"]] = time.time()
        return d

    async def depth(self) -> int:
        return len(self.due)


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


class RedisWebhookStore:
    def __init__(self, alert_store, dead_retention_seconds: float) -> None:  # noqa: ANN001
        self.dead_retention_seconds = dead_retention_seconds
        self.ws = alert_store.ws  # of a RedisAlertStore
        self.redis = alert_store.redis
        self.outbox = alert_store.outbox
        k = alert_store.key
        self.k_subs, self.k_fanout = k("webhooks"), k("webhooks:fanout")
        self.k_deliveries, self.k_due = k("webhooks:deliveries"), k("webhooks:due")
        self.k_dead, self.k_dead_idx = k("webhooks:dead"), k("webhooks:dead:idx")
        self._claim = self.redis.register_script(_CLAIM)

    async def _call(self, coro):  # noqa: ANN001, ANN202
        return await self.ws._call(coro)

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
        await self._call(pipe.execute())

    async def retry(self, delivery: dict, due: float) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.k_deliveries, delivery["id"], json.dumps(delivery))
        pipe.zadd(self.k_due, {delivery["id"]: due})
        await self._call(pipe.execute())

    async def bury(self, delivery: dict) -> None:
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.k_due, delivery["id"])
        pipe.hdel(self.k_deliveries, delivery["id"])
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


def build_webhook_store(alert_store: AlertStore, dead_retention_seconds: float) -> WebhookStore:
    if isinstance(alert_store, RedisAlertStore):  # the queue lives beside the alerts
        return RedisWebhookStore(alert_store, dead_retention_seconds)
    return MemoryWebhookStore(alert_store, dead_retention_seconds)
