"""Shadow detectors (service/shadows) on both stores: a shadow scores exactly as its
detector would live, its alerts never reach a webhook, a crash leaves it in step, the
report's numbers are the hand-computed ones, promotion is one switch (no event lost or
repeated, also under a real kill -9), and a costly shadow lagging never blocks /score."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from models.lm.metrics import HIT_LEVELS
from service.app import create_app
from service.errors import StoreUnavailable
from service.metrics import ServiceMetrics
from service.process import ServiceProcess, free_port, terminate
from service.settings import Settings
from service.shadows import report as rep
from service.shadows.log import COMPARED, Columns
from service.stores.base import Commit
from tests.conftest import BackendUnderTest, wait_for
from tests.test_webhooks_integration import SECRET, Receiver

W = 16
SPOT = {"kind": "spot"}  # batching-invariant (quantile is fixed per call)
NEVER = {"kind": "fixed", "value": 1e9}  # a live detector that never pages
FAST = dict(default_window=W, detector_params={"*": {"warmup": 64}}, threshold_min_scores=50,
            threshold_calibration_points=200,
            alert_quiet_points=10, alert_cooldown_seconds=0, max_batch_points=5000,
            webhook_poll_seconds=0.05, webhook_allow_hosts="127.0.0.1")


def make_client(backend: BackendUnderTest, **overrides) -> TestClient:
    settings = Settings(**backend.settings, **{**FAST, **overrides})
    return TestClient(create_app(settings, ServiceMetrics(CollectorRegistry())),
                      raise_server_exceptions=False)


def series(n: int, spikes: list[int], start: int = 0) -> tuple[list[float], list[list[float]]]:
    """A noisy sine, one point a minute, +5 at ``spikes`` (stream indices)."""
    t = np.arange(start, start + n)
    v = np.sin(t / 6.0) + 0.05 * np.random.default_rng(start).standard_normal(n)
    for i in spikes:
        if start <= i < start + n:
            v[i - start] += 5.0
    return (1_700_000_000 + 60.0 * t).tolist(), v[:, None].tolist()


def post(c: TestClient, stream: str, ts: list[float], values: list[list[float]]) -> list[dict]:
    r = c.post("/score", json={"stream": stream, "timestamps": ts, "values": values})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def settle(c: TestClient) -> None:
    """Wait until the shadows have scored every chunk the streams completed."""
    assert c.portal.call(c.app.state.services.shadow_queue.drained, 120.0)


def batches(n: int, seed: int = 3) -> list[slice]:
    """Random batch sizes (1 to 150): how a stream is batched never changes a score."""
    rng, out, i = np.random.default_rng(seed), [], 0
    while i < n:
        k = min(int(rng.integers(1, 151)), n - i)
        out.append(slice(i, i + k))
        i += k
    return out


def alert_times(alerts: list[dict]) -> list[tuple]:
    return sorted((a["opened_at"], a["resolved_at"], round(a["peak_score"], 9)) for a in alerts)


# --- the same verdicts as live ---------------------------------------------------------
def test_a_shadow_scores_as_its_detector_would_live(service_backend):
    """Stream a runs the default detector live and residual_linear as a shadow; stream b
    runs residual_linear live. Same points, random batches: the shadow's scores,
    verdicts and alerts are b's; none of its alerts is in /alerts."""
    n = 1536  # a chunk end: the shadow has caught up with every point
    ts, values = series(n, spikes=[300, 640, 1000, 1400])
    with make_client(service_backend, metrics_streams="a") as c:
        assert c.put("/streams/a", json={"channels": 1}).status_code == 201
        shadow = {"detector": "residual_linear", "threshold": SPOT}
        assert c.put("/streams/a/shadows/rl", json=shadow).status_code == 201
        assert c.put("/streams/b", json={"channels": 1, **shadow}).status_code == 201
        live_b = []
        for b in batches(n):
            post(c, "a", ts[b], values[b])
            live_b += post(c, "b", ts[b], values[b])
        settle(c)
        got = c.get("/streams/a/shadows/rl/scores", params={"limit": 10_000}).json()
        report = c.get("/streams/a/shadows/rl/report").json()
        alerts_b = c.get("/alerts", params={"stream": "b"}).json()["alerts"]
        alerts_a = c.get("/alerts", params={"stream": "a"}).json()["alerts"]
        metrics = c.get("/metrics").text
    assert got["timestamps"] == ts and report["config"]["lag_points"] == 0
    want = [r["score"] for r in live_b]
    assert [s is None for s in got["shadow_scores"]] == [s is None for s in want]
    np.testing.assert_allclose([s for s in got["shadow_scores"] if s is not None],
                               [s for s in want if s is not None], rtol=1e-6)  # float32 log
    assert got["shadow_anomalies"] == [r["anomaly"] for r in live_b]
    assert sum(got["shadow_anomalies"]) >= 4
    assert len(alerts_b) >= 4
    assert alert_times(report["shadow"]["alerts"]) == alert_times(alerts_b)
    assert report["shadow"]["alerts_opened"] == len(alerts_b)
    shadow_ids = {a["id"] for a in report["shadow"]["alerts"]}
    assert not shadow_ids & {a["id"] for a in alerts_a + alerts_b}
    assert f'tsad_shadow_alerts_total{{shadow="rl",stream="a"}} {len(alerts_b)}.0' in metrics
    assert 'tsad_shadow_lag_points{shadow="rl",stream="a"} 0.0' in metrics


