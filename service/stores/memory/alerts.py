"""The in-process backend's alerts: records in a dict, the outbox a deque the webhook
worker drains. Lost on restart (use Redis for durability)."""

from __future__ import annotations

import json
import time
from collections import deque

from service.alerts.model import Alert
from service.alerts.query import AlertQuery, close_deleted


class MemoryAlerts:
    def __init__(self, retention_seconds: float) -> None:
        self.retention_seconds = retention_seconds
        self.alerts: dict[str, dict] = {}
        self._expires: dict[str, float] = {}
        self.outbox: deque[str] = deque()

    def apply(self, alerts: list[Alert], events: list[dict]) -> None:
        """A commit's alerts and events (no await: atomic on the event loop)."""
        now = time.time()
        for alert in alerts:
            self.alerts[alert.id] = alert.to_dict()
            if alert.state == "resolved":
                self._expires[alert.id] = now + self.retention_seconds
            else:
                self._expires.pop(alert.id, None)
        self.outbox.extend(json.dumps(e) for e in events)

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
                self.alerts[aid], event = close_deleted(alert)
                events.append(event)
            self._expires[aid] = min(self._expires.get(aid, expires), expires)
        self.outbox.extend(json.dumps(e) for e in events)
        return events

    async def list(self, query: AlertQuery) -> tuple[list[dict], str | None]:
        self._prune()
        return query.page([a for a in self.alerts.values() if query.matches(a)])
