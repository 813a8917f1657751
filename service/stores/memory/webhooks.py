"""The in-process backend's webhooks: the same semantics as Redis's
(``service/webhooks/model.py``), lost on restart (use Redis for durability)."""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque
from collections.abc import Collection

from service.webhooks.model import DELETED, Subscription, delivery_for, revived


class MemoryWebhooks:
    def __init__(self, outbox: deque[str], dead_retention_seconds: float) -> None:
        self.outbox = outbox  # the alerts' outbox: the commit appends events to it
        self.dead_retention_seconds = dead_retention_seconds
        self.subs: dict[str, Subscription] = {}
        self.deliveries: dict[str, dict] = {}
        self.due: dict[str, float] = {}
        self.dead: dict[str, dict] = {}
        # subscription -> waiting delivery -> the due time it waits for
        self.waiting: defaultdict[str, dict[str, float]] = defaultdict(dict)

    async def add(self, sub: Subscription) -> None:
        self.subs[sub.id] = sub

    async def remove(self, sub_id: str) -> bool:
        if self.subs.pop(sub_id, None) is None:
            return False
        for d in [d for d in self.deliveries.values() if d["subscription_id"] == sub_id]:
            await self.bury(d | {"last_error": DELETED, "last_status": None})
        self.waiting.pop(sub_id, None)
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
        self.waiting[delivery["subscription_id"]].pop(delivery["id"], None)

    async def retry(self, delivery: dict, due: float) -> None:
        self.deliveries[delivery["id"]] = delivery
        self.due[delivery["id"]] = due
        self.waiting[delivery["subscription_id"]][delivery["id"]] = due

    async def release(self, subscription_id: str) -> int:
        waiting, now, n = self.waiting.pop(subscription_id, {}), time.time(), 0
        for i, at in waiting.items():
            if self.due.get(i) == at and at > now:  # not claimed since, not due anyway
                self.due[i] = self.deliveries[i]["created"]
                n += 1
        return n

    async def pending(self, delivery_ids: Collection[str]) -> dict[str, float]:
        return {i: self.due[i] for i in delivery_ids if i in self.due}

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