# --- never paging anyone; promotion ------------------------------------------------------
def events(receiver: Receiver, stream: str) -> list[dict]:
    return [r["body"] for r in receiver.requests() if r["body"]["alert"]["stream"] == stream]


@pytest.mark.slow
def test_shadow_alerts_never_reach_a_webhook_and_promotion_opens_one_once(
        service_backend, tmp_path):
    """The live detector of s never pages; its shadow alerts on every spike. Webhooks get
    the control stream's events and none of the shadow's. Promoted while its alert is
    open, the shadow's alert goes live and webhooks get it opened once, then resolved."""
    receiver = Receiver(tmp_path / "requests.jsonl").start()
    n = 1024
    ts, values = series(n, spikes=[300, 600, 900, 1020])  # 1020: open at the promotion
    try:
        with make_client(service_backend) as c:
            assert c.post("/webhooks", json={"url": receiver.url, "secret": SECRET}
                          ).status_code == 201
            for stream, threshold in (("s", NEVER), ("control", SPOT)):
                assert c.put(f"/streams/{stream}", json={
                    "channels": 1, "detector": "residual_linear", "threshold": threshold}
                ).status_code == 201
            assert c.put("/streams/s/shadows/cand", json={
                "detector": "residual_linear", "threshold": SPOT}).status_code == 201
            for a in range(0, n, 128):
                post(c, "s", ts[a:a + 128], values[a:a + 128])
                post(c, "control", ts[a:a + 128], values[a:a + 128])
            settle(c)
            report = c.get("/streams/s/shadows/cand/report").json()
            opened = [a for a in report["shadow"]["alerts"] if a["state"] == "open"]
            assert len(report["shadow"]["alerts"]) >= 4 and len(opened) == 1
            assert report["live"]["alerts"] == [] and report["agreement"] == 0.0
            control = c.get("/alerts", params={"stream": "control"}).json()["alerts"]
            wait_for(lambda: len(events(receiver, "control")) >= 2 * len(control) - 1)
            assert events(receiver, "s") == []  # the shadow's alerts paged nobody
            assert c.get("/alerts", params={"stream": "s"}).json()["alerts"] == []

            promoted = c.post("/streams/s/shadows/cand/promote").json()
            assert promoted["open_alert"] == opened[0]["id"]
            assert len(promoted["events"]) == 1
            assert promoted["stream"]["threshold"] == SPOT
            assert promoted["demoted"]["name"] == "previous"
            assert c.get("/streams/s/shadows/previous").json()["threshold"] == NEVER
            live = c.get(f"/alerts/{opened[0]['id']}").json()
            assert (live["state"], live["opened_at"]) == ("open", opened[0]["opened_at"])
            more_ts, more = series(64, spikes=[], start=n)
            post(c, "s", more_ts, more)  # quiet: the promoted detector resolves it
            got = wait_for(lambda: len(events(receiver, "s")) >= 2 and events(receiver, "s"))
            settle(c)  # the demoted detector went on as a shadow (caught up at the chunk end)
            assert c.get("/streams/s/shadows/previous/report").json()["config"]["points"] == 64
    finally:
        receiver.stop()
    assert sorted((e["type"], e["reason"]) for e in got) == [
        ("alert.opened", "promoted"), ("alert.resolved", "quiet")]
    assert {e["alert"]["id"] for e in got} == {opened[0]["id"]}
    assert len({e["id"] for e in got}) == 2 and promoted["events"][0] in {e["id"] for e in got}


