"""The alert lifecycle (unit) and the /alerts, /streams threshold and /webhooks
validation APIs in process, against both stores (Redis is a real server)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.alerts.tracker import AlertRules, AlertTracker
from service.app import create_app
from service.metrics import ServiceMetrics
from service.settings import Settings
from tests.conftest import BackendUnderTest

W = 16


def run_tracker(anomalous: list[bool], ratios: list[float] | None = None,
                rules: AlertRules | None = None, step: float = 60.0,
                tracker: AlertTracker | None = None, start: float = 0.0):
    tracker = tracker or AlertTracker("s", ["cpu", "mem"], rules or AlertRules())
    n = len(anomalous)
    ratios = ratios or [1.2 if a else 0.5 for a in anomalous]
    rng = np.random.default_rng(0)
    tracker.observe(start + step * np.arange(n), np.array(ratios) * 5.0, np.full(n, 5.0),
                    np.array(anomalous), rng.random((n, 2)) + [[1.0, 0.0]],
                    rng.standard_normal((n, W, 2)))
    return tracker


def events_of(tracker: AlertTracker) -> list[tuple[str, str]]:
    return [(e["type"], e["alert"]["id"]) for e in tracker.drain()[1]]


def test_flapping_signal_gives_one_alert_not_a_storm():
    # anomalous every 5th point for a while: inside the quiet period, one open alert
    pattern = ([True] + [False] * 4) * 20
    # then bursts 30 points apart: each resolves, the next reopens within the cooldown
    pattern += ([True] + [False] * 29) * 5
    tracker = run_tracker(pattern, rules=AlertRules(quiet_points=12, cooldown_seconds=3600))
    events = events_of(tracker)
    assert {aid for _, aid in events} == {events[0][1]}  # one alert id throughout
    kinds = [k for k, _ in events]
    assert kinds.count("alert.opened") == 1
    alert = tracker.last_resolved  # the series ends quiet
    # the first burst of phase two is still inside the quiet period; the other four reopen
    assert alert is not None and alert.reopened == 4 and alert.anomalous_points == 25


def test_without_cooldown_separate_incidents_are_separate_alerts():
    pattern = ([True] + [False] * 29) * 3
    tracker = run_tracker(pattern, rules=AlertRules(quiet_points=12, cooldown_seconds=0))
    kinds = [k for k, _ in events_of(tracker)]
    assert kinds == ["alert.opened", "alert.resolved"] * 3


def test_k_of_m_and_critical_points_open_alerts():
    rules = AlertRules(k=2, m=5, quiet_points=3, cooldown_seconds=0)
    lone = run_tracker([True] + [False] * 10, rules=rules)
    assert events_of(lone) == []
    pair = run_tracker([True, False, False, True] + [False] * 5, rules=rules)
    assert [k for k, _ in events_of(pair)] == ["alert.opened", "alert.resolved"]
    critical = run_tracker([True] + [False] * 5, ratios=[3.0] + [0.5] * 5, rules=rules)
    opened = critical.drain()[1][0]
    assert opened["type"] == "alert.opened" and opened["alert"]["severity"] == "critical"
    assert opened["reason"] == "critical"


def test_lifecycle_updates_escalation_resolution_and_stable_ids():
    rules = AlertRules(quiet_points=4, cooldown_seconds=0, critical_ratio=2.0)
    ratios = [1.2, 1.5, 0.5, 2.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    tracker = run_tracker([r > 1 for r in ratios], ratios=ratios, rules=rules, start=1000.0)
    alerts, events = tracker.drain()
    assert [e["type"] for e in events] == ["alert.opened", "alert.updated", "alert.resolved"]
    assert events[1]["reason"] == "escalated"
    alert = alerts[0]
    assert alert.state == "resolved" and alert.severity == "critical"
    assert (alert.opened_at, alert.last_anomaly_at, alert.resolved_at) == (1000, 1180, 1420)
    assert alert.peak_score == 12.5 and alert.anomalous_points == 3 and alert.version == 3
    assert [e["id"] for e in events] == [f"{alert.id}-{v}" for v in (1, 2, 3)]
    again = run_tracker([r > 1 for r in ratios], ratios=ratios, rules=rules, start=1000.0)
    assert again.drain()[0][0].id == alert.id  # same stream + opening time, same id


def test_tracker_state_round_trips_through_the_blob():
    rules = AlertRules(k=2, m=3, quiet_points=5)
    first = run_tracker([True, True, False], rules=rules)
    first.drain()
    second = AlertTracker("s", ["cpu", "mem"], rules)
    second.load_state_dict(first.state_dict())
    assert second.open is not None and second.open.id == first.open.id
    assert second.normal.count == first.normal.count
    run_tracker([False] * 5, rules=rules, tracker=second, start=180.0)
    assert [e["type"] for e in second.drain()[1]] == ["alert.resolved"]


# --- through the API ------------------------------------------------------------------
def make_client(backend: BackendUnderTest, **overrides) -> TestClient:
    settings = Settings(**backend.settings,
                        detector_params={"*": {"warmup": 64}}, threshold_min_scores=50,
                        threshold_calibration_points=200, max_batch_points=5000,
                        alert_quiet_points=10, alert_cooldown_seconds=0,
                        webhook_poll_seconds=0.05, webhook_allow_hosts="127.0.0.1",
                        **overrides)
    return TestClient(create_app(settings, ServiceMetrics(CollectorRegistry())))


@pytest.fixture
def client(service_backend):
    with make_client(service_backend) as c:
        yield c


def spiky(n: int, spikes: list[int], channels: int = 2, start: int = 0) -> list[dict]:
    rng = np.random.default_rng(11)
    t = np.arange(start, start + n)
    values = np.stack([np.sin(t / (6 + c)) for c in range(channels)], axis=1)
    values += 0.05 * rng.standard_normal(values.shape)
    for i in spikes:
        values[i - start, 1] += 5.0  # the second channel misbehaves
    return [{"timestamp": 1_700_000_000 + 60.0 * int(ti), "values": v.tolist()}
            for ti, v in zip(t, values, strict=True)]


def test_a_stream_replayed_after_a_reset_gets_new_alert_ids(client):
    """`tsad replay --reset` deletes the stream and sends the same history again: its
    alerts are the same incidents under new ids, and the first life's alerts (resolved by
    the deletion, kept for their retention) are not overwritten."""
    def life() -> list[dict]:
        client.put("/streams/a", json={"channels": 2, "window": W,
                                       "detector": "residual_linear"})
        assert client.post("/score", json={"stream": "a",
                                           "points": spiky(400, [380])}).status_code == 200
        return client.get("/alerts", params={"stream": "a"}).json()["alerts"]

    first = {a["opened_at"]: a for a in life()}
    (born,) = {a["incarnation"] for a in first.values()}
    assert client.delete("/streams/a").status_code == 204
    second = {a["opened_at"]: a for a in life() if a["incarnation"] != born}
    assert second.keys() == first.keys() and first  # the same incidents, replayed
    for t, alert in second.items():
        assert alert["id"] != first[t]["id"]
        kept = client.get(f"/alerts/{first[t]['id']}").json()
        assert kept["incarnation"] == first[t]["incarnation"] and kept["state"] == "resolved"


def test_alerts_api_lists_filters_pages_and_explains(client):
    # residual linear flags each of three equal spikes (the default ensemble flags a spike
    # only while it is a new record: the first of them)
    client.put("/streams/a", json={"channels": 2, "channel_names": ["cpu", "disk"],
                                   "window": W, "detector": "residual_linear"})
    r = client.post("/score", json={"stream": "a", "points": spiky(600, [350, 450, 550])})
    assert r.status_code == 200
    client.post("/score", json={"stream": "b", "points": spiky(400, [380])})
    everything = client.get("/alerts").json()
    assert len(everything["alerts"]) >= 4 and everything["next_cursor"] is None
    # `?stream=` as the README's query template reads when pasted: every stream
    assert client.get("/alerts?stream=").json() == everything
    bad = client.get("/alerts", params={"stream": "no spaces"})
    assert bad.status_code == 422 and "query.stream" in bad.json()["message"]
    ours = client.get("/alerts", params={"stream": "a"}).json()["alerts"]
    opened = [a["opened_at"] for a in ours]
    assert opened == sorted(opened, reverse=True)
    spikes = [1_700_000_000 + 60.0 * i for i in (350, 450, 550)]
    covering = [[a for a in ours if a["opened_at"] <= t <= (a["resolved_at"] or t)]
                for t in spikes]
    assert all(len(c) == 1 for c in covering), covering  # each incident: one alert
    first = covering[0][0]
    assert first["severity"] == "critical" and first["peak_at"] == spikes[0]
    alert = client.get(f"/alerts/{first['id']}").json()
    assert alert["stream"] == "a" and alert["channels"][0] == "disk"
    lead = alert["evidence"]["channels"][0]
    assert lead["channel"] == "disk" and lead["share"] > 0.5
    assert set(lead["now"]) == {"variance", "trend", "autocorr"}
    assert lead["now"]["variance"] > lead["normal"]["variance"]
    assert lead["prompt"].startswith(f"From t1 to t{W}, the values were")
    # pages of one, newest first, cover the same alerts
    seen, cursor = [], None
    while True:
        page = client.get("/alerts", params={"stream": "a", "limit": 1,
                                             **({"cursor": cursor} if cursor else {})}).json()
        seen += [a["id"] for a in page["alerts"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [a["id"] for a in ours]
    window = client.get("/alerts", params={"since": opened[1], "until": opened[0]}).json()
    assert {a["opened_at"] for a in window["alerts"]} >= {opened[0], opened[1]}
    assert all(opened[1] <= a["opened_at"] <= opened[0] for a in window["alerts"])
    # the same range in RFC 3339, as /score takes timestamps (naive = UTC)
    rfc = [datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z") for t in opened]
    same = client.get("/alerts", params={"since": rfc[1], "until": rfc[0][:-1]}).json()
    assert same == window
    assert client.get("/alerts", params={"since": "yesterday"}).status_code == 422
    assert all(a["state"] == "resolved"
               for a in client.get("/alerts", params={"state": "resolved"}).json()["alerts"])
    assert client.get("/alerts/al_0000").status_code == 404
    bad = client.get("/alerts", params={"state": "nope"})
    assert bad.status_code == 422 and "query.state" in bad.json()["message"]
    metrics = client.get("/metrics").text
    assert 'tsad_alerts_opened_total{severity="critical"}' in metrics
    assert "tsad_threshold_value_count" in metrics


def test_stream_threshold_configuration(client):
    r = client.put("/streams/t", json={"channels": 1, "threshold": {"kind": "dspot",
                                                                    "q": 0.01, "depth": 20}})
    assert r.status_code == 201
    assert r.json()["threshold"] == {"kind": "dspot", "q": 0.01, "depth": 20}
    assert client.get("/streams/t").json()["threshold"]["kind"] == "dspot"
    before = client.get("/streams/t").json()
    for body, field in [
        ({"channels": 1, "threshold": {"kind": "magic"}}, "body.threshold.kind"),
        ({"channels": 1, "threshold": {"q": 0.9}}, "body.threshold.q"),
        ({"channels": 1, "threshold": {"depth": 1}}, "body.threshold.depth"),
        ({"channels": 1, "threshold": {"kind": "quantile"}, "alert_budget_per_day": 2},
         "body.alert_budget_per_day"),
        ({"channels": 1, "threshold": {"q": 0.01}, "alert_budget_per_day": 2},
         "body.alert_budget_per_day"),
        ({"channels": 1, "alert_budget_per_day": -1}, "body.alert_budget_per_day"),
    ]:
        r = client.put("/streams/t", json=body)
        assert r.status_code == 422 and field in r.json()["message"], (body, r.text)
    assert client.get("/streams/t").json() == before
    r = client.put("/streams/t", json={"channels": 1, "alert_budget_per_day": 4})
    assert r.json()["alert_budget_per_day"] == 4 and r.json()["threshold"] is None


@pytest.mark.parametrize("body,field", [
    ({"url": "ftp://example.com/x"}, "body.url"),
    ({"url": "not a url"}, "body.url"),
    ({"url": "http://127.0.0.1:9/x", "streams": "a/b"}, "body.streams"),
    ({"url": "http://127.0.0.1:9/x", "streams": "web-[01"}, "body.streams"),
    ({"url": "http://127.0.0.1:9/x", "min_severity": "info"}, "body.min_severity"),
    ({"url": "http://127.0.0.1:9/x", "secret": "short"}, "body.secret"),
    ({"url": "http://127.0.0.1:9/x", "extra": 1}, "body.extra"),
])
def test_bad_webhook_subscriptions_are_422_naming_the_field(client, body, field):
    r = client.post("/webhooks", json=body)
    assert r.status_code == 422 and field in r.json()["message"], r.text
    assert client.get("/webhooks").json() == {"webhooks": []}


def test_webhook_subscription_lifecycle(client):
    r = client.post("/webhooks", json={"url": "http://127.0.0.1:9/hook", "streams": "web-*",
                                       "min_severity": "critical"})
    assert r.status_code == 201
    created = r.json()
    assert created["secret"].startswith("whsec_") and created["id"].startswith("wh_")
    listed = client.get("/webhooks").json()["webhooks"]
    assert listed == [{k: v for k, v in created.items() if k != "secret"}]
    assert client.get(f"/webhooks/{created['id']}").json()["streams"] == "web-*"
    assert client.delete(f"/webhooks/{created['id']}").status_code == 204
    assert client.delete(f"/webhooks/{created['id']}").status_code == 404
    assert client.get("/webhooks/dead-letters").json() == {"dead_letters": []}
    assert client.post("/webhooks/dead-letters/dl_nope/replay").status_code == 404
