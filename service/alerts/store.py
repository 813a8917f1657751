"""Where alerts live: the queryable records, and the outbox of events for webhooks.

``commit`` writes, in one step, the stream's state blob (detector, threshold, alert
tracker) with its scored-up-to mark and the batch's receipt (service/stores/base.py), the
alerts the batch changed and the events it emitted. With Redis that is one
MULTI/EXEC transaction, so a crash never leaves a tracker that believes an alert is open
without its record or its event. It runs under the stream lock that serialises scoring.

Redis keys (beside the window store's):

    <prefix>:alert:<id>              string: the alert as JSON (expires after retention
                                     once resolved or once its stream is deleted)
    <prefix>:alerts:idx              zset: id by opening time (stream time)
    <prefix>:alerts:idx:<stream>     zset: the same, per stream
    <prefix>:alerts:open             set: ids of open alerts
    <prefix>:alerts:outbox           list: events waiting for webhook fan-out

On a Redis Cluster these keys (and the webhook store's) are ``<prefix>:{alerts}:...``: one
hash slot, so each of their transactions stays in one slot. A transaction cannot span that
slot and the stream's, so ``commit`` runs two: the alerts and their events first, then the
state. A crash between the two can leave the tracker one batch behind its alerts, never
an event lost; the same batch scored again emits the same alert ids and event ids (they
derive from the stream, the time and the version), which receivers deduplicate.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from service.alerts.model import Alert, make_event
from service.stores.base import StoreUnavailable


@dataclass(frozen=True)
class AlertQuery:
    stream: str | None = None
    state: str | None = None  # open | resolved
    since: float | None = None  # opened_at >= since
    until: float | None = None  # opened_at <= until
    limit: int = 50
    cursor: str | None = None  # "<opened_at>:<id>" of the last alert of the previous page
    stream_prefix: str | None = None  # a tenant's streams ("acme.")


def _cursor(alert: dict) -> str:
    return f"{alert['opened_at']!r}:{alert['id']}"


def valid_cursor(cursor: str) -> bool:
    """A cursor this service could have written: '<finite opened_at>:al_<hex>'.

    >>> valid_cursor("1700000000.0:al_4b1deffe08c3cd9c0e68"), valid_cursor("8+42:al_c")
    (True, False)
    >>> valid_cursor("nan:al_c"), valid_cursor("e:al_c")
    (False, False)
    """
    ts, _, aid = cursor.partition(":")
    try:
        finite = math.isfinite(float(ts))
    except ValueError:
        return False
    return finite and re.fullmatch(r"al_[0-9a-f]{1,64}", aid) is not None


def _after_cursor(alert: dict, cursor: str | None) -> bool:
    """Pages run newest first: (opened_at, id) descending."""
    if not cursor:
        return True
    ts, _, aid = cursor.partition(":")
    return (alert["opened_at"], alert["id"]) < (float(ts), aid)


def _matches(alert: dict, q: AlertQuery) -> bool:
    return ((q.stream is None or alert["stream"] == q.stream)
            and (q.stream_prefix is None or alert["stream"].startswith(q.stream_prefix))
            and (q.state is None or alert["state"] == q.state)
            and (q.since is None or alert["opened_at"] >= q.since)
            and (q.until is None or alert["opened_at"] <= q.until)
            and _after_cursor(alert, q.cursor))


class AlertStore(Protocol):
    async def commit(self, stream: str, blob: bytes, alerts: list[Alert], events: list[dict],
                     *, scored: int | None = None,
                     receipt: tuple[str, bytes] | None = None) -> int:
        """Returns the stream's new version (``WindowStore.save_state``)."""
        ...

    async def get(self, alert_id: str) -> dict | None: ...

    async def list(self, query: AlertQuery) -> tuple[list[dict], str | None]: ...

    async def count_open(self) -> int: ...

    async def forget_stream(self, stream: str) -> list[dict]:
        """The stream was deleted: its open alert resolves (event reason "stream
        deleted", so receivers see the incident end) and all its alerts expire after
        the retention like resolved ones. Returns the events emitted."""
        ...