# --- a crash between the append and the commit ----------------------------------------------
def test_a_crash_between_append_and_commit_leaves_shadows_in_step(service_backend):
    """The process fails after storing a batch, before committing its scores (the score
    transaction's crash point): the retry scores it, live and shadow together, and the
    shadow's comparison is that of a run without the crash."""
    n = 640
    ts, values = series(n, spikes=[200, 450])
    with make_client(service_backend) as c:
        for stream in ("ref", "crash"):
            assert c.put(f"/streams/{stream}", json={"channels": 1}).status_code == 201
            assert c.put(f"/streams/{stream}/shadows/rl", json={
                "detector": "residual_linear", "threshold": SPOT}).status_code == 201
        transaction = c.app.state.services.score
        crashes = iter([True])

        def crash_once(appended) -> None:  # noqa: ANN001
            if appended.meta.stream == "crash" and appended.meta.points_seen == 300 and next(
                    crashes, False):
                raise RuntimeError("the process dies here")

        transaction.after_append = crash_once
        for a in range(0, n, 100):
            for stream in ("ref", "crash"):
                b = slice(a, min(a + 100, n))
                r = c.post("/score", json={"stream": stream, "timestamps": ts[b],
                                           "values": values[b]})
                if r.status_code == 500:  # stored, never scored: the retry scores it
                    r = c.post("/score", json={"stream": stream, "timestamps": ts[b],
                                               "values": values[b]})
                    assert {p["status"] for p in r.json()["results"]} == {"scored"}
                assert r.status_code == 200, r.text
        assert next(crashes, False) is False  # it did crash
        settle(c)
        ref, crashed = (c.get(f"/streams/{s}/shadows/rl/scores", params={"limit": 10_000}
                              ).json() for s in ("ref", "crash"))
    assert crashed | {"stream": "ref"} == ref
    assert sum(ref["shadow_anomalies"]) >= 2


# --- the report ------------------------------------------------------------------------------
def test_report_numbers_on_a_hand_made_log():
    """Ten points; live flags 2, 3, 7; the shadow 3, 4; labelled anomaly [2, 4], normal
    [6, 8]. By hand: live TP 2 (2, 3), FP 1 (7), FN 1 (4): precision = recall = 2/3; the
    shadow TP 2, FP 0, FN 1 (2): precision 1, recall 2/3. The incident [2, 4] (3 rows):
    live detects at its first row (reward 1), the shadow one row in."""
    ts = np.arange(10.0)
    flags = {"live": [2, 3, 7], "shadow": [3, 4]}
    cols = {f"{s}_anomaly": np.isin(np.arange(10), f) for s, f in flags.items()}
    log = Columns.of(COMPARED, ts=ts, live_score=ts, shadow_score=ts, live_scored=np.ones(10),
                     shadow_scored=np.ones(10), live_alerted=np.zeros(10),
                     shadow_alerted=np.zeros(10), **cols)
    ranges = np.array([[0, 2, 4, 3, 0], [1, 6, 8, 2, 0]])  # label codes: anomaly, normal
    live, shadow = (rep.side_scores(log, ranges, s) for s in ("live", "shadow"))
    assert (live["true_positives"], live["false_positives"], live["false_negatives"]) == (
        2, 1, 1)
    assert live["precision"] == live["recall"] == round(2 / 3, 6)
    assert (shadow["precision"], shadow["recall"]) == (1.0, round(2 / 3, 6))
    incidents, nab = rep.incidents(log, ranges, {"live": [], "shadow": []})

    def reward(row: int, first: int = 2, last: int = 4) -> float:  # NAB's scaled sigmoid
        sig = lambda x: 2 / (1 + math.exp(5 * x)) - 1  # noqa: E731
        return sig(-(last - row + 1) / (last - first + 1)) / sig(-1)

    (one,) = incidents
    assert one["live"]["time_to_detect_seconds"] == 0.0 and one["live"]["nab_reward"] == 1.0
    assert one["shadow"]["time_to_detect_seconds"] == 1.0
    assert one["shadow"]["nab_reward"] == round(reward(3), 6)
    # NAB-style: the reward, 0.11 off per flagged normal point, 0 = never fires, 100 perfect
    assert nab["live"] == round(100 * (1.0 - 0.11 + 1) / 2, 3)
    assert nab["shadow"] == round(100 * (reward(3) + 1) / 2, 3)


