"""Webhook destinations (SSRF): internal addresses are refused at subscription (422 on
body.url) and again at every delivery's connect, unless allow-listed; redirects are not
followed; dead letters keep a status summary, never the target's answer."""

from __future__ import annotations

import asyncio
import json
from http.client import HTTPMessage

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.stores.base import Commit
from service.stores.memory import MemoryBackend
from service.webhooks.model import Subscription
from service.webhooks.worker import WebhookWorker
from tests.loopback import Answer, LoopbackServer

INTERNAL = [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://127.0.0.1:6379/",  # Redis
    "http://10.0.0.1/hook",
    "http://[::1]:8000/hook",
    "http://0.0.0.0:8000/hook",
    "http://localhost:8000/hook",  # a name that resolves to loopback
    "http://224.0.0.1/hook",  # multicast
    "http://[::ffff:127.0.0.1]/hook",  # loopback inside an IPv4-mapped IPv6 address
    "http://100.64.0.1/hook",  # carrier-grade NAT
    "https://192.168.1.1/hook",
]


def client(**overrides) -> TestClient:
    settings = Settings(**overrides)
    return TestClient(create_app(settings, ServiceMetrics(CollectorRegistry())))


@pytest.mark.parametrize("url", INTERNAL)
def test_internal_destinations_are_refused_naming_body_url(url):
    with client() as c:
        r = c.post("/webhooks", json={"url": url})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "url"]
        assert r.json()["message"].startswith("body.url: ")
        assert "TSAD_WEBHOOK_ALLOW_HOSTS" in r.json()["message"]
        assert c.get("/webhooks").json() == {"webhooks": []}  # nothing changed


def test_allow_list_names_hosts_and_networks():
    with client(webhook_allow_hosts="127.0.0.1, localhost, 10.0.0.0/8") as c:
        for url in ("http://127.0.0.1:9/hook", "http://localhost:9/hook",
                    "http://10.1.2.3/hook"):
            assert c.post("/webhooks", json={"url": url}).status_code == 201, url
        for url in ("http://[::1]:9/hook", "http://169.254.169.254/", "http://192.168.0.1/"):
            assert c.post("/webhooks", json={"url": url}).status_code == 422, url
    # a public address needs no allow-list (an IP literal: no DNS needed)
    with client() as c:
        assert c.post("/webhooks", json={"url": "http://93.184.215.14/hook"}).status_code == 201


def test_bad_allow_list_entry_is_refused_at_start_up():
    with pytest.raises(ValueError, match="webhook_allow_hosts"):
        Settings(webhook_allow_hosts="127.0.0.1, not a host")


class Target:
    """A loopback HTTP server answering every POST with ``status`` (and ``headers``)."""

    def __init__(self, status: int, headers: dict[str, str] | None = None,
                 body: bytes = b"") -> None:
        self.requests: list[str] = []
        self.status, self.headers, self.body = status, headers or {}, body
        self.server = LoopbackServer(self._answer)
        self.port = self.server.port

    def _answer(self, path: str, headers: HTTPMessage, body: bytes) -> Answer:
        self.requests.append(path)
        return self.status, self.headers, self.body

    def close(self) -> None:
        self.server.close()


def deliver_once(url: str, allow: str, auth: str = "keys") -> dict:
    """One event to one subscription of ``url`` through a real worker with one attempt:
    its dead letter, or {} when delivered. A keyed service by default: an open one on
    loopback also reaches loopback receivers (tests/test_ssrf.py)."""
    settings = Settings(auth=auth, webhook_allow_hosts=allow, webhook_max_attempts=1,
                        webhook_poll_seconds=0.02, webhook_timeout_seconds=3)
    backend = MemoryBackend()
    store, outbox = backend.webhooks, backend.alerts.outbox
    event = {"id": "al_1-1", "type": "alert.opened", "created": 0.0,
             "alert": {"stream": "s", "severity": "critical"}}

    async def main() -> dict:
        await store.add(Subscription("wh_1", url, "*", "warning", "s" * 16, 0.0))
        await backend.commit(Commit("s", events=[event]))  # as a scored batch does
        worker = WebhookWorker(store, settings, ServiceMetrics(CollectorRegistry()))
        await worker.start()
        try:
            for _ in range(250):
                if not store.deliveries and not outbox:
                    break
                await asyncio.sleep(0.02)
        finally:
            await worker.stop()
        assert not store.deliveries, "the delivery neither succeeded nor failed"
        dead = await store.dead_letters(10)
        return dead[0] if dead else {}

    return asyncio.run(main())


def test_every_delivery_checks_its_destination_again():
    """Accepted once (allow-listed, or a name that resolved elsewhere then: DNS rebinding),
    refused at connect time when its addresses are internal now."""
    target = Target(200)
    try:
        url = f"http://localhost:{target.port}/hook"
        assert deliver_once(url, "localhost") == {}  # allow-listed: delivered
        assert target.requests == ["/hook"]
        dead = deliver_once(url, "")  # the same URL, not allow-listed any more
        assert target.requests == ["/hook"]  # nothing reached the target
        assert dead["last_error"].startswith("destination refused")
        assert dead["last_status"] is None
        # allow-listing the address (not the name) lets it through again
        assert deliver_once(url, "127.0.0.0/8, ::1") == {}
        assert target.requests == ["/hook", "/hook"]
    finally:
        target.close()


def test_redirects_are_not_followed_and_dead_letters_keep_no_answer():
    inside = Target(200)  # where the redirect points: must never be reached
    bouncer = Target(302, {"Location": f"http://127.0.0.1:{inside.port}/admin"},
                     body=b"internal-secret-banner")
    try:
        dead = deliver_once(f"http://127.0.0.1:{bouncer.port}/hook", "127.0.0.1")
    finally:
        inside.close()
        bouncer.close()
    assert bouncer.requests == ["/hook"] and inside.requests == []
    assert dead["last_status"] == 302 and dead["last_error"] == "HTTP 302"
    assert "internal-secret-banner" not in json.dumps(dead)


def test_a_closed_port_reads_as_a_connection_failure_without_detail():
    target = Target(200)
    port = target.port
    target.close()  # nothing listens there now
    dead = deliver_once(f"http://127.0.0.1:{port}/hook", "127.0.0.1")
    assert dead["last_error"] == "connection failed" and dead["last_status"] is None
