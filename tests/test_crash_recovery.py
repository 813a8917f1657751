"""Crash-consistent scoring: a crash between the append and the commit loses no point and
no alert; retries are answered, with their results; a dead holder's lock lapses fast.

The process tests kill the service at the one place that matters, right after the
append, with a test-only fault hook (TSAD_FAULT_CRASH_AFTER_APPEND=N: the process
os._exit()s after its Nth append that stored points, before scoring them). A kill -9
from outside could not be timed to land between two awaits; the hook's exit is as abrupt
(no finally block, no lock released, nothing flushed).
"""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.errors import InvalidInput
from service.metrics import ServiceMetrics
from service.process import ServiceProcess
from service.recovery import recover_all
from service.services import build_services
from service.settings import Settings
from service.stores.base import Commit, StreamPolicy, retained
from service.transaction import Idempotency
from tests.conftest import BackendUnderTest, wait_for

# --- the stream: 8 spikes, all in one batch longer than the window --------------------
N, CRASHED = 1000, slice(400, 1000)  # batches of 100, then the 600 points with the spikes
BATCHES = [slice(a, a + 100) for a in range(0, 400, 100)] + [CRASHED]
ENV = {"TSAD_DEFAULT_DETECTOR": "residual_linear", "TSAD_DEFAULT_WINDOW": "32",
       "TSAD_DETECTOR_PARAMS": '{"*": {"warmup": 64}}', "TSAD_THRESHOLD_KIND": "quantile",
       "TSAD_THRESHOLD_MIN_SCORES": "100", "TSAD_ALERT_COOLDOWN_SECONDS": "0"}
ALERT_FIELDS = ("state", "severity", "opened_at", "resolved_at", "peak_at", "peak_score",
                "anomalous_points", "points")


def points() -> list[dict]:
    rng = np.random.default_rng(0)
    t = np.arange(N)
    v = 50 + 10 * np.sin(2 * np.pi * t / 60) + rng.normal(0, 0.5, N)
    for k in range(8):
        v[420 + 60 * k] += 25 if k % 2 else -25
    return [{"timestamp": 1.7e9 + 60.0 * i, "values": [float(x)]} for i, x in enumerate(v)]


def alerts(url: str) -> list[tuple]:
    """The stream's alerts, without the ids (they carry the stream's creation time)."""
    body = httpx.get(f"{url}/alerts", params={"stream": "s", "limit": 500}).json()
    return sorted(tuple(a[f] for f in ALERT_FIELDS) for a in body["alerts"])


def scores(results: list[dict]) -> list[tuple]:
    return [(r["status"], r["anomaly"], r["score"], r["stored_timestamp"]) for r in results]


@pytest.fixture(scope="module")
def reference(redis_server) -> tuple[list[tuple], list[dict]]:
    """What a run without a crash produces: the alerts, and the crashed batch's results."""
    if redis_server.proc is None:
        redis_server.start()
    pts = points()
    with ServiceProcess({**ENV, "REDIS_URL": redis_server.url,
                         "TSAD_REDIS_PREFIX": "reference"}) as service:
        for b in BATCHES:
            r = httpx.post(f"{service.url}/score", json={"stream": "s", "points": pts[b]},
                           timeout=60)
            assert r.status_code == 200, r.text
        return alerts(service.url), r.json()["results"]


def crash(redis_url: str, prefix: str, **headers: str) -> tuple[ServiceProcess, float]:
    """Post the batches to a service that dies right after appending the last one; returns
    it (dead) and the time it died."""
    service = ServiceProcess({**ENV, "REDIS_URL": redis_url, "TSAD_REDIS_PREFIX": prefix,
                              "TSAD_FAULT_CRASH_AFTER_APPEND": str(len(BATCHES))}).start()
    pts = points()
    for b in BATCHES[:-1]:
        r = httpx.post(f"{service.url}/score", json={"stream": "s", "points": pts[b]},
                       timeout=60)
        assert r.status_code == 200, r.text
    with pytest.raises(httpx.TransportError):  # no answer: the points were never acked
        httpx.post(f"{service.url}/score", json={"stream": "s", "points": pts[CRASHED]},
                   headers=headers, timeout=60)
    assert service.proc is not None and service.proc.wait(timeout=10) == 137
    return service, time.monotonic()