def test_report_precision_and_recall_match_a_hand_count(service_backend):
    """The report over the service's own points and the operator's labels, counted again
    point by point from the per-point comparison (GET .../scores)."""
    n = 1280
    ts, values = series(n, spikes=[500, 501, 502, 900, 1100])
    with make_client(service_backend) as c:
        assert c.put("/streams/s", json={"channels": 1, "detector": "residual_linear",
                                          "threshold": SPOT}).status_code == 201
        assert c.put("/streams/s/shadows/rl", json={
            "detector": "residual_linear", "threshold": SPOT,
            "params": {"warmup": 128}}).status_code == 201
        for a in range(0, n, 256):
            post(c, "s", ts[a:a + 256], values[a:a + 256])
        labels = [(495, 510, "anomaly"), (895, 905, "missed_anomaly"), (1000, 1050, "normal"),
                  (1095, 1105, "false_positive")]
        r = c.post("/streams/s/feedback", json={"ranges": [
            {"start": ts[a], "end": ts[b], "label": label} for a, b, label in labels]})
        assert r.status_code == 200, r.text
        settle(c)
        report = c.get("/streams/s/shadows/rl/report").json()
        got = c.get("/streams/s/shadows/rl/scores", params={"limit": 10_000}).json()
    target = {}
    for a, b, label in labels:
        for i in range(a, b + 1):
            target[ts[i]] = int(label in ("anomaly", "missed_anomaly"))
    assert report["labelled_ranges"] == 4 and len(report["incidents"]) == 2
    for side in ("live", "shadow"):
        tp = fp = fn = 0
        for k, t in enumerate(got["timestamps"]):
            if t not in target or None in (got["live_scores"][k], got["shadow_scores"][k]):
                continue
            flagged = got[f"{side}_anomalies"][k]
            tp += flagged and target[t] == 1
            fp += flagged and target[t] == 0
            fn += (not flagged) and target[t] == 1
        mine = report[side]
        assert (mine["true_positives"], mine["false_positives"], mine["false_negatives"]) == (
            tp, fp, fn), side
        assert mine["precision"] == (round(tp / (tp + fp), 6) if tp + fp else None)
        assert mine["recall"] == round(tp / (tp + fn), 6)
        assert tp >= 2  # the spikes were flagged
        first = report["incidents"][0][side]  # the first flagged point of [495, 510]
        hits = [t for t, f in zip(got["timestamps"], got[f"{side}_anomalies"], strict=True)
                if f and ts[495] <= t <= ts[510]]
        assert first["detected_at"] == hits[0]
        assert first["time_to_detect_seconds"] == hits[0] - ts[495]


# --- costly shadows ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_lagging_costly_shadow_never_blocks_score(service_backend):
    """An embedding-memory shadow (the language model per window) runs on the background
    queue: while it lags, /score keeps answering and storing; then it catches up, and
    its scores are those of the same detector run live on the same points."""
    n = 1024
    ts, values = series(n, spikes=[700, 900])
    memory = {"detector": "embedding_memory", "threshold": SPOT}
    with make_client(service_backend, shadows_allow_costly=True) as c:
        assert c.put("/streams/a", json={"channels": 1}).status_code == 201
        shadow = c.put("/streams/a/shadows/mem", json=memory).json()
        assert shadow["costly"]
        post(c, "a", ts[:768], values[:768])  # hundreds of windows for the language model
        lagging = []
        for i in range(768, n):  # meanwhile, one point at a time
            post(c, "a", ts[i:i + 1], values[i:i + 1])
            lagging.append(c.get("/streams/a/shadows/mem").json()["lag_points"])
        assert max(lagging) > 64  # it lagged more than a chunk behind, /score went on
        settle(c)
        got = c.get("/streams/a/shadows/mem/scores", params={"limit": 10_000}).json()
        assert c.get("/streams/a/shadows/mem").json()["lag_points"] == 0
        # the child's language-model metrics, relayed: the live detector embeds nothing
        registry = c.app.state.metrics.registry
        embedded = sum(registry.get_sample_value("tsad_embedding_cache_hits_total",
                                                 {"level": level}) for level in HIT_LEVELS)
        embedded += registry.get_sample_value("tsad_embedding_cache_misses_total")
        assert embedded > 0
        assert registry.get_sample_value("tsad_shadow_embedding_lru_entries") > 0
        assert c.put("/streams/b", json={"channels": 1, **memory}).status_code == 201
        live = [r for a in range(0, n, 128) for r in post(c, "b", ts[a:a + 128],
                                                           values[a:a + 128])]
    assert got["timestamps"] == ts
    want = [r["score"] for r in live]
    assert [s is None for s in got["shadow_scores"]] == [s is None for s in want]
    np.testing.assert_allclose([s for s in got["shadow_scores"] if s is not None],
                               [s for s in want if s is not None], rtol=1e-5)
    assert got["shadow_anomalies"] == [r["anomaly"] for r in live]


# --- promotion under kill -9 --------------------------------------------------------------
PROCESS_ENV = {"TSAD_DEFAULT_WINDOW": str(W), "TSAD_DETECTOR_PARAMS": '{"*": {"warmup": 64}}',
               "TSAD_THRESHOLD_MIN_SCORES": "50", "TSAD_ALERT_QUIET_POINTS": "10",
               "TSAD_ALERT_COOLDOWN_SECONDS": "0", "TSAD_WEBHOOK_POLL_SECONDS": "0.05",
               "TSAD_WEBHOOK_ALLOW_HOSTS": "127.0.0.1", "TSAD_WEBHOOK_LEASE_SECONDS": "6"}


