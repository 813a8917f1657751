"""Webhooks end to end with real processes: the service (uvicorn) on a real Redis, and a
real HTTP receiver (`tsad receive`, the demo receiver) that records what arrives."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.process import ServiceProcess, free_port
from service.webhooks.signing import verify
from tests.conftest import wait_for
from tests.test_alerts import spiky

pytestmark = pytest.mark.slow  # real processes; `make test` runs them

SECRET = "test-secret-0123456789"
ROOT = Path(__file__).resolve().parent.parent
FAST = {"TSAD_DETECTOR_PARAMS": '{"*": {"warmup": 64}}', "TSAD_DEFAULT_WINDOW": "16",
        "TSAD_THRESHOLD_MIN_SCORES": "50", "TSAD_THRESHOLD_CALIBRATION_POINTS": "200",
        "TSAD_ALERT_QUIET_POINTS": "10", "TSAD_WEBHOOK_POLL_SECONDS": "0.05",
        "TSAD_WEBHOOK_BACKOFF_SECONDS": "0.05", "TSAD_WEBHOOK_BACKOFF_MAX_SECONDS": "0.3",
        "TSAD_WEBHOOK_TIMEOUT_SECONDS": "3", "TSAD_WEBHOOK_LEASE_SECONDS": "5",
        # the receivers listen on loopback, which webhooks may reach only when allow-listed
        "TSAD_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"}


class Receiver:
    def __init__(self, log: Path, status: int = 200, port: int | None = None,
                 subscribe: str | None = None) -> None:
        self.log, self.status, self.port = log, status, port or free_port()
        self.subscribe = subscribe  # a service URL: `tsad receive --subscribe` it
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "receive", "--port", str(self.port),
             "--path", "/hook", "--log", str(self.log), "--status", str(self.status),
             "--secret", SECRET, *(["--subscribe", self.subscribe] if self.subscribe else [])],
            cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:  # 204 once listening and (with --subscribe) subscribed
                if httpx.get(self.url, timeout=0.5).status_code == 204:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("receiver did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def requests(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def subscribe(url: str, target: str, **extra) -> dict:
    r = httpx.post(f"{url}/webhooks", json={"url": target, "secret": SECRET, **extra})
    assert r.status_code == 201, r.text
    return r.json()


def produce_incident(url: str, stream: str, start: int = 0) -> None:
    """Normal points, one spike (an alert opens), then quiet (it resolves)."""
    r = httpx.post(f"{url}/score", json={"stream": stream, "points": spiky(
        400, [start + 350], start=start)}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["results"][350]["anomaly"]


@pytest.fixture
def receiver(tmp_path):
    rec = Receiver(tmp_path / "requests.jsonl").start()
    yield rec
    rec.stop()


def test_alerts_arrive_signed_with_idempotency_keys(redis_url, receiver):
    with ServiceProcess({"REDIS_URL": redis_url, **FAST}) as service:
        subscribe(service.url, receiver.url)
        subscribe(service.url, receiver.url + "?critical", min_severity="critical",
                  streams="other-*")  # matches nothing here
        produce_incident(service.url, "web-01")
        # deliveries run concurrently, so "resolved" may land before "opened": wait for both
        got = wait_for(lambda: {"alert.opened", "alert.resolved"} <= {
            r["body"]["type"] for r in receiver.requests()} and receiver.requests())
    assert all(r["verified"] for r in got)
    assert all(r["path"] == "/hook" for r in got)
    opened = [r for r in got if r["body"]["type"] == "alert.opened"]
    assert opened and opened[0]["body"]["alert"]["stream"] == "web-01"
    for r in got:
        h = r["headers"]
        assert h["idempotency-key"] == h["x-tsad-event-id"] == r["body"]["id"]
        assert h["x-tsad-event"] == r["body"]["type"]
        assert h["x-tsad-signature"].startswith("v1=")
    alert = opened[0]["body"]["alert"]
    assert alert["evidence"]["channels"][0]["prompt"]
    body = json.dumps(opened[0]["body"]).encode()  # a tampered body fails verification
    assert not verify(SECRET, opened[0]["headers"]["x-tsad-timestamp"],
                      opened[0]["headers"]["x-tsad-signature"], body + b" ")


def test_tsad_receive_subscribes_to_an_open_loopback_service_with_no_allow_list(tmp_path):
    """The README's receiver beside `make serve` (open, on 127.0.0.1, nothing allow-listed).
    Was: `subscription refused: 422 ... refused unless TSAD_WEBHOOK_ALLOW_HOSTS names
    them`, and the receiver exited (tests/test_ssrf.py: where loopback stays refused)."""
    env = {k: v for k, v in FAST.items() if k != "TSAD_WEBHOOK_ALLOW_HOSTS"}
    with ServiceProcess(env) as service:
        rec = Receiver(tmp_path / "requests.jsonl", subscribe=service.url).start()
        try:
            produce_incident(service.url, "web-01")
            got = wait_for(lambda: [r for r in rec.requests()
                                    if r["body"]["type"] == "alert.opened"])
        finally:
            rec.stop()
    assert got[0]["verified"] and got[0]["body"]["alert"]["stream"] == "web-01"


def test_delivery_survives_receiver_and_service_restarts_exactly_once(redis_url, tmp_path):
    """The receiver is down when the alert happens, the service restarts while the
    delivery is pending; once the receiver is back, every event arrives exactly once."""
    receiver = Receiver(tmp_path / "requests.jsonl")  # not started yet: connection refused
    env = {"REDIS_URL": redis_url, **FAST, "TSAD_WEBHOOK_MAX_ATTEMPTS": "100"}
    try:
        with ServiceProcess(env) as service:
            subscribe(service.url, receiver.url)
            produce_incident(service.url, "db-01")
            time.sleep(0.5)  # a few failed attempts
            metrics = httpx.get(f"{service.url}/metrics").text
            assert 'tsad_webhook_deliveries_total{outcome="retry"}' in metrics
        receiver.start()
        time.sleep(0.5)
        assert receiver.requests() == []  # nobody is delivering while the service is down
        with ServiceProcess(env) as service:
            alerts = httpx.get(f"{service.url}/alerts").json()["alerts"]
            expected = {f"{a['id']}-{v}-{a['incarnation']}" for a in alerts
                        for v in range(1, a["version"] + 1)}
            assert alerts
            wait_for(lambda: len(receiver.requests()) >= len(expected))
            time.sleep(1.0)  # would a duplicate follow?
            got = receiver.requests()
    finally:
        receiver.stop()
    keys = [r["headers"]["idempotency-key"] for r in got]
    assert len(keys) == len(set(keys)) and set(keys) == expected  # each event exactly once
    assert {r["body"]["type"] for r in got} >= {"alert.opened", "alert.resolved"}
    assert all(r["verified"] for r in got)
    assert max(int(r["headers"]["x-tsad-attempt"]) for r in got) > 1


def test_failing_receiver_ends_in_dead_letters_and_replay_delivers(redis_url, tmp_path):
    failing = Receiver(tmp_path / "failing.jsonl", status=500).start()
    env = {"REDIS_URL": redis_url, **FAST, "TSAD_WEBHOOK_MAX_ATTEMPTS": "3"}
    try:
        with ServiceProcess(env) as service:
            sub = subscribe(service.url, failing.url)
            produce_incident(service.url, "api-01")
            alerts = httpx.get(f"{service.url}/alerts").json()["alerts"]
            events = sum(a["version"] for a in alerts)
            dead = wait_for(lambda: len(d := httpx.get(
                f"{service.url}/webhooks/dead-letters").json()["dead_letters"]) >= events and d)
            assert len(dead) == events
            assert all(d["attempts"] == 3 and d["last_status"] == 500 for d in dead), [
                (d["attempts"], d["last_status"], d["last_error"]) for d in dead]
            assert {d["subscription_id"] for d in dead} == {sub["id"]}
            attempts = {}
            for r in failing.requests():
                attempts[r["body"]["id"]] = attempts.get(r["body"]["id"], 0) + 1
            assert attempts == {d["event_id"]: 3 for d in dead}, attempts
            metrics = httpx.get(f"{service.url}/metrics").text
            assert f"tsad_webhook_dead_letters_total {float(events)}" in metrics
            failing.stop()  # the receiver is fixed: same port, now answering 200
            fixed = Receiver(tmp_path / "fixed.jsonl", port=failing.port).start()
            try:
                for d in dead:
                    r = httpx.post(f"{service.url}/webhooks/dead-letters/{d['id']}/replay")
                    assert r.status_code == 202, r.text
                got = wait_for(lambda: len(fixed.requests()) >= events and fixed.requests())
                assert httpx.get(f"{service.url}/webhooks/dead-letters").json() == {
                    "dead_letters": []}
            finally:
                fixed.stop()
    finally:
        failing.stop()
    assert sorted(r["body"]["id"] for r in got) == sorted(d["event_id"] for d in dead)
    assert all(r["verified"] and r["headers"]["x-tsad-attempt"] == "1" for r in got)


def test_receiver_restart_keeps_its_subscription_and_pending_events(redis_url, tmp_path):
    """`tsad receive --subscribe`, failing while the incident happens, restarted fixed:
    the same subscription, and every event that was pending arrives."""
    with ServiceProcess({"REDIS_URL": redis_url, **FAST}) as service:
        first = Receiver(tmp_path / "first.jsonl", status=500, subscribe=service.url).start()
        try:
            (sub,) = httpx.get(f"{service.url}/webhooks").json()["webhooks"]
            produce_incident(service.url, "web-01")
            wait_for(lambda: len(first.requests()) >= 2)  # deliveries are being tried
        finally:
            first.stop()
        again = Receiver(tmp_path / "again.jsonl", port=first.port,
                         subscribe=service.url).start()
        try:
            assert httpx.get(f"{service.url}/webhooks").json()["webhooks"] == [sub]
            alerts = httpx.get(f"{service.url}/alerts").json()["alerts"]
            expected = {f"{a['id']}-{v}-{a['incarnation']}" for a in alerts
                        for v in range(1, a["version"] + 1)}
            got = wait_for(lambda: {r["body"]["id"] for r in again.requests()} >= expected
                           and again.requests())
        finally:
            again.stop()
        assert httpx.get(f"{service.url}/webhooks/dead-letters").json() == {
            "dead_letters": []}
    assert all(r["verified"] for r in got)  # signed with the restarted receiver's secret


def test_retries_stop_at_the_horizon_not_a_fixed_count(redis_url, tmp_path):
    failing = Receiver(tmp_path / "failing.jsonl", status=503).start()
    env = {"REDIS_URL": redis_url, **FAST, "TSAD_WEBHOOK_MAX_ATTEMPTS": "10000",
           "TSAD_WEBHOOK_RETRY_HORIZON_SECONDS": "1.5"}
    try:
        with ServiceProcess(env) as service:
            subscribe(service.url, failing.url)
            produce_incident(service.url, "api-01")
            events = sum(a["version"] for a in httpx.get(f"{service.url}/alerts").json()[
                "alerts"])
            dead = wait_for(lambda: len(d := httpx.get(
                f"{service.url}/webhooks/dead-letters").json()["dead_letters"]) >= events
                and d)
            # an alert's later events wait behind its first (in sequence order): they may
            # get one attempt before the horizon; each alert's first is retried
            assert all(d["last_status"] == 503 and 1 <= d["attempts"] < 100 for d in dead)
            assert all(d["attempts"] > 1 for d in dead if d["event"]["sequence"] == 1)
            assert all(d["failed_at"] - d["event"]["created"] < 1.5 + 1 for d in dead)
            # a replay starts the horizon over: retried again, not buried at once
            r = httpx.post(f"{service.url}/webhooks/dead-letters/{dead[0]['id']}/replay")
            assert r.status_code == 202
            again = wait_for(lambda: [d for d in httpx.get(
                f"{service.url}/webhooks/dead-letters").json()["dead_letters"]
                if d["id"] == dead[0]["id"]])
    finally:
        failing.stop()
    assert again[0]["attempts"] > 1 and again[0]["failed_at"] > dead[0]["failed_at"] + 1
