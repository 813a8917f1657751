"""Scores do not depend on batching: the same stream sent at batch 1, 10 and 500 through
POST /score, and replayed offline through ``models.streaming``, gives identical scores,
likelihoods, verdicts and alerts, for every detector that learns online."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from models.detectors import REGISTRY
from models.detectors.base import Online
from models.streaming import stream_scores
from service.app import create_app
from service.metrics import ServiceMetrics
from service.scoring import StreamScorer
from service.settings import Settings
from service.stores.base import StreamMeta

N, SPIKE, WINDOW = 640, 560, 32
ONLINE = sorted(name for name, cls in REGISTRY.items() if issubclass(cls, Online))
EXACT = ("anomaly", "status")
# Scores match to float32 rounding: a language model and a float32 memory search run batched
# matrix products whose last bits depend on the batch's size (BLAS), not on the chunking.
CLOSE = ("score", "likelihood", "threshold")  # thresholds follow the scores


def close(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (
        a is not None and b is not None and abs(a - b) <= 1e-4 * abs(b) + 1e-6)


def series() -> np.ndarray:
    rng = np.random.default_rng(3)
    t = np.arange(N)
    x = np.sin(t / 6.0) + 0.05 * rng.standard_normal(N)
    x[SPIKE:SPIKE + 3] += 5.0  # an incident the alert tracker must open and resolve
    return x


def settings() -> Settings:
    return Settings(detector_params={"*": {"warmup": 96}}, threshold_min_scores=20,
                    max_batch_points=1000, likelihood_min_scores=16)


def replay(client: TestClient, stream: str, detector: str, x: np.ndarray, batch: int):
    r = client.put(f"/streams/{stream}", json={"channels": 1, "detector": detector,
                                               "window": WINDOW})
    assert r.status_code == 201, r.text
    results = []
    for lo in range(0, len(x), batch):
        points = [{"timestamp": float(t), "values": [float(x[t])]}
                  for t in range(lo, min(lo + batch, len(x)))]
        r = client.post("/score", json={"stream": stream, "points": points})
        assert r.status_code == 200, r.text
        results += r.json()["results"]
    alerts = client.get("/alerts", params={"stream": stream}).json()["alerts"]
    keep = ("opened_at", "resolved_at", "severity", "peak_score", "state", "channels")
    return results, [{k: a.get(k) for k in keep} for a in alerts]


@pytest.mark.parametrize("detector", ONLINE)
def test_batch_1_10_500_and_offline_replay_agree(detector):
    x = series()
    s = settings()
    with TestClient(create_app(s, ServiceMetrics(CollectorRegistry()))) as client:
        runs = {b: replay(client, f"b{b}", detector, x, b) for b in (1, 10, 500)}
    (base, base_alerts) = runs[500]
    assert sum(r["status"] == "scored" for r in base) > 300
    for b in (1, 10):
        results, alerts = runs[b]
        for i, (got, want) in enumerate(zip(results, base, strict=True)):
            assert {k: got[k] for k in EXACT} == {k: want[k] for k in EXACT}, (b, i)
            assert all(close(got[k], want[k]) for k in CLOSE), (b, i, got, want)
        assert len(alerts) == len(base_alerts), b
        for got, want in zip(alerts, base_alerts, strict=True):
            assert close(got.pop("peak_score"), want["peak_score"])
            assert got == {k: v for k, v in want.items() if k != "peak_score"}, b
    # offline: the same loop, detector and threshold as the service builds them
    scorer = StreamScorer(StreamMeta("off", 1, WINDOW, detector), s)
    run = stream_scores(scorer.detector, x, 0, scorer.threshold,
                        score_stride=scorer.loop.score_stride, timestamps=np.arange(N) * 1.0)
    served = np.array([np.nan if r["score"] is None else r["score"] for r in base])
    np.testing.assert_allclose(run.scores, served, rtol=1e-4, atol=1e-6)
    assert (run.anomalous == np.array([r["anomaly"] for r in base])).all()


def test_the_default_detector_flags_the_incident_and_little_else():
    """The default flags a point only when it breaks the stream's recent record: the
    spike, and on a noisy stream the rare new extreme of the noise (records of i.i.d. noise
    thin out as 1/n)."""
    x = series()
    with TestClient(create_app(settings(), ServiceMetrics(CollectorRegistry()))) as client:
        results, alerts = replay(client, "d", Settings().default_detector, x, 100)
    flagged = [i for i, r in enumerate(results) if r["anomaly"]]
    assert results[SPIKE]["anomaly"]
    # likelihood >= 0.99 exactly for the verdicts (models/calibration.py)
    assert all((r["likelihood"] >= 0.99) == r["anomaly"] for r in results
               if r["likelihood"] is not None)
    assert not any(results[i]["anomaly"] for i in (SPIKE + 1, SPIKE + 2))  # one record
    assert len(flagged) <= 4, flagged
    assert alerts and all(a["opened_at"] in [float(i) for i in flagged] for a in alerts)