def promotion_run(redis_url: str, prefix: str, receiver: Receiver, kill: str) -> list[tuple]:
    """Stream s (live: never pages; shadow: pages on spikes) until the shadow has an
    alert open, a promotion (the process SIGKILLs itself at ``kill``, then restarts and
    the client does what a client would: promote again if it had not happened), then
    quiet points. Returns the events received for s, as (type, reason, opened_at,
    version), each event id counted once (delivery is at least once)."""
    env = {**PROCESS_ENV, "REDIS_URL": redis_url, "TSAD_REDIS_PREFIX": prefix}
    n = 1024
    ts, values = series(n, spikes=[300, 600, 1020])
    with ServiceProcess({**env, "TSAD_FAULT_KILL_IN_PROMOTION": kill}) as svc:
        url = svc.url
        assert httpx.post(f"{url}/webhooks", json={"url": receiver.url, "secret": SECRET}
                          ).status_code == 201
        assert httpx.put(f"{url}/streams/s", json={
            "channels": 1, "detector": "residual_linear", "threshold": NEVER}).status_code == 201
        assert httpx.put(f"{url}/streams/s/shadows/cand", json={
            "detector": "residual_linear", "threshold": SPOT}).status_code == 201
        for a in range(0, n, 256):
            r = httpx.post(f"{url}/score", json={"stream": "s", "timestamps": ts[a:a + 256],
                                                 "values": values[a:a + 256]}, timeout=60)
            assert r.status_code == 200, r.text
        try:
            promoted = httpx.post(f"{url}/streams/s/shadows/cand/promote", timeout=60)
            assert not kill and promoted.status_code == 200, promoted.text
        except httpx.TransportError:  # killed: no answer
            assert kill and svc.proc is not None
            assert svc.proc.wait(timeout=10) == -signal.SIGKILL
    with ServiceProcess(env) as svc:
        url = svc.url
        detector_threshold = httpx.get(f"{url}/streams/s").json()["threshold"]
        switched = detector_threshold == SPOT
        assert switched == (kill != "before-commit")  # all of it, or nothing
        if not switched:
            r = httpx.post(f"{url}/streams/s/shadows/cand/promote", timeout=60)
            assert r.status_code == 200, r.text
        more_ts, more = series(40, spikes=[], start=n)
        assert httpx.post(f"{url}/score", json={"stream": "s", "timestamps": more_ts,
                                                "values": more}).status_code == 200

        def received() -> list[dict]:
            got = {e["id"]: e for e in events(receiver, "s")}
            return list(got.values()) if len(got) >= 2 else []

        got = wait_for(received, timeout=30)
        time.sleep(0.5)  # would another event follow?
        got = received()
    return sorted((e["type"], e["reason"], e["alert"]["opened_at"], e["alert"]["version"])
                  for e in got)


@pytest.mark.slow
def test_promotion_is_atomic_under_kill_9(redis_url, tmp_path):
    """The service is SIGKILLed just before, then just after the promotion's commit; after
    a restart the stream is switched either wholly or not at all, and webhooks get the
    same events as a run without the kill: the promoted alert opened once, resolved once.
    (The in-process store loses everything with its process, by design: its promotion is
    one write with no await between, tested in the test below.)"""
    runs = {}
    for kill in ("", "before-commit", "after-commit"):
        receiver = Receiver(tmp_path / f"requests-{kill or 'none'}.jsonl").start()
        try:
            runs[kill] = promotion_run(redis_url, f"kill-{kill or 'none'}", receiver, kill)
        finally:
            receiver.stop()
    assert [e[:2] for e in runs[""]] == [("alert.opened", "promoted"), ("alert.resolved", "quiet")]
    assert runs["before-commit"] == runs[""] and runs["after-commit"] == runs[""]


# --- the API's refusals, limits and atomicity ---------------------------------------------------
def sections(c: TestClient, stream: str) -> dict[str, bytes]:
    return c.portal.call(c.app.state.services.backend.streams.sections, stream)