@pytest.mark.slow
def test_a_crash_before_the_commit_loses_no_point_and_no_alert(redis_url, reference):
    """Killed between append and commit, restarted, the batch retried (600 points, longer
    than the window and the retained history): the retry is answered with the points'
    results (not a 422), every alert of a run without a crash is there, no point is lost
    or stored twice, and the dead holder's lock lapsed within one lease (5 s, not 30)."""
    ref_alerts, ref_results = reference
    assert len(ref_alerts) >= 8
    r = redis.Redis.from_url(redis_url)
    _, died = crash(redis_url, "crash", **{"Idempotency-Key": "batch-5"})
    lock = "crash:{s}:lock"
    assert r.exists(lock)  # the dead process held it
    wait_for(lambda: not r.exists(lock), timeout=10, interval=0.02)
    blocked = time.monotonic() - died
    assert blocked < 5.5, blocked
    assert int(r.hget("crash:{s}:meta", "points_seen")) == N  # stored: append came first
    assert int(r.hget("crash:{s}:meta", "scored")) == 400  # scored: not the crashed batch

    env = {**ENV, "REDIS_URL": redis_url, "TSAD_REDIS_PREFIX": "crash",
           "TSAD_RECOVER_ON_START": "false"}  # the retry itself scores what was left
    with ServiceProcess(env) as service:
        body = {"stream": "s", "points": points()[CRASHED]}
        retry = httpx.post(f"{service.url}/score", json=body, timeout=60,
                           headers={"Idempotency-Key": "batch-5"})
        assert retry.status_code == 200, retry.text
        got = retry.json()["results"]
        assert scores(got) == scores(ref_results)  # as if it had never crashed
        assert alerts(service.url) == ref_alerts
        stream = httpx.get(f"{service.url}/streams/s").json()
        assert stream["points_seen"] == N and stream["last_timestamp"] == 1.7e9 + 60.0 * 999
        again = httpx.post(f"{service.url}/score", json=body, timeout=60,
                           headers={"Idempotency-Key": "batch-5"})
        assert again.status_code == 200 and again.json() == retry.json()  # kept response
        plain = httpx.post(f"{service.url}/score", json=body, timeout=60)  # no key
        assert plain.status_code == 200
        assert {p["status"] for p in plain.json()["results"]} == {"duplicate"}
        metrics = httpx.get(f"{service.url}/metrics").text
        assert "tsad_points_recovered_total 600.0" in metrics
        assert "tsad_idempotent_replays_total 1.0" in metrics
        assert alerts(service.url) == ref_alerts  # the retries raised nothing twice


@pytest.mark.slow
def test_start_up_recovery_raises_the_alerts_of_a_stream_that_gets_no_more_traffic(
        redis_url, reference):
    ref_alerts, _ = reference
    crash(redis_url, "idle")
    env = {**ENV, "REDIS_URL": redis_url, "TSAD_REDIS_PREFIX": "idle"}
    with ServiceProcess(env) as service:
        wait_for(lambda: alerts(service.url) == ref_alerts, timeout=30, interval=0.2)
        assert "tsad_points_recovered_total 600.0" in httpx.get(f"{service.url}/metrics").text
        assert httpx.get(f"{service.url}/streams/s").json()["points_seen"] == N


# --- the stores: unscored points held and handed back, receipts, leases ----------------
W = 8


def rows(ts: list[float]) -> np.ndarray:
    t = np.asarray(ts, dtype=np.float64)[:, None]
    return np.hstack([t, t * 2])


@pytest.fixture
async def store(backend):
    s = backend.build(StreamPolicy(window=W, detector="zscore", unscored_max_points=300),
                      lock_lease_seconds=0.6)
    yield s
    await s.close()


async def append(store, ts: list[float]):
    return await store.streams.append("u", rows(ts))


async def commit(store, scored: int, receipt: tuple[str, bytes] | None = None) -> int:
    """What a scored batch's commit writes for the stream (its sections: one here)."""
    return await store.commit(Commit("u", sections={"det": b"state"}, scored=scored,
                                     receipt=receipt))


