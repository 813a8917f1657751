"""Webhook delivery after failures, on every backend: a success to a subscription releases
its backlog at once (per-destination catch-up), and one alert's events reach a
subscription in their sequence order."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from http.client import HTTPMessage

from prometheus_client import CollectorRegistry

from service.alerts.model import Alert, make_event
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.stores.base import Backend, Commit
from service.webhooks.model import Subscription
from service.webhooks.worker import WebhookWorker
from tests.loopback import Answer, LoopbackServer


class Receiver:
    """A loopback receiver: answers 200, or 503 to the events ``refuse`` picks; keeps the
    events it accepted, in arrival order, with the time they came."""

    def __init__(self) -> None:
        self.refuse: Callable[[dict, int], bool] = lambda event, attempt: False
        self.accepted: list[tuple[float, dict]] = []
        self.refused = 0
        self.server = LoopbackServer(self._answer)
        self.url = self.server.url("/hook")

    def _answer(self, path: str, headers: HTTPMessage, body: bytes) -> Answer:
        event = json.loads(body)
        if self.refuse(event, int(headers["X-Tsad-Attempt"])):
            self.refused += 1
            return 503, {}, b""
        self.accepted.append((time.monotonic(), event))
        return 200, {}, b""

    def close(self) -> None:
        self.server.close()


def events(alert_id: str, *kinds: str) -> list[dict]:
    """One alert's events, as its tracker emits them (each bumps the alert's version)."""
    alert = Alert(id=alert_id, stream="s", state="open", severity="critical", opened_at=0.0,
                  updated_at=0.0, last_anomaly_at=0.0, peak_score=2.0, peak_at=0.0,
                  threshold=1.0, peak_ratio=2.0, incarnation="ab12cd34")
    out = []
    for kind in kinds:
        alert.version += 1
        out.append(make_event(kind, alert, "test"))
    return out


async def until(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return predicate()


async def run_worker(backend: Backend, receiver: Receiver, backoff: float,
                     scenario: Callable[[], Awaitable[None]]) -> None:
    """``scenario`` while a worker delivers the backend's events to one subscription."""
    settings = Settings(webhook_allow_hosts="127.0.0.1", webhook_backoff_seconds=backoff,
                        webhook_poll_seconds=0.02, webhook_timeout_seconds=3)
    store = backend.webhooks
    await store.add(Subscription("wh_1", receiver.url, "*", "warning", "s" * 16, 0.0))
    worker = WebhookWorker(store, settings, ServiceMetrics(CollectorRegistry()))
    await worker.start()
    try:
        await scenario()
    finally:
        await worker.stop()


async def test_a_success_releases_the_destinations_backlog_within_seconds(backend):
    """Five events fail while the receiver is down (their retries 15-30 s away). It comes
    back; the next event's success releases the five: all delivered within 3 s (was:
    each waited out its own backoff; the audit: the last delivery 127 s after the
    receiver returned)."""
    store, receiver = backend.build(), Receiver()
    receiver.refuse = lambda event, attempt: True  # down

    async def scenario() -> None:
        for k in range(5):
            await store.commit(Commit("s", events=events(f"al_{k}", "alert.opened")))
        assert await until(lambda: receiver.refused == 5, 10)
        receiver.refuse = lambda event, attempt: False  # back
        back = time.monotonic()
        await store.commit(Commit("s", events=events("al_new", "alert.opened")))
        assert await until(lambda: len(receiver.accepted) == 6, 10), receiver.accepted
        last = max(t for t, _ in receiver.accepted) - back
        assert last < 3.0, last
        depth = 1
        for _ in range(100):  # the last ack follows the receiver's answer
            if not (depth := await store.webhooks.depth()):
                break
            await asyncio.sleep(0.02)
        assert depth == 0

    try:
        await run_worker(store, receiver, 30.0, scenario)
    finally:
        receiver.close()
        await store.close()


async def test_one_alerts_events_arrive_in_sequence_order(backend):
    """An alert opens, escalates and resolves in one batch; the receiver refuses the
    first attempt of alert.opened. The later events wait for it: the receiver applies
    sequence 1, 2, 3 (was: alert.resolved arrived before alert.opened). Another alert's
    events are not held up."""
    store, receiver = backend.build(), Receiver()
    receiver.refuse = lambda event, attempt: event["type"] == "alert.opened" and (
        event["alert"]["id"] == "al_a" and attempt == 1)

    async def scenario() -> None:
        await store.commit(Commit("s", events=[
            *events("al_a", "alert.opened", "alert.updated", "alert.resolved"),
            *events("al_b", "alert.opened", "alert.resolved")]))
        assert await until(lambda: len(receiver.accepted) == 5, 15), receiver.accepted
        got = [(e["alert"]["id"], e["sequence"], e["type"]) for _, e in receiver.accepted]
        assert [g for g in got if g[0] == "al_a"] == [
            ("al_a", 1, "alert.opened"), ("al_a", 2, "alert.updated"),
            ("al_a", 3, "alert.resolved")], got
        assert [g[1] for g in got if g[0] == "al_b"] == [1, 2]
        assert got.index(("al_b", 2, "alert.resolved")) < got.index(
            ("al_a", 1, "alert.opened"))  # al_b went on while al_a's first event waited
        assert receiver.refused == 1

    try:
        await run_worker(store, receiver, 0.3, scenario)
    finally:
        receiver.close()
        await store.close()