def test_refusals_name_the_field_and_change_nothing(service_backend):
    with make_client(service_backend, shadows_max_per_stream=2, metrics_streams="other") as c:
        assert c.put("/streams/s", json={"channels": 1}).status_code == 201
        ts, values = series(200, spikes=[150])
        post(c, "s", ts, values)
        ok = {"detector": "residual_linear"}
        assert c.put("/streams/s/shadows/one", json=ok).status_code == 201
        before = sections(c, "s")
        for body, status, field in (
                ({"detector": "nope"}, 422, "body.detector"),
                ({"detector": "embedding_memory"}, 422, "TSAD_SHADOWS_ALLOW_COSTLY"),
                ({"detector": "pca"}, 422, "body.detector"),  # fitted offline only
                ({"detector": "residual_linear", "params": {"nope": 1}}, 422, "body.params"),
                ({"detector": "residual_linear", "params": {"window": 8}}, 422,
                 "body.params.window"),
                ({"detector": "residual_linear", "threshold": {"kind": "fixed"}}, 422,
                 "body.threshold.value"),
                ({"detector": "artifact:nope"}, 422, "body.detector"),
                ({"detector": "residual_linear", "extra": 1}, 422, "body.extra")):
            r = c.put("/streams/s/shadows/two", json=body)
            assert r.status_code == status and field in r.json()["message"], (body, r.text)
        assert c.put("/streams/s/shadows/bad.name", json=ok).status_code == 422
        assert c.put("/streams/nope/shadows/x", json=ok).status_code == 404
        for path in ("/streams/s/shadows/two", "/streams/s/shadows/two/report",
                     "/streams/nope/shadows", "/streams/s/shadows/two/scores"):
            assert c.get(path).status_code == 404, path
        assert c.delete("/streams/s/shadows/two").status_code == 404
        assert c.post("/streams/s/shadows/two/promote").status_code == 404
        assert sections(c, "s") == before
        # the same spec again changes nothing; the cap counts the others
        assert c.put("/streams/s/shadows/one", json=ok).status_code == 200
        assert c.put("/streams/s/shadows/two", json={"detector": "ensemble"}).status_code == 201
        r = c.put("/streams/s/shadows/three", json=ok)
        assert r.status_code == 429 and "TSAD_SHADOWS_MAX_PER_STREAM" in r.json()["message"]
        r = c.post("/streams/s/shadows/one/promote", json={"demote_as": "two"})
        assert r.status_code == 409 and "body.demote_as" in r.json()["message"]
        # a store failing mid-promotion: nothing switched
        before = sections(c, "s")
        backend = c.app.state.services.backend
        commit, backend.commit = backend.commit, _failing
        try:
            assert c.post("/streams/s/shadows/one/promote").status_code == 503
        finally:
            backend.commit = commit
        assert sections(c, "s") == before
        assert c.get("/streams/s").json()["detector"] == "ensemble"
        assert c.post("/streams/s/shadows/one/promote", json={"demote_as": None}
                      ).json()["demoted"] is None
        assert c.get("/streams/s").json()["detector"] == "residual_linear"
        assert [x["name"] for x in c.get("/streams/s/shadows").json()["shadows"]] == ["two"]
        assert c.delete("/streams/s/shadows/two").status_code == 204
        assert c.get("/streams/s/shadows").json()["shadows"] == []
        assert not any(k.startswith("shadow.") for k in sections(c, "s"))
        assert "tsad_shadow_alerts_total{" not in c.get("/metrics").text  # not allow-listed


async def _failing(commit) -> int:  # noqa: ANN001
    raise StoreUnavailable("store down (fault injection)")


def test_stream_params_bind_the_detector_and_a_change_restarts_it(service_backend):
    with make_client(service_backend) as c:
        r = c.put("/streams/p", json={"channels": 1, "detector": "residual_linear",
                                      "params": {"warmup": 32}})
        assert r.status_code == 201 and r.json()["params"] == {"warmup": 32}
        ts, values = series(200, spikes=[])
        first = post(c, "p", ts, values)
        assert next(i for i, x in enumerate(first) if x["status"] == "scored") < 100
        assert sections(c, "p")
        r = c.put("/streams/p", json={"channels": 1, "detector": "residual_linear",
                                      "params": {"warmup": 64}})
        assert r.status_code == 200 and sections(c, "p") == {}  # restarted
        r = c.put("/streams/p", json={"channels": 1, "params": {"bogus": 1}})
        assert r.status_code == 422 and "body.params" in r.json()["message"]


def test_shadow_sections_are_prefixed_and_gone_with_the_stream(service_backend):
    with make_client(service_backend) as c:
        assert c.put("/streams/s", json={"channels": 1}).status_code == 201
        assert c.put("/streams/s/shadows/rl", json={"detector": "residual_linear"}
                     ).status_code == 201
        ts, values = series(130, spikes=[])
        post(c, "s", ts, values)
        names = set(sections(c, "s"))
        assert {"shadows", "shadow.rl.cfg", "shadow.rl.run", "shadow.rl.det"} <= names
        assert c.delete("/streams/s").status_code == 204
        assert c.get("/streams/s/shadows").status_code == 404



# --- the store: a detector binding switched with the state, atomically -------------------------
async def test_a_commit_switches_the_binding_with_the_state(backend):
    """Commit.binding (a promotion) on every backend, the cluster included: the detector,
    its params, threshold and budget change with the sections, in one commit, keeping
    the state (unlike PUT /streams, which drops it); a deleted stream is not recreated."""
    from service.stores.base import Commit, StreamMeta

    store = backend.build()
    try:
        await store.streams.put(StreamMeta("s", 1, 16, "ensemble", params={"warmup": 64}))
        await store.commit(Commit("s", sections={"det": b"old", "fb": b"labels"}))
        binding = {"detector": "residual_linear", "params": None,
                   "threshold": {"kind": "spot"}, "alert_budget_per_day": 2.0}
        version = await store.commit(Commit("s", sections={"det": b"new"}, drop=("x",),
                                            binding=binding))
        meta = await store.streams.get("s")
        assert version == meta.version
        assert {k: getattr(meta, k) for k in binding} == binding
        assert await store.streams.sections("s") == {"det": b"new", "fb": b"labels"}
        await store.streams.put(meta)  # the same binding again: the state stays
        assert await store.streams.sections("s") == {"det": b"new", "fb": b"labels"}
        await store.streams.delete("s")
        assert await store.commit(Commit("s", sections={"det": b"x"}, binding=binding)) == 0
        assert await store.streams.get("s") is None
    finally:
        await store.close()


