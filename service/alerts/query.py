"""Alert queries (GET /alerts), their cursors, and what deleting a stream does to its open
alert: the parts every backend's alert store shares."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from service.alerts.model import Alert, make_event


@dataclass(frozen=True)
class AlertQuery:
    stream: str | None = None
    state: str | None = None  # open | resolved
    since: float | None = None  # opened_at >= since
    until: float | None = None  # opened_at <= until
    limit: int = 50
    cursor: str | None = None  # "<opened_at>:<id>" of the last alert of the previous page
    stream_prefix: str | None = None  # a tenant's streams ("acme.")

    def matches(self, alert: dict) -> bool:
        return ((self.stream is None or alert["stream"] == self.stream)
                and (self.stream_prefix is None
                     or alert["stream"].startswith(self.stream_prefix))
                and (self.state is None or alert["state"] == self.state)
                and (self.since is None or alert["opened_at"] >= self.since)
                and (self.until is None or alert["opened_at"] <= self.until)
                and _after_cursor(alert, self.cursor))

    def page(self, hits: list[dict]) -> tuple[list[dict], str | None]:
        """The first page of matching alerts, newest opening first, and the cursor of the
        next page (None: no more)."""
        hits = sorted(hits, key=lambda a: (a["opened_at"], a["id"]), reverse=True)
        page = hits[:self.limit]
        return page, _cursor(page[-1]) if len(hits) > self.limit and page else None


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


def close_deleted(alert: dict) -> tuple[dict, dict]:
    """An open alert of a deleted stream, resolved; and its alert.resolved event."""
    a = Alert.from_dict(alert)
    a.state, a.resolved_at = "resolved", a.updated_at
    a.version += 1
    return a.to_dict(), make_event("alert.resolved", a, "stream deleted")
