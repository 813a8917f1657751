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

Catch-up: a failed delivery waits out its backoff, and is noted as *waiting* on its
subscription; a success to the subscription (its receiver is back) releases every
delivery waiting there: due again at once, oldest event first.

Order: the events of one alert carry ``sequence`` (1 for ``alert.opened``, then one more
per event; ``alert.version``), and reach each subscription in that order: the worker
delivers one alert's events one after another, and holds an event back while the
delivery of its predecessor to the same subscription is still queued (``previous``).
At least once still means a resent earlier event may arrive after a later one (a lease
ran out): receivers order by ``sequence`` and drop an event at or below the last one they
applied.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
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


def delivery_id(event_id: str, sub_id: str) -> str:
    return "dl_" + hashlib.sha256(f"{event_id}\0{sub_id}".encode()).hexdigest()[:24]


def delivery_for(event: dict, raw: str, sub: Subscription) -> dict:
    return {"id": delivery_id(event["id"], sub.id), "event_id": event["id"],
            "event_type": event["type"],
            "subscription_id": sub.id, "body": raw, "attempts": 0,
            "created": event["created"], "last_error": None, "last_status": None}


DELETED = "subscription deleted"  # last_error of deliveries orphaned by an unsubscribe


def place(delivery: dict) -> tuple[tuple[str, str], int]:
    """Where a delivery stands among its alert's: ((subscription id, alert id), sequence).

    >>> body = json.dumps({"id": "al_1-2-ab", "alert": {"id": "al_1", "version": 2}})
    >>> place({"subscription_id": "wh_1", "event_id": "al_1-2-ab", "body": body})
    (('wh_1', 'al_1'), 2)
    """
    alert = json.loads(delivery["body"]).get("alert") or {}
    # an event without its alert's id and version (none the service makes) stands alone
    return ((delivery["subscription_id"], alert.get("id") or delivery["event_id"]),
            int(alert.get("version") or 0))


def previous(delivery: dict) -> str | None:
    """The id of the delivery of the alert's previous event to the same subscription
    (None: this is its first): event ids are ``<alert id>-<version><suffix>``.

    >>> body = json.dumps({"id": "al_1-2-ab", "alert": {"id": "al_1", "version": 2}})
    >>> d = {"subscription_id": "wh_1", "event_id": "al_1-2-ab", "body": body}
    >>> previous(d) == delivery_id("al_1-1-ab", "wh_1")
    True
    """
    (sub, alert), version = place(delivery)
    head = f"{alert}-{version}"
    if version <= 1 or not delivery["event_id"].startswith(head):
        return None
    return delivery_id(f"{alert}-{version - 1}{delivery['event_id'][len(head):]}", sub)


def revived(dead: dict) -> dict:
    """A dead letter queued again: attempts start over, and so does the retry horizon."""
    return {k: v for k, v in dead.items() if k != "failed_at"} | {
        "attempts": 0, "retry_from": time.time()}