# --- the other ingest doors; store faults; shutdown -----------------------------------------
def test_points_from_remote_write_reach_the_shadows(service_backend):
    """Remote-write goes through the /score transaction: a stream's shadow sees its points
    as it sees /score's (the transaction offers each committed batch)."""
    from tests.test_ingest import CPU, CPU_ID, body, sine

    with make_client(service_backend) as c:
        assert c.post("/api/v1/write", content=body((CPU, sine(128)))).status_code == 204
        assert c.put(f"/streams/{CPU_ID}/shadows/rl", json={"detector": "residual_linear"}
                     ).status_code == 201
        for a in range(128, 384, 64):
            assert c.post("/api/v1/write", content=body((CPU, sine(64, a)))
                          ).status_code == 204
        settle(c)
        got = c.get(f"/streams/{CPU_ID}/shadows/rl/scores", params={"limit": 1000}).json()
        shadow = c.get(f"/streams/{CPU_ID}/shadows/rl").json()
    assert len(got["timestamps"]) == 256 and shadow["lag_points"] == 0
    assert all(s is not None for s in got["shadow_scores"])  # warmed up on the first 128


def test_a_cheap_shadow_catches_up_every_catch_up_points_or_seconds(service_backend):
    """At batch 100 every request completes a chunk; a cheap shadow still catches up (and
    commits under the stream's lock) only once TSAD_SHADOW_CATCH_UP_POINTS of its points
    wait, or once its oldest has waited TSAD_SHADOW_CATCH_UP_SECONDS, with no one asking."""
    ts, values = series(400, spikes=[])

    def run(stream: str, points: int, seconds: float,
            check: Callable[[TestClient, list], None]) -> None:
        with make_client(service_backend, shadow_catch_up_points=points,
                         shadow_catch_up_seconds=seconds) as c:
            assert c.put(f"/streams/{stream}", json={"channels": 1}).status_code == 201
            assert c.put(f"/streams/{stream}/shadows/rl", json={"detector": "residual_linear"}
                         ).status_code == 201
            backend = c.app.state.services.backend
            real, commits = backend.commit, []

            async def commit(change: Commit) -> int:
                if change.scored is None:  # a shadow's own
                    commits.append(change)
                return await real(change)

            backend.commit = commit
            try:
                check(c, commits)
            finally:
                backend.commit = real

    def lag(c: TestClient, stream: str) -> int:
        return c.get(f"/streams/{stream}/shadows/rl").json()["lag_points"]

    def by_points(c: TestClient, commits: list) -> None:
        post(c, "p", ts[:200], values[:200])  # three chunk ends, 200 points waiting
        time.sleep(0.5)
        assert (len(commits), lag(c, "p")) == (0, 200)
        post(c, "p", ts[200:300], values[200:300])  # 300 waiting: due
        wait_for(lambda: lag(c, "p") == 0, timeout=30)
        assert len(commits) == 1
        post(c, "p", ts[300:400], values[300:400])
        time.sleep(0.5)
        assert (len(commits), lag(c, "p")) == (1, 100)
        settle(c)  # a promotion's, a test's: every ready job at once
        assert (len(commits), lag(c, "p")) == (2, 0)

    def by_seconds(c: TestClient, commits: list) -> None:
        post(c, "t", ts[:100], values[:100])  # a chunk end, 100 points waiting
        wait_for(lambda: lag(c, "t") == 0, timeout=30)  # due once the oldest waited 0.3 s
        assert len(commits) == 1

    run("p", 256, 3600.0, by_points)
    run("t", 100_000, 0.3, by_seconds)


def test_a_shadow_job_the_store_fails_is_put_back_and_skips_nothing(service_backend):
    """A shadow's commit refused by the store (a busy lock, Redis away) is transient: the
    job goes back on the queue and its points are scored by the next try, not counted as
    skipped."""
    ts, values = series(384, spikes=[])
    with make_client(service_backend) as c:
        assert c.put("/streams/s", json={"channels": 1}).status_code == 201
        assert c.put("/streams/s/shadows/rl", json={"detector": "residual_linear"}
                     ).status_code == 201
        backend = c.app.state.services.backend
        commit, failed = backend.commit, []

        async def fail_shadows_once(done) -> int:  # noqa: ANN001
            if done.scored is None and not failed:  # a shadow's own sections
                failed.append(done)
                raise StoreUnavailable("stream 's' is busy (lock wait timed out)")
            return await commit(done)

        backend.commit = fail_shadows_once
        try:
            for a in range(0, 384, 64):
                post(c, "s", ts[a:a + 64], values[a:a + 64])
            settle(c)
        finally:
            backend.commit = commit
        got = c.get("/streams/s/shadows/rl/scores", params={"limit": 1000}).json()
        metrics = c.get("/metrics").text
    assert failed and got["timestamps"] == ts
    assert "tsad_shadow_points_skipped_total 0.0" in metrics


