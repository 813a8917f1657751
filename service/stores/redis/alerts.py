"""The Redis backend's alerts: the queryable records, and the outbox of events for webhooks.

Keys (``RedisConnection.shared_key``: one hash slot on a cluster):

    <prefix>:alert:<id>              string: the alert as JSON (expires after retention
                                     once resolved or once its stream is deleted)
    <prefix>:alerts:idx              zset: id by opening time (stream time)
    <prefix>:alerts:idx:<stream>     zset: the same, per stream
    <prefix>:alerts:open             set: ids of open alerts
    <prefix>:alerts:outbox           list: events waiting for webhook fan-out

A batch's alerts and events are written by the backend's commit (``stage``), in the same
MULTI as the stream's state on a single Redis; on a cluster the two slots need two
transactions, the alerts and their events first (``service/stores/redis/__init__.py``).
"""

from __future__ import annotations

import json
from typing import Any

from service.alerts.model import Alert
from service.alerts.query import AlertQuery, close_deleted
from service.stores.redis.connection import RedisConnection


class RedisAlerts:
    def __init__(self, conn: RedisConnection, retention_seconds: int) -> None:
        self.conn = conn
        self.redis = conn.client
        self.retention_seconds = retention_seconds

    def key(self, part: str) -> str:
        return self.conn.shared_key(part)

    @property
    def outbox(self) -> str:
        return self.key("alerts:outbox")

    def stage(self, pipe: Any, stream: str, alerts: list[Alert], events: list[dict]) -> Any:
        """Queue the writes of a batch's alerts and events on a MULTI pipeline."""
        for alert in alerts:
            d = alert.to_dict()
            resolved = alert.state == "resolved"
            pipe.set(self.key(f"alert:{alert.id}"), json.dumps(d),
                     ex=self.retention_seconds if resolved else None)
            pipe.zadd(self.key("alerts:idx"), {alert.id: alert.opened_at})
            pipe.zadd(self.key(f"alerts:idx:{stream}"), {alert.id: alert.opened_at})
            pipe.persist(self.key(f"alerts:idx:{stream}"))  # expiring if it was deleted
            if resolved:
                pipe.srem(self.key("alerts:open"), alert.id)
            else:
                pipe.sadd(self.key("alerts:open"), alert.id)
        if events:
            pipe.rpush(self.outbox, *(json.dumps(e) for e in events))
        return pipe

    async def get(self, alert_id: str) -> dict | None:
        raw = await self.conn.call(self.redis.get(self.key(f"alert:{alert_id}")))
        return json.loads(raw) if raw else None

    async def count_open(self) -> int:
        """Open alerts never expire, so the open set is exact (one SCARD)."""
        return int(await self.conn.call(self.redis.scard(self.key("alerts:open"))))

    async def forget_stream(self, stream: str) -> list[dict]:
        index = self.key(f"alerts:idx:{stream}")
        ids = await self.conn.call(self.redis.zrange(index, 0, -1))
        alerts = await self._load(list(ids), [])
        ttl = self.retention_seconds
        events = []
        pipe = self.redis.pipeline(transaction=True)
        for alert in alerts:
            key = self.key(f"alert:{alert['id']}")
            if alert["state"] == "open":
                closed, event = close_deleted(alert)
                events.append(event)
                pipe.set(key, json.dumps(closed), ex=ttl)
                pipe.srem(self.key("alerts:open"), alert["id"])
            else:
                pipe.expire(key, ttl, lt=True)  # resolved ones already expire
        pipe.expire(index, ttl)
        if events:
            pipe.rpush(self.outbox, *(json.dumps(e) for e in events))
        await self.conn.call(pipe.execute())
        return events

    async def _load(self, ids: list[bytes], gone: list[bytes]) -> list[dict]:
        """The alerts of ``ids``; ids whose record expired are appended to ``gone``."""
        if not ids:
            return []
        raws = await self.conn.call(self.redis.mget([self.key(f"alert:{i.decode()}")
                                                    for i in ids]))
        gone += [i for i, r in zip(ids, raws, strict=True) if r is None]
        return [json.loads(r) for r in raws if r is not None]

    async def _tidy(self, gone: list[bytes], stream: str | None) -> None:
        """Expired after retention: drop them from the indices."""
        if gone:
            await self.conn.call(self.redis.zrem(self.key("alerts:idx"), *gone))
            await self.conn.call(self.redis.srem(self.key("alerts:open"), *gone))
            if stream:
                await self.conn.call(self.redis.zrem(self.key(f"alerts:idx:{stream}"), *gone))

    async def list(self, query: AlertQuery) -> tuple[list[dict], str | None]:
        if query.state == "open":  # few: read them all
            ids = list(await self.conn.call(self.redis.smembers(self.key("alerts:open"))))
            gone: list[bytes] = []
            hits = [a for a in await self._load(ids, gone) if query.matches(a)]
            await self._tidy(gone, None)
            return query.page(hits)
        index = self.key(f"alerts:idx:{query.stream}" if query.stream else "alerts:idx")
        top = "+inf" if query.until is None else repr(query.until)
        if query.cursor:
            top = repr(min(float(query.cursor.partition(":")[0]),
                           float("inf") if query.until is None else query.until))
        bottom = "-inf" if query.since is None else repr(query.since)
        out: list[dict] = []
        gone = []
        offset, batch = 0, max(query.limit * 2, 100)
        while len(out) <= query.limit:
            ids = await self.conn.call(self.redis.zrevrangebyscore(
                index, top, bottom, start=offset, num=batch))
            if not ids:
                break
            offset += len(ids)
            out += [a for a in await self._load(ids, gone) if query.matches(a)]
        await self._tidy(gone, query.stream)
        return query.page(out)
