"""Limits that keep the service alive: body size and read deadline (in process and on a
real uvicorn process), stream shape and count caps, paging, query checks, the residual
detector's state size, expiries, and webhooks that never drop a pending event."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import numpy as np
import pytest
import redis

from models.detectors import build_detector
from models.detectors.base import sliding_windows
from service.process import ServiceProcess
from service.stores.base import Commit
from service.webhooks.model import DELETED, Subscription
from tests.conftest import BackendUnderTest, wait_for
from tests.test_alerts import make_client, spiky

MEMORY = BackendUnderTest("memory")


# --- body size and read deadline, in process (chunks fed one by one) ---------------------
def asgi_post(client, path: str, chunks, delay: float = 0.0,
              headers: dict[str, str] | None = None,
              method: str = "POST") -> tuple[int, dict, int]:
    """POST ``chunks`` as a chunked body straight into the app: (status, body, chunks the
    app pulled)."""
    pulled = 0
    it = iter(chunks)

    async def receive() -> dict:
        nonlocal pulled
        await asyncio.sleep(delay)
        chunk = next(it, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def call() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80), "app": client.app,
                 "headers": [(b"content-type", b"application/json"),
                             (b"transfer-encoding", b"chunked"),
                             *((k.lower().encode(), v.encode())
                               for k, v in (headers or {}).items())]}
        await client.app(scope, receive, send)

    client.portal.call(call)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


def test_streamed_body_over_the_limit_is_413_before_it_is_read_whole():
    with make_client(MEMORY, max_body_bytes=100_000) as client:
        chunks = [b" " * 10_000] * 1000  # 10 MB of it, if anyone read it all
        status, body, pulled = asgi_post(client, "/score", chunks)
        assert status == 413 and "TSAD_MAX_BODY_BYTES" in body["message"], body
        assert pulled == 11  # stopped at the first chunk past 100 kB
        ok = json.dumps({"stream": "s", "points": spiky(50, [])}).encode()
        status, body, _ = asgi_post(client, "/score", [ok[:1000], ok[1000:]])
        assert status == 200, body  # under the limit, streamed bodies work as before
        lines = client.get("/metrics").text.splitlines()
        assert any(line.startswith("tsad_http_requests_total{") and 'route="/score"' in line
                   and 'status="413"' in line for line in lines)


def test_body_that_does_not_arrive_in_time_is_408():
    with make_client(MEMORY, body_timeout_seconds=0.3) as client:
        status, body, pulled = asgi_post(client, "/score", [b"{"] * 100, delay=0.1)
        assert status == 408 and "TSAD_BODY_TIMEOUT_SECONDS" in body["message"], body
        assert pulled < 10


# --- the same on a real uvicorn process -------------------------------------------------
@pytest.fixture(scope="module")
def service():
    env = {"TSAD_MAX_BODY_BYTES": "1000000", "TSAD_BODY_TIMEOUT_SECONDS": "1",
           "TSAD_KEEP_ALIVE_SECONDS": "1"}
    with ServiceProcess(env) as svc:
        yield svc


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes: (response, seconds it took)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        start, out = time.monotonic(), b""
        while chunk := sock.recv(65536):
            out += chunk
        return out, time.monotonic() - start


def test_declared_oversized_body_is_refused_unread_by_the_server(service):
    # 50 MB announced, not one byte of it sent: the answer comes anyway, and at once
    head = (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\n\r\n")
    out, took = exchange(service.port, head)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert b"TSAD_MAX_BODY_BYTES" in out and took < 5


def test_half_sent_body_is_408_and_the_connection_closes(service):
    head = (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"stream\": ")
    out, took = exchange(service.port, head)
    assert out.startswith(b"HTTP/1.1 408"), out[:200]
    assert b"TSAD_BODY_TIMEOUT_SECONDS" in out and 0.5 < took < 5


def test_idle_keep_alive_connections_are_closed(service):
    out, took = exchange(service.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    assert 0.5 < took < 3  # closed by the server after TSAD_KEEP_ALIVE_SECONDS idle


# --- stream shape and count -----------------------------------------------------------
def test_stream_shape_limits_are_422_naming_the_limit(service_backend):
    with make_client(service_backend, max_channels=8, max_window=256) as client:
        r = client.put("/streams/x", json={"channels": 1_000_000_000})
        assert r.status_code == 422 and "body.channels" in r.json()["message"]
        assert "TSAD_MAX_CHANNELS" in r.json()["message"]
        r = client.put("/streams/x", json={"channels": 2, "window": 4096})
        assert r.status_code == 422 and "body.window" in r.json()["message"]
        assert "TSAD_MAX_WINDOW" in r.json()["message"]
        assert client.get("/streams/x").status_code == 404  # nothing changed
        assert client.put("/streams/x", json={"channels": 8, "window": 256}).status_code == 201


def test_stream_count_is_capped_for_put_and_score(service_backend):
    with make_client(service_backend, max_streams=2) as client:
        for s in ("a", "b"):
            assert client.put(f"/streams/{s}", json={"channels": 2}).status_code == 201
        r = client.put("/streams/c", json={"channels": 2})
        assert r.status_code == 429 and "TSAD_MAX_STREAMS" in r.json()["message"], r.text
        r = client.post("/score", json={"stream": "d", "points": spiky(10, [])})
        assert r.status_code == 429 and "body.stream" in r.json()["message"], r.text
        assert client.get("/streams/d").status_code == 404  # its points were not kept
        assert client.put("/streams/a", json={"channels": 2, "window": 32}).status_code == 200
        assert client.post("/score", json={"stream": "a", "points": spiky(10, [])}
                           ).status_code == 200  # existing streams go on
        assert client.delete("/streams/b").status_code == 204
        assert client.post("/score", json={"stream": "d", "points": spiky(10, [])}
                           ).status_code == 200


def test_one_tenant_cannot_fill_the_store_for_the_others(service_backend):
    """TSAD_MAX_STREAMS_PER_TENANT beside TSAD_MAX_STREAMS: a tenant's keys create at most
    its quota (POST /score and PUT alike); other tenants, and keys without tenant, still
    create streams (was: the cap was global only, so one tenant's ingest key could take
    every stream the store allows)."""
    admin = "tenant-quota-admin-key-" + "k" * 32
    with make_client(service_backend, auth="keys", admin_key=admin, max_streams=5,
                     max_streams_per_tenant=2) as client:
        def key(tenant: str | None, *scopes: str) -> dict[str, str]:
            r = client.post("/keys", json={"name": "t", "scopes": list(scopes),
                                           "tenant": tenant},
                            headers={"Authorization": f"Bearer {admin}"})
            return {"Authorization": f"Bearer {r.json()['key']}"}

        def score(stream: str, headers: dict[str, str]) -> int:
            return client.post("/score", json={"stream": stream, "points": spiky(5, [])},
                               headers=headers).status_code

        acme, globex = key("acme", "ingest"), key("globex", "admin")
        assert [score(f"acme.s{i}", acme) for i in range(2)] == [200, 200]
        r = client.post("/score", json={"stream": "acme.s2", "points": spiky(5, [])},
                        headers=acme)
        assert r.status_code == 429, r.text
        assert "TSAD_MAX_STREAMS_PER_TENANT" in r.json()["message"]
        assert "body.stream" in r.json()["message"]
        assert score("acme.s0", acme) == 200  # its streams go on
        r = client.put("/streams/acme.s3", json={"channels": 1}, headers=key("acme", "admin"))
        assert r.status_code == 429 and "'acme'" in r.json()["message"]
        # the other tenant, and a key without tenant, are not held by acme's streams
        assert score("globex.s0", globex) == 200
        assert client.put("/streams/globex.s1", json={"channels": 1},
                          headers=globex).status_code == 201
        assert score("ops.s0", {"Authorization": f"Bearer {admin}"}) == 200
        assert score("globex.s2", globex) == 429  # its own quota
        client.delete("/streams/acme.s1", headers=key("acme", "admin"))
        assert score("acme.s2", acme) == 200  # room again
        assert score("ops.s1", {"Authorization": f"Bearer {admin}"}) == 429  # the store's 5


async def test_a_tenants_streams_are_counted_by_prefix(backend):
    store = backend.build()
    try:
        for stream in ("acme.a", "acme.b", "acmex.c", "globex.d", "acme"):
            await store.streams.append(stream, np.array([[1.0, 2.0]]))
        assert await store.streams.count(prefix="acme.") == 2
        assert await store.streams.count(exact=True, prefix="acme.") == 2
        assert await store.streams.count(prefix="initech.") == 0
        assert await store.streams.count() == 5
        await store.streams.delete("acme.a")
        assert await store.streams.count(exact=True, prefix="acme.") == 1
    finally:
        await store.close()


def test_streams_are_listed_a_page_at_a_time(service_backend):
    with make_client(service_backend) as client:
        ids = ["s3", "s1", "s4", "s0", "s2"]
        for s in ids:
            client.put(f"/streams/{s}", json={"channels": 1})
        seen, cursor = [], None
        while True:
            page = client.get("/streams", params={"limit": 2} | (
                {"cursor": cursor} if cursor else {})).json()
            assert len(page["streams"]) <= 2
            seen += [s["stream"] for s in page["streams"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(ids)
        everything = client.get("/streams").json()  # no parameters: as before, plus a cursor
        assert [s["stream"] for s in everything["streams"]] == sorted(ids)
        assert everything["next_cursor"] is None
        for params, field in (({"limit": 0}, "query.limit"), ({"limit": 5000}, "query.limit"),
                              ({"cursor": "a/b"}, "query.cursor")):
            r = client.get("/streams", params=params)
            assert r.status_code == 422 and field in r.json()["message"], r.text


@pytest.mark.parametrize("params,field", [
    ({"cursor": "8+42:al_c"}, "query.cursor"),
    ({"cursor": "e:al_c"}, "query.cursor"),
    ({"cursor": "nan:al_c"}, "query.cursor"),
    ({"since": "nan"}, "query.since"),
    ({"until": "inf"}, "query.until"),
    ({"limit": 100_000}, "query.limit"),
])
def test_bad_alert_queries_are_422_naming_the_parameter(service_backend, params, field):
    with make_client(service_backend) as client:
        r = client.get("/alerts", params=params)
        assert r.status_code == 422 and field in r.json()["message"], r.text


# --- detector state size ------------------------------------------------------------------
def test_residual_linear_state_is_small_at_window_4096():
    rng = np.random.default_rng(0)
    series = np.sin(np.arange(4600.0) / 5.0)[:, None] + 0.01 * rng.standard_normal((4600, 1))
    det = build_detector("residual_linear", window=4096, warmup=256)
    det.partial_fit(sliding_windows(series[:4500], 4096))
    assert det.is_fitted and det.lags == 128
    assert sum(v.nbytes for v in det.state_dict().values()) < 150_000  # was 134 MB
    clean = sliding_windows(series[-4200:], 4096)[:40]
    spiked = clean.copy()
    spiked[:, -1, 0] += 1.0
    assert det.score(spiked).min() > 5 * det.score(clean).max()


def test_residual_linear_state_of_another_lag_count_keeps_its_own():
    series = np.sin(np.arange(3000.0) / 7.0)[:, None]
    wide = build_detector("residual_linear", window=64, max_lags=1000).fit(series)
    narrow = build_detector("residual_linear", window=64, max_lags=8)
    narrow.load_state_dict(wide.state_dict())  # e.g. a blob saved before the cap
    windows = sliding_windows(series[-200:], 64)
    assert narrow.lags == 63
    assert np.allclose(narrow.score(windows), wide.score(windows))


# --- webhooks: nothing pending is dropped, dead letters expire --------------------------
def event(i: int) -> dict:
    return {"id": f"al_{i:04x}-1-abcd", "type": "alert.opened", "created": time.time(),
            "alert": {"stream": "s", "severity": "warning"}}


async def queue_events(store, n: int) -> Subscription:
    """A subscription and n events committed to the outbox, fanned out to it."""
    sub = Subscription(id="wh_1", url="http://127.0.0.1:9/hook", streams="*",
                       min_severity="warning", secret="s" * 16, created_at=time.time())
    await store.webhooks.add(sub)
    await store.commit(Commit("s", events=[event(i) for i in range(n)]))
    hooks = store.webhooks
    assert await hooks.fan_out(await hooks.subscriptions(), limit=100) == n
    return sub


def test_unsubscribing_dead_letters_pending_deliveries_with_a_reason(backend):
    async def run() -> None:
        backend_ = backend.build()
        store = backend_.webhooks
        sub = await queue_events(backend_, 10)
        assert await store.depth() == 10
        assert await store.remove(sub.id)
        assert await store.depth() == 0
        dead = await store.dead_letters(100)
        assert len(dead) == 10 and {d["last_error"] for d in dead} == {DELETED}
        assert {d["event_id"] for d in dead} == {event(i)["id"] for i in range(10)}
        assert await store.dead_letter(dead[0]["id"]) == dead[0]
        await backend_.close()

    asyncio.run(run())


def test_dead_letters_expire_after_their_retention(backend):
    async def run() -> None:
        backend_ = backend.build()
        store = backend_.webhooks
        store.dead_retention_seconds = 0.3  # the setting's floor is a minute
        await queue_events(backend_, 3)
        for d in await store.claim_due(time.time(), 10, 60):
            await store.bury(d | {"last_error": "HTTP 500"})
        assert len(await store.dead_letters(10)) == 3
        await asyncio.sleep(0.5)
        assert await store.dead_letters(10) == []
        if backend.redis_url:  # gone from Redis, not just hidden
            assert not await store.redis.exists(store.k_dead, store.k_dead_idx)
        await backend_.close()

    asyncio.run(run())


def test_webhook_subscription_is_updated_in_place(service_backend):
    with make_client(service_backend) as client:
        created = client.post("/webhooks", json={"url": "http://127.0.0.1:9/hook"}).json()
        r = client.patch(f"/webhooks/{created['id']}",
                         json={"streams": "web-*", "secret": "n" * 20})
        assert r.status_code == 200 and r.json()["streams"] == "web-*"
        assert r.json()["id"] == created["id"] and "secret" not in r.json()
        for body, field in (({"streams": "a/b"}, "body.streams"),
                            ({"secret": None}, "body.secret"),
                            ({"url": "http://x.example/"}, "body.url")):
            r = client.patch(f"/webhooks/{created['id']}", json=body)
            assert r.status_code == 422 and field in r.json()["message"], r.text
        assert client.patch("/webhooks/wh_nope", json={}).status_code == 404
        # the published schema offers null only where null is accepted (description)
        schema = client.get("/openapi.json").json()["components"]["schemas"]["WebhookPatch"]
        for name, prop in schema["properties"].items():
            nullable = any(t.get("type") == "null" for t in prop.get("anyOf", []))
            assert nullable == (name == "description"), (name, prop)
        r = client.patch(f"/webhooks/{created['id']}", json={"description": None})
        assert r.status_code == 200 and r.json()["description"] is None


# --- a deleted stream: its alerts close and expire, its next life's events are new -----
def pending_events(client, redis_url: str | None) -> list[dict]:
    store = client.app.state.services.backend.webhooks
    if redis_url:
        raws = redis.Redis.from_url(redis_url).hvals(store.k_deliveries)
    else:
        raws = [json.dumps(d) for d in list(store.deliveries.values())]
    return [json.loads(json.loads(r)["body"]) for r in raws]


def test_deleted_stream_resolves_and_expires_its_alerts_and_event_ids_stay_unique(
        service_backend):
    redis_url = service_backend.redis_url
    points = spiky(400, [395])  # the alert is still open at the end
    with make_client(service_backend, alert_retention_seconds=600) as client:
        client.post("/webhooks", json={"url": "http://127.0.0.1:9/hook"})  # never answers
        assert client.post("/score", json={"stream": "s", "points": points}).status_code == 200
        opened = client.get("/alerts", params={"state": "open"}).json()["alerts"]
        assert len(opened) == 1
        first = opened[0]
        assert client.delete("/streams/s").status_code == 204
        closed = client.get(f"/alerts/{first['id']}").json()
        assert closed["state"] == "resolved" and closed["resolved_at"] == closed["updated_at"]
        assert client.get("/alerts", params={"state": "open"}).json()["alerts"] == []
        if redis_url:
            ttl = redis.Redis.from_url(redis_url).ttl(f"tsad:alert:{first['id']}")
            assert 0 < ttl <= 600
        # the same history again: a new life, a new alert id (the first life's alert stays
        # readable), new event ids
        assert client.post("/score", json={"stream": "s", "points": points}).status_code == 200
        again = client.get("/alerts", params={"state": "open"}).json()["alerts"]
        assert len(again) == 1 and again[0]["id"] != first["id"]
        assert again[0]["incarnation"] != first["incarnation"]
        assert client.get(f"/alerts/{first['id']}").json()["state"] == "resolved"
        # both lives' events (a replay is deterministic), the deletion's included
        listed = client.get("/alerts").json()["alerts"]
        n = sum(a["version"] for a in listed)
        second = [a for a in listed if a["incarnation"] == again[0]["incarnation"]]
        assert n == 2 * sum(a["version"] for a in second) + 1
        events = wait_for(lambda: len(e := pending_events(client, redis_url))
                          >= n and e)
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)) == n
    gone = [e for e in events if e["reason"] == "stream deleted"]
    assert len(gone) == 1 and gone[0]["type"] == "alert.resolved"
    assert gone[0]["id"] == f"{first['id']}-{first['version'] + 1}-{first['incarnation']}"