async def test_unscored_points_are_held_and_handed_back_first(store):
    await append(store, list(range(100)))
    await commit(store, 100)  # a commit
    crashed = await append(store, list(range(100, 250)))  # then no commit: a crash
    assert (crashed.unscored, crashed.accepted) == (0, 150)
    meta = await store.streams.get("u")
    assert (meta.points_seen, meta.points_scored) == (250, 100)
    nxt = await append(store, [250, 251])
    # the 150 unscored come back before the batch, with their context
    assert (nxt.unscored, nxt.skipped, nxt.to_score) == (150, 0, 152)
    np.testing.assert_array_equal(nxt.points[-152:, 0], np.arange(100, 252))
    assert len(nxt.points) >= 152 + retained(W) - 1
    await commit(store, 252)
    done = await append(store, [252])
    assert (done.unscored, done.to_score, len(done.points)) == (0, 1, retained(W))


async def test_beyond_the_limit_unscored_points_are_skipped_visibly(store):
    await append(store, [0])
    await commit(store, 1)
    for a in range(1, 501, 100):  # 500 points never scored; the store holds 300
        await append(store, list(range(a, a + 100)))
    late = await append(store, [501])
    assert (late.unscored, late.skipped) == (300, 200)
    np.testing.assert_array_equal(late.points[-301:, 0], np.arange(201, 502))


async def test_a_retry_of_a_batch_longer_than_the_window_is_answered(store):
    await append(store, list(range(10)))
    await commit(store, 10)
    await append(store, list(range(10, 210)))
    await commit(store, 210)
    again = await append(store, list(range(10, 210)))  # all 200 recognised, not 422
    assert again.actions == ["duplicate"] * 200 and again.accepted == 0
    assert again.stamps == [float(t) for t in range(10, 210)]
    assert (await store.streams.get("u")).points_seen == 210


async def test_receipts_round_trip_with_the_commit(store):
    await append(store, [1, 2])
    assert await store.streams.receipt("u", "k1") is None
    await commit(store, 2, receipt=("k1", b"response"))
    await store.commit(Commit("u", receipt=("k2", b"other")))  # nothing scored: alone
    assert await store.streams.receipt("u", "k1") == b"response"
    assert await store.streams.receipt("u", "k2") == b"other"
    assert await store.streams.receipt("v", "k1") is None  # per stream
    assert (await store.streams.get("u")).points_scored == 2


async def test_a_lock_is_held_past_its_lease_while_its_holder_lives(store):
    """The holder renews its short lease: nobody else gets in while it works."""
    order: list[str] = []

    async def hold() -> None:
        async with store.streams.lock("L"):
            order.append("a-in")
            await asyncio.sleep(2.0)  # over three leases of 0.6 s
            order.append("a-out")

    async def wait() -> None:
        await asyncio.sleep(0.1)
        async with store.streams.lock("L"):
            order.append("b-in")

    await asyncio.gather(hold(), wait())
    assert order == ["a-in", "a-out", "b-in"]


