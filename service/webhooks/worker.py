"""The delivery worker: an asyncio task in the app's lifespan, never on the /score path.

Each round: fan new events out to matching subscriptions, claim due deliveries (at most
``webhook_concurrency``), POST them concurrently with a per-request timeout. 2xx is
success; anything else (status, timeout, refused connection) is retried after
``min(max, base * 2^(attempt-1))`` seconds scaled by a uniform random factor in [0.5, 1]
(jitter that keeps a recovering receiver from a thundering herd yet never retries
instantly). A delivery is dead-lettered after ``webhook_max_attempts`` failures, or when
its next retry would come more than ``webhook_retry_horizon_seconds`` after its event
(by default 2 s doubling to an hourly retry for three days, as Stripe does: a receiver
down for a weekend loses nothing). A delivery whose subscription was deleted is
dead-lettered with that reason, never dropped. Every connection goes through the
destination check (service/webhooks/destinations.py); redirects are not followed. A failed
attempt keeps a short summary (``HTTP 503``, ``timeout``, ``connection failed``,
``destination refused``), never the target's response body or the socket error's text: a
subscription must not turn the dead-letter list into a probe of other hosts.

A success to a subscription releases its deliveries waiting on a backoff (its receiver is
back: they go at once, oldest first). One alert's events go to a subscription in their
``sequence`` order: one after another, the later ones held back behind a failed or still
queued earlier one (``service/webhooks/model.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import httpx

from service.errors import StoreUnavailable
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.stores.base import WebhookStore
from service.webhooks.destinations import AllowList, DestinationRefused, GuardedTransport
from service.webhooks.model import DELETED, Subscription, place, previous
from service.webhooks.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

log = logging.getLogger("tsad.webhooks")
USER_AGENT = "tsad-webhooks/0.1"
# a delivery held back behind its alert's previous event is due just after it
BEHIND_SECONDS = 0.001


def backoff_seconds(attempt: int, base: float, cap: float,
                    rng: random.Random | None = None) -> float:
    """Delay after the ``attempt``-th failure (1-based).

    >>> backoff_seconds(1, 2.0, 600.0, random.Random(0)) <= 2.0
    True
    >>> 0.5 * 600 <= backoff_seconds(30, 2.0, 600.0) <= 600
    True
    """
    ceiling = min(cap, base * 2 ** min(attempt - 1, 62))
    return ceiling * (0.5 + 0.5 * (rng or random).random())


def failure_summary(exc: httpx.HTTPError) -> str:
    """What a dead letter says about a request that got no answer: the kind of failure.

    >>> failure_summary(httpx.ConnectTimeout("timed out connecting to 10.0.0.1:22"))
    'timeout'
    """
    if isinstance(exc.__cause__, DestinationRefused):
        return "destination refused (not a public address; see TSAD_WEBHOOK_ALLOW_HOSTS)"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connection failed"
    return "request failed"


class WebhookWorker:
    def __init__(self, store: WebhookStore, settings: Settings, metrics: ServiceMetrics) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        allow = AllowList.for_settings(self.settings)
        self._client = httpx.AsyncClient(timeout=self.settings.webhook_timeout_seconds,
                                         follow_redirects=False, trust_env=False,
                                         transport=GuardedTransport(allow),
                                         headers={"User-Agent": USER_AGENT})
        self._task = asyncio.create_task(self._run(), name="webhook-worker")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.settings.webhook_timeout_seconds + 2)
            except TimeoutError:
                self._task.cancel()
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        recovered = False
        while not self._stop.is_set():
            busy = False
            try:
                if not recovered:
                    await self.store.recover()
                    recovered = True
                busy = await self.step()
            except StoreUnavailable as exc:
                log.warning("webhook worker: store unavailable", extra={"error": str(exc)})
            except Exception:  # the worker must outlive any bug in one round
                log.exception("webhook worker round failed")
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.settings.webhook_poll_seconds)

    async def step(self) -> bool:
        """One round; True when it did anything (then the next round starts at once)."""
        s = self.settings
        subs = await self.store.subscriptions()
        fanned = await self.store.fan_out(subs, limit=100)
        due = await self.store.claim_due(time.time(), s.webhook_concurrency,
                                         s.webhook_lease_seconds)
        if due:
            await self._deliver_all(due, subs)
        self.metrics.webhook_queue_depth.set(await self.store.depth())
        return bool(fanned or due)

    async def _deliver_all(self, due: list[dict], subs: dict[str, Subscription]) -> None:
        """Alerts side by side; each alert's events to a subscription one after another,
        in sequence order, all held back while the delivery of the first one's
        predecessor (claimed elsewhere, or waiting on a backoff) is queued."""
        groups: dict[tuple[str, str], list[tuple[int, dict]]] = {}
        for d in due:
            key, sequence = place(d)
            groups.setdefault(key, []).append((sequence, d))
        ordered = [[d for _, d in sorted(g, key=lambda sd: sd[0])] for g in groups.values()]
        before = {g[0]["id"]: p for g in ordered if (p := previous(g[0]))}
        queued = await self.store.pending(before.values())

        async def in_order(group: list[dict]) -> None:
            behind = queued.get(before.get(group[0]["id"], ""))
            for delivery in group:
                if behind is None:
                    sub = subs.get(delivery["subscription_id"])
                    behind = await self._deliver(delivery, sub)
                else:  # no attempt: due again just after the one it follows
                    behind += BEHIND_SECONDS
                    await self.store.retry(delivery, behind)

        await asyncio.gather(*(in_order(g) for g in ordered))

    async def _deliver(self, delivery: dict, sub: Subscription | None) -> float | None:
        """One attempt; the time the delivery is due again (None: done with, delivered
        or dead-lettered)."""
        if sub is None:  # unsubscribed after this was claimed or fanned out
            self.metrics.webhook_deliveries_total.labels("dead_letter").inc()
            self.metrics.webhook_dead_letters_total.inc()
            await self.store.bury(delivery | {"last_error": DELETED, "last_status": None})
            return None
        assert self._client is not None
        delivery["attempts"] += 1
        body = delivery["body"].encode()
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": delivery["event_id"],
            "X-Tsad-Event": delivery["event_type"],
            "X-Tsad-Event-Id": delivery["event_id"],
            "X-Tsad-Delivery": delivery["id"],
            "X-Tsad-Attempt": str(delivery["attempts"]),
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(sub.secret, ts, body),
        }
        start = time.perf_counter()
        detail = None  # the operator's log gets the exception's text; the API does not
        try:
            # the status is all that counts: the response body is never read
            async with self._client.stream("POST", sub.url, content=body,
                                           headers=headers) as response:
                status, error = response.status_code, None
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except httpx.HTTPError as exc:
            status, error = None, failure_summary(exc)
            detail = f"{type(exc).__name__}: {exc}"[:300]
        self.metrics.webhook_request_duration_seconds.observe(time.perf_counter() - start)
        if error is None:
            self.metrics.webhook_deliveries_total.labels("delivered").inc()
            self.metrics.webhook_delivery_latency_seconds.observe(
                max(time.time() - delivery["created"], 0.0))
            await self.store.ack(delivery)
            if released := await self.store.release(sub.id):  # its receiver is back
                log.info("webhook destination back: queued deliveries released",
                         extra={"subscription": sub.id, "deliveries": released})
            return None
        delivery["last_error"], delivery["last_status"] = error, status
        s = self.settings
        delay = backoff_seconds(delivery["attempts"], s.webhook_backoff_seconds,
                                s.webhook_backoff_max_seconds)
        due = time.time() + delay
        if delivery["attempts"] >= s.webhook_max_attempts or (
                due > delivery.get("retry_from", delivery["created"])
                + s.webhook_retry_horizon_seconds):
            self.metrics.webhook_deliveries_total.labels("dead_letter").inc()
            self.metrics.webhook_dead_letters_total.inc()
            log.warning("webhook delivery dead-lettered",
                        extra={"delivery": delivery["id"], "url": sub.url, "error": error,
                               "detail": detail, "attempts": delivery["attempts"]})
            await self.store.bury(delivery)
            return None
        self.metrics.webhook_deliveries_total.labels("retry").inc()
        await self.store.retry(delivery, due)
        return due