@pytest.mark.slow
def test_tsad_serve_stops_on_sigterm_while_a_costly_shadow_job_runs(tmp_path):
    """SIGTERM while the language model embeds hundreds of a shadow's windows: `tsad
    serve` (which exits 0 on it, unlike bare uvicorn) ends at once, its shadow worker
    process killed, not waited for (was: the job's end, tens of seconds); on Redis the
    shadow resumes from its committed mark (the test below)."""
    log = tmp_path / "service.log"
    with _serve({**PROCESS_ENV, "TSAD_SHADOWS_ALLOW_COSTLY": "true"}, log) as (proc, url):
        ts, values = series(1536, spikes=[])
        assert httpx.put(f"{url}/streams/a", json={"channels": 1}).status_code == 201
        assert httpx.put(f"{url}/streams/a/shadows/mem", json={
            "detector": "embedding_memory"}, timeout=120).status_code == 201
        r = httpx.post(f"{url}/score", json={"stream": "a", "timestamps": ts,
                                             "values": values}, timeout=60)
        assert r.status_code == 200, r.text
        time.sleep(1.0)  # the job has started: it embeds about 1,500 windows
        assert httpx.get(f"{url}/streams/a/shadows/mem").json()["lag_points"] == 1536
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        took = time.monotonic() - start
    text = log.read_text()
    assert code == 0 and "shutdown complete" in text, text[-3000:]
    assert took < 5.0, f"{took:.1f} s\n{text[-3000:]}"


@pytest.mark.slow
def test_a_costly_shadow_stopped_by_sigterm_resumes_from_its_mark_on_redis(redis_url, tmp_path):
    """On Redis the shadow outlives the process: SIGTERM while its job embeds about 1,500
    windows ends `tsad serve` at once, nothing of that job committed; a new process over
    the same Redis finds the shadow at its committed mark (the first chunk), and its next
    chunk end resumes it from there with what the store still holds (the rest skipped,
    counted)."""
    env = {**PROCESS_ENV, "TSAD_SHADOWS_ALLOW_COSTLY": "true", "REDIS_URL": redis_url,
           "TSAD_REDIS_PREFIX": "resume"}
    ts, values = series(1600, spikes=[1550])
    held = 1600 - 64 - (W + 63 - 1)  # the first point the store holds for the last chunk
    memory = {"detector": "embedding_memory", "threshold": SPOT}

    def shadow(url: str) -> dict:
        return httpx.get(f"{url}/streams/a/shadows/mem", timeout=30).json()

    def score(url: str, a: int, b: int) -> None:
        r = httpx.post(f"{url}/score", json={"stream": "a", "timestamps": ts[a:b],
                                             "values": values[a:b]}, timeout=60)
        assert r.status_code == 200, r.text

    with _serve(env, tmp_path / "first.log") as (proc, url):
        assert httpx.put(f"{url}/streams/a", json={"channels": 1}).status_code == 201
        assert httpx.put(f"{url}/streams/a/shadows/mem", json=memory,
                         timeout=120).status_code == 201
        score(url, 0, 64)
        wait_for(lambda: shadow(url)["lag_points"] == 0, timeout=120)  # mark 64 committed
        score(url, 64, 1536)
        time.sleep(1.0)  # its job has started: about 1,500 windows for the language model
        assert shadow(url)["lag_points"] == 1472
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - start < 5.0
    with _serve(env, tmp_path / "second.log") as (proc, url):
        resumed = shadow(url)
        assert (resumed["points"], resumed["lag_points"]) == (64, 1472)  # its mark
        score(url, 1536, 1600)
        wait_for(lambda: shadow(url)["lag_points"] == 0, timeout=180)
        done = shadow(url)
        got = httpx.get(f"{url}/streams/a/shadows/mem/scores", params={"limit": 10_000}
                        ).json()
    assert (done["points"], done["skipped_points"]) == (64 + 1600 - held, held - 64)
    assert got["timestamps"] == ts[:64] + ts[held:]  # none twice; the rest skipped


@contextlib.contextmanager
def _serve(env: dict, log_path) -> Iterator[tuple[subprocess.Popen, str]]:  # noqa: ANN001
    """`tsad serve` on a free port with ``env``: (the process, its URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **env})
    try:
        wait_for(lambda: _healthy(url), timeout=60)
        yield proc, url
    finally:
        terminate(proc)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
