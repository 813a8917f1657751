"""Embedding memory: memory bounds, the online update rule, distances, and serving a stream
with no artifact (memory in Redis, surviving a restart). Real MiniLM, real Redis."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from models.detectors import build_detector
from models.detectors.base import sliding_windows
from models.detectors.raw_knn import RawKnn
from service.app import create_app
from service.metrics import ServiceMetrics
from service.settings import Settings


def series(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float64)
    return (np.sin(t / 4.0) + 0.05 * rng.standard_normal(n))[:, None]


@pytest.mark.parametrize("name", ["embedding_memory", "raw_knn"])
def test_identical_windows_are_at_distance_zero(name):
    s = series(400)
    det = build_detector(name, window=32, stride=8).fit(s)
    memorised = sliding_windows(s, 32, 8)[:5]  # windows the memory holds verbatim
    same = det.score(memorised)
    np.testing.assert_allclose(same, 0.0, atol=5e-4)  # float16 memory: not exactly 0
    other = memorised.copy()
    other[:, ::3, 0] *= -1.0
    # MiniLM embeddings of number-list prompts sit close together (cosine ~0.99), so
    # "different" is small in absolute terms but far above the float16 floor
    assert (det.score(other) > max(2e-3, 4 * same.max())).all()


@pytest.mark.parametrize("policy", ["reservoir", "recency"])
def test_memory_stays_bounded_and_follows_its_policy(policy):
    det = RawKnn(window=8, stride=1, memory_size=20, policy=policy, admit_quantile=None)
    windows = sliding_windows(series(600), 8)
    for lo in range(0, len(windows), 50):
        det.partial_fit(windows[lo:lo + 50])
    assert det.memory_entries == 20
    assert det.memory_bytes == 20 * 8 * 2  # channels x entries x dims, float16
    state = det.state_dict()
    assert state["kept"][0] == len(windows)  # every window was a candidate (stride 1)
    latest = RawKnn(window=8, stride=1).fit(series(600)[-8:])._features(windows[-1:])[0]
    latest = latest / np.linalg.norm(latest, axis=-1, keepdims=True)
    held = state["memory"][0].astype(np.float32)
    hit = np.isclose(held @ latest[0], 1.0, atol=1e-3).any()
    # recency keeps the newest windows; the reservoir keeps a uniform sample of all
    assert hit if policy == "recency" else not np.allclose(held[-1], held[0])


def test_online_memory_only_takes_every_stride_th_window():
    det = RawKnn(window=8, stride=4, memory_size=100, min_memory=3)
    windows = sliding_windows(series(100), 8)
    det.partial_fit(windows[:6])  # candidates: offered #0 and #4
    assert det.memory_entries == 2 and not det.is_fitted
    det.partial_fit(windows[6:10])  # offered #6..#9: #8 is a candidate
    assert det.memory_entries == 3 and det.is_fitted


def test_service_scores_a_stream_with_no_artifact_and_keeps_memory_in_redis(redis_url):
    settings = Settings(redis_url=redis_url, detector_params={"*": {"memory_size": 64}},
                        costly_score_stride=4)

    def client() -> TestClient:
        return TestClient(create_app(settings, ServiceMetrics(CollectorRegistry())))

    values = series(700)[:, 0]
    points = [{"timestamp": float(t), "values": [float(v)]} for t, v in enumerate(values)]
    with client() as c:
        r = c.put("/streams/lm", json={"channels": 1, "window": 32,
                                       "detector": "embedding_memory"})
        assert r.status_code == 201
        results = c.post("/score", json={"stream": "lm", "points": points[:600]}).json()
        statuses = [p["status"] for p in results["results"]]
        # memory fills with every 16th window (16 entries at least) before the first score;
        # the detector learns per chunk of 64 points and scores every 4th point
        first = statuses.index("scored")
        assert 31 + 15 * 16 <= first <= 31 + 16 * 16 + 64 + 4, first
        scores = [p["score"] for p in results["results"][first:]]
        assert all(s is not None and s >= 0 for s in scores)
        # strided: points between fresh scores repeat the last verdict
        assert scores[1] == scores[0] or scores[2] == scores[1]
        metrics = c.get("/metrics").text
        assert 'tsad_stream_state_bytes_count{detector="embedding_memory"}' in metrics
        assert "tsad_embedding_cache_misses_total" in metrics
    with client() as c:  # a new process-equivalent: the memory comes back from Redis
        r = c.post("/score", json={"stream": "lm", "points": points[600:]})
        assert r.status_code == 200
        assert all(p["status"] == "scored" for p in r.json()["results"])


def test_prompts_are_what_the_memory_embeds():
    det = build_detector("embedding_memory", window=8)
    w = np.arange(16.0).reshape(1, 8, 2)
    prompts = det.prompts(w)
    assert len(prompts) == 2 and all(p.startswith("From t1 to t8") for p in prompts)
    assert "variance" in prompts[0] and math.isfinite(len(prompts[1]))


def test_precomputed_features_and_leave_one_out_calibration():
    """fit_features/score_features give what fit/score give, and the leave-one-out
    calibration never counts an entry as its own neighbour."""
    s = series(400)
    windows = sliding_windows(s, 16, 4)
    det = RawKnn(window=16, stride=4).fit(s)
    pre = RawKnn(window=16, stride=4).fit_features(det._features(windows))
    probe = sliding_windows(series(200, seed=1), 16)
    np.testing.assert_allclose(pre.score_features(det._features(probe)).ravel(),
                               det.score(probe), atol=1e-6)
    loo = det.calibration_scores()
    assert loo.shape == (len(windows), 1) and (loo > 0).all()  # no self-match at 0
    doubled = RawKnn(window=16, stride=4).fit_features(
        np.concatenate([det._features(windows[:5])] * 2))
    np.testing.assert_allclose(doubled.calibration_scores(), 0.0, atol=1e-3)  # twin = 0


def test_precedents_name_the_nearest_normal_windows_and_survive_state_round_trips():
    s = series(200)
    det = RawKnn(window=16, stride=4, memory_size=64).fit(s)
    windows = sliding_windows(s, 16, 4)
    dist, stamps = det.precedents(windows[[3, 10]], n=2)
    assert dist.shape == (2, 1, 2) and stamps.shape == (2, 1, 2, 2)
    # a memorised window's nearest precedent is itself: training positions, distance 0
    assert stamps[0, 0, 0].tolist() == [12.0, 27.0] and stamps[1, 0, 0].tolist() == [40.0, 55.0]
    np.testing.assert_allclose(dist[:, 0, 0], 0.0, atol=5e-4)
    assert (dist[:, 0, 1] >= dist[:, 0, 0]).all()  # nearest first
    # online: entries remember the timestamps they were offered with
    online = RawKnn(window=16, stride=1, memory_size=8, policy="recency")
    ts = 1_700_000_000 + 60.0 * np.arange(len(windows))
    online.partial_fit(windows, np.stack([ts, ts + 15 * 60.0], axis=1))
    restored = RawKnn(window=16, stride=1, memory_size=8, policy="recency")
    restored.load_state_dict(online.state_dict())
    _, st = restored.precedents(windows[-1:], n=1)
    assert st[0, 0, 0].tolist() == [ts[-1], ts[-1] + 900.0]  # recency keeps the newest


def test_anomalous_points_and_their_alerts_carry_nearest_normal_precedents():
    settings = Settings(detector_params={"*": {"warmup": 64, "memory_size": 128}},
                        costly_score_stride=1,
                        threshold_min_scores=50, threshold_calibration_points=200,
                        max_batch_points=5000, alert_quiet_points=10)
    values = series(900)[:, 0]
    values[700:716] += np.linspace(0, 4, 16)  # a ramp no normal window resembles
    t0 = 1_700_000_000
    points = [{"timestamp": t0 + 60.0 * i, "values": [float(v)]} for i, v in enumerate(values)]
    with TestClient(create_app(settings, ServiceMetrics(CollectorRegistry()))) as c:
        c.put("/streams/p", json={"channels": 1, "channel_names": ["temp"], "window": 32,
                                  "detector": "raw_knn"})
        results = c.post("/score", json={"stream": "p", "points": points}).json()["results"]
        flagged = [(i, r) for i, r in enumerate(results) if r["anomaly"] and 700 <= i < 760]
        assert flagged, "the ramp was not flagged"
        i, hit = flagged[0]
        prec = hit["precedents"]
        assert 1 <= len(prec) <= settings.precedents and prec[0]["channel"] == "temp"
        assert [p["distance"] for p in prec] == sorted(p["distance"] for p in prec)
        for p in prec:  # real windows of this stream, 32 points long, before the point
            assert p["end"] - p["start"] == 31 * 60.0 and p["end"] < t0 + 60.0 * i
            assert (p["start"] - t0) % 60.0 == 0 and p["distance"] > 0
        assert all(r["precedents"] is None for r in results if not r["anomaly"])
        alerts = c.get("/alerts", params={"stream": "p"}).json()["alerts"]
        covering = [a for a in alerts if a["opened_at"] <= t0 + 60.0 * 716]
        assert covering and covering[-1]["evidence"]["precedents"][0]["channel"] == "temp"


def test_online_admission_keeps_windows_unlike_the_memory_out():
    s = series(800)
    normal = sliding_windows(s[600:], 16)[2::4]
    odd = np.random.default_rng(1).standard_normal(normal.shape)  # noise, unlike any sine
    for q in (None, 1.0):
        det = RawKnn(window=16, stride=1, memory_size=1000, admit_quantile=q).fit(s[:600])
        before = det.memory_entries
        det.partial_fit(odd)
        admitted_odd = det.memory_entries - before
        assert admitted_odd == len(odd) if q is None else admitted_odd == 0
        assert det.refused == len(odd) - admitted_odd
        det.partial_fit(normal)
        assert det.memory_entries - before - admitted_odd >= 0.8 * len(normal)
        restored = RawKnn(window=16, stride=1, memory_size=1000, admit_quantile=q)
        restored.load_state_dict(det.state_dict())
        assert restored.refused == det.refused
        np.testing.assert_array_equal(restored._admissible(_unit(restored, odd)),
                                      det._admissible(_unit(det, odd)))


def _unit(det, windows):
    f = det._features(windows)
    return f / np.linalg.norm(f, axis=-1, keepdims=True)