async def test_a_dead_holders_lock_lapses_within_its_lease(redis_url):
    """A holder that stops renewing (its process died) frees the stream within a lease;
    the default lease is seconds, where it used to be 30."""
    assert Settings().lock_lease_seconds <= 5
    store = BackendUnderTest("redis", redis_url).build(lock_lease_seconds=0.6)
    held = store.streams.lock("L")
    await held.__aenter__()
    task = next(t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_hold")
    task.cancel()  # what a kill -9 does to the heartbeat
    start = time.monotonic()
    async with store.streams.lock("L"):
        waited = time.monotonic() - start
    assert waited < 0.6 + 0.2
    await store.close()


# --- the API, both stores: Idempotency-Key, and retries without one ------------------
def client(backend: BackendUnderTest, **overrides) -> TestClient:
    settings = Settings(**backend.settings, detector_params={"*": {"warmup": 64}},
                        threshold_min_scores=20, **overrides)
    return TestClient(create_app(settings, ServiceMetrics(CollectorRegistry())))


def sine(start: int, n: int) -> list[dict]:
    return [{"timestamp": float(t), "values": [math.sin(t / 5)]} for t in range(start, start + n)]


def test_idempotency_key_returns_the_same_response_and_refuses_another_body(service_backend):
    with client(service_backend) as c:
        assert c.post("/score", json={"stream": "i", "points": sine(0, 200)}).status_code == 200
        body = {"stream": "i", "points": sine(200, 120)}
        key = {"Idempotency-Key": "b-200"}
        first = c.post("/score", json=body, headers=key)
        assert first.status_code == 200
        assert {p["status"] for p in first.json()["results"]} == {"scored"}
        again = c.post("/score", json=body, headers=key)
        assert again.status_code == 200 and again.json() == first.json()
        assert c.get("/streams/i").json()["points_seen"] == 320  # stored once
        other = c.post("/score", json={"stream": "i", "points": sine(320, 5)}, headers=key)
        assert other.status_code == 422
        assert "header.Idempotency-Key" in other.json()["message"]
        assert "different batch" in other.json()["message"]
        assert c.get("/streams/i").json()["points_seen"] == 320  # changed nothing
        # the same key on another stream is another batch
        assert c.post("/score", json={"stream": "j", "points": sine(320, 5)},
                      headers=key).status_code == 200
        bad = c.post("/score", json=body, headers={"Idempotency-Key": "x" * 256})
        assert bad.status_code == 422 and "Idempotency-Key" in bad.json()["message"]
        assert "tsad_idempotent_replays_total 1.0" in c.get("/metrics").text


def test_a_receipt_of_a_deleted_stream_does_not_answer_its_successor(service_backend):
    with client(service_backend) as c:
        body = {"stream": "d", "points": sine(0, 10)}
        key = {"Idempotency-Key": "k"}
        assert c.post("/score", json=body, headers=key).status_code == 200
        assert c.delete("/streams/d").status_code == 204
        r = c.post("/score", json=body, headers=key)
        assert r.status_code == 200 and c.get("/streams/d").json()["points_seen"] == 10


def test_a_retry_without_key_is_answered_duplicate_never_422(service_backend):
    """Default duplicates=reject: a retried batch (longer than the retained window) is
    answered status duplicate; a retry that goes on with new points is still a 422."""
    with client(service_backend, default_window=16) as c:
        body = {"stream": "r", "points": sine(0, 300)}
        assert c.post("/score", json=body).status_code == 200
        again = c.post("/score", json=body)
        assert again.status_code == 200, again.text
        assert [p["status"] for p in again.json()["results"]] == ["duplicate"] * 300
        mixed = c.post("/score", json={"stream": "r", "points": sine(290, 20)})
        assert mixed.status_code == 422
        assert c.get("/streams/r").json()["points_seen"] == 300


# --- Idempotency-Key after a crash, every backend: the first request's answer ----------
class Crash(Exception):
    """What the process's death between the append and the commit leaves: no commit."""


async def test_an_idempotent_retry_gets_the_first_answer_after_recovery_scored_it(backend):
    """A batch sent with a key is stored, then its process dies before the commit; the
    start-up recovery (stream a) or the stream's next batch (stream b) scores it. The
    retry with the same key gets the results the first request would have had (was:
    status duplicate with no score, 50-150 points per client in the audit's crash runs)."""
    settings = Settings(**backend.settings, default_detector="residual_linear",
                        default_window=16, detector_params={"*": {"warmup": 64}},
                        threshold_min_scores=20)
    services = build_services(settings, ServiceMetrics(CollectorRegistry()))
    score = services.score
    warm, batch, later = (np.arange(a, b, dtype=float) for a, b in ((0, 150), (150, 190),
                                                                    (190, 200)))
    values = lambda t: np.sin(t / 5)[:, None] + (t == 170)[:, None] * 4  # noqa: E731
    key = Idempotency("batch-2", "digest", batch.tolist())
    try:
        await score("ref", warm, values(warm))
        first = (await score("ref", batch, values(batch), idempotency=key)).body(key.sent)
        assert {r["status"] for r in first["results"]} == {"scored"}
        assert any(r["anomaly"] for r in first["results"])

        def die(appended) -> None:
            raise Crash

        for stream in ("a", "b"):
            await score(stream, warm, values(warm))
            score.after_append = die
            with pytest.raises(Crash):
                await score(stream, batch, values(batch), idempotency=key)
            score.after_append = None
        await recover_all(services.backend, score)  # stream a
        assert (await services.backend.streams.get("a")).points_scored == 190
        await score("b", later, values(later))  # stream b: its next batch scores it first
        for stream in ("a", "b"):
            again = (await score(stream, batch, values(batch), idempotency=key)).body(key.sent)
            assert again["results"] == first["results"], stream
            assert again["points_until_scored"] == first["points_until_scored"]
            other = Idempotency("batch-2", "another body", batch.tolist())
            with pytest.raises(InvalidInput, match="different batch"):
                await score(stream, batch, values(batch), idempotency=other)
        assert (await services.backend.streams.get("a")).points_seen == 190  # stored once
    finally:
        await services.backend.close()