def _close_deleted(alert: dict) -> tuple[dict, dict]:
    """An open alert of a deleted stream, resolved; and its alert.resolved event."""
    a = Alert.from_dict(alert)
    a.state, a.resolved_at = "resolved", a.updated_at
    a.version += 1
    return a.to_dict(), make_event("alert.resolved", a, "stream deleted")


class MemoryAlertStore:
    """In-process: alerts in a dict, the outbox a deque the webhook worker drains."""

    def __init__(self, window_store, retention_seconds: float) -> None:  # noqa: ANN001
        self.window_store = window_store
        self.retention_seconds = retention_seconds
        self.alerts: dict[str, dict] = {}
        self._expires: dict[str, float] = {}
        self.outbox: deque[str] = deque()

    async def commit(self, stream: str, blob: bytes, alerts: list[Alert], events: list[dict],
                     *, scored: int | None = None,
                     receipt: tuple[str, bytes] | None = None) -> int:
        # no await between the writes
        version = await self.window_store.save_state(stream, blob, scored=scored,
                                                     receipt=receipt)
        now = time.time()
        for alert in alerts:
            self.alerts[alert.id] = alert.to_dict()
            if alert.state == "resolved":
                self._expires[alert.id] = now + self.retention_seconds
            else:
                self._expires.pop(alert.id, None)
        self.outbox.extend(json.dumps(e) for e in events)
        return version

    def _prune(self) -> None:
        now = time.time()
        for aid in [a for a, t in self._expires.items() if t < now]:
            self.alerts.pop(aid, None)
            self._expires.pop(aid, None)

    async def get(self, alert_id: str) -> dict | None:
        self._prune()
        return self.alerts.get(alert_id)

    async def count_open(self) -> int:
        return sum(a["state"] == "open" for a in self.alerts.values())

    async def forget_stream(self, stream: str) -> list[dict]:
        events, expires = [], time.time() + self.retention_seconds
        for aid, alert in list(self.alerts.items()):
            if alert["stream"] != stream:
                continue
            if alert["state"] == "open":
                self.alerts[aid], event = _close_deleted(alert)
                events.append(event)
            self._expires[aid] = min(self._expires.get(aid, expires), expires)
        self.outbox.extend(json.dumps(e) for e in events)
        return events

    async def list(self, query: AlertQuery) -> tuple[list[dict], str | None]:
        self._prune()
        hits = sorted((a for a in self.alerts.values() if _matches(a, query)),
                      key=lambda a: (a["opened_at"], a["id"]), reverse=True)
        page = hits[:query.limit]
        more = len(hits) > query.limit
        return page, _cursor(page[-1]) if more and page else None


