"""Webhook subscriptions and deliveries as plain data, shared by every backend's webhook
store (``service/stores/*/webhooks.py``).

Life of an event: the scoring commit appends it to the outbox (atomically with the
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
"""

from __future__ import annotations

import fnmatch
import hashlib
import time
from dataclasses import asdict, dataclass

from service.alerts.model import SEVERITIES
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