class RedisAlertStore:
    """Shares the window store's connection and its error handling (503 on outage)."""

    def __init__(self, window_store, retention_seconds: int) -> None:  # noqa: ANN001
        self.ws = window_store
        self.redis = window_store._redis
        self.prefix = window_store.prefix
        self.retention_seconds = retention_seconds
        self.cluster = getattr(window_store, "cluster", False)
        # Cluster: one hash tag for every alert and webhook key (see the module doc)
        self._tag = "{alerts}:" if self.cluster else ""

    def key(self, part: str) -> str:
        return f"{self.prefix}:{self._tag}{part}"

    @property
    def outbox(self) -> str:
        return self.key("alerts:outbox")

    async def commit(self, stream: str, blob: bytes, alerts: list[Alert], events: list[dict],
                     *, scored: int | None = None,
                     receipt: tuple[str, bytes] | None = None) -> int:
        pipe = self.redis.pipeline(transaction=True)
        if self.cluster and (alerts or events):  # the alerts' slot first (module doc)
            await self.ws._call(self._stage_alerts(
                self.redis.pipeline(transaction=True), stream, alerts, events).execute())
        self.ws.stage_state(pipe, stream, blob, scored, receipt)  # first: the version
        if not self.cluster:
            self._stage_alerts(pipe, stream, alerts, events)
        return int((await self.ws._call(pipe.execute()))[0])

    def _stage_alerts(self, pipe, stream: str, alerts: list[Alert],  # noqa: ANN001
                      events: list[dict]):  # noqa: ANN202 - a redis pipeline, either kind
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
        raw = await self.ws._call(self.redis.get(self.key(f"alert:{alert_id}")))
        return json.loads(raw) if raw else None

    async def count_open(self) -> int:
        """Open alerts never expire, so the open set is exact (one SCARD)."""
        return int(await self.ws._call(self.redis.scard(self.key("alerts:open"))))

    async def forget_stream(self, stream: str) -> list[dict]:
        index = self.key(f"alerts:idx:{stream}")
        ids = await self.ws._call(self.redis.zrange(index, 0, -1))
        alerts = await self._load(list(ids), [])
        ttl = self.retention_seconds
        events = []
        pipe = self.redis.pipeline(transaction=True)
        for alert in alerts:
            key = self.key(f"alert:{alert['id']}")
            if alert["state"] == "open":
                closed, event = _close_deleted(alert)
                events.append(event)
                pipe.set(key, json.dumps(closed), ex=ttl)
                pipe.srem(self.key("alerts:open"), alert["id"])
            else:
                pipe.expire(key, ttl, lt=True)  # resolved ones already expire
        pipe.expire(index, ttl)
        if events:
            pipe.rpush(self.outbox, *(json.dumps(e) for e in events))
        await self.ws._call(pipe.execute())
        return events

    async def _load(self, ids: list[bytes], gone: list[bytes]) -> list[dict]:
        """The alerts of ``ids``; ids whose record expired are appended to ``gone``."""
        if not ids:
            return []
        raws = await self.ws._call(self.redis.mget([self.key(f"alert:{i.decode()}")
                                                    for i in ids]))
        gone += [i for i, r in zip(ids, raws, strict=True) if r is None]
        return [json.loads(r) for r in raws if r is not None]

    async def _tidy(self, gone: list[bytes], stream: str | None) -> None:
        """Expired after retention: drop them from the indices."""
        if gone:
            await self.ws._call(self.redis.zrem(self.key("alerts:idx"), *gone))
            await self.ws._call(self.redis.srem(self.key("alerts:open"), *gone))
            if stream:
                await self.ws._call(self.redis.zrem(self.key(f"alerts:idx:{stream}"), *gone))

    async def list(self, query: AlertQuery) -> tuple[list[dict], str | None]:
        if query.state == "open":  # few: read them all
            ids = list(await self.ws._call(self.redis.smembers(self.key("alerts:open"))))
            gone: list[bytes] = []
            hits = [a for a in await self._load(ids, gone) if _matches(a, query)]
            await self._tidy(gone, None)
            hits.sort(key=lambda a: (a["opened_at"], a["id"]), reverse=True)
            page = hits[:query.limit]
            return page, _cursor(page[-1]) if len(hits) > query.limit and page else None
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
            ids = await self.ws._call(self.redis.zrevrangebyscore(
                index, top, bottom, start=offset, num=batch))
            if not ids:
                break
            offset += len(ids)
            out += [a for a in await self._load(ids, gone) if _matches(a, query)]
        await self._tidy(gone, query.stream)
        out.sort(key=lambda a: (a["opened_at"], a["id"]), reverse=True)
        page = out[:query.limit]
        return page, _cursor(page[-1]) if len(out) > query.limit and page else None


def build_alert_store(window_store, retention_seconds: int) -> AlertStore:  # noqa: ANN001
    if window_store.backend == "redis":
        return RedisAlertStore(window_store, retention_seconds)
    if window_store.backend == "memory":
        return MemoryAlertStore(window_store, retention_seconds)
    raise StoreUnavailable(f"no alert store for backend {window_store.backend!r}")
