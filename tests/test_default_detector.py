"""The default detector's promises: a likelihood on one scale (uniform on normal data,
0.99 and above only for verdicts) for it and for the other detectors, and one wild value
that cannot blind a stream (issue 24: flagged once, the stream's later spikes caught as if
it never came, its normal likelihoods back within a window)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from models.calibration import VERDICT_LINE
from models.detectors import build_detector
from models.streaming import stream_scores
from service.app import create_app
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.thresholds import ThresholdSpec, build_threshold

WINDOW = 64


def noise(n: int, seed: int = 0) -> np.ndarray:
    return 20.0 + 3.0 * np.random.default_rng(seed).standard_normal(n)


@pytest.mark.parametrize(("name", "threshold"), [
    ("ensemble", ThresholdSpec(kind="fixed", value=1.0)),  # as the service builds them
    ("residual_linear", ThresholdSpec(kind="spot")),
])
def test_likelihood_is_uniform_below_the_verdict_line_on_stationary_streams(name, threshold):
    """Twelve independent stationary streams (pooled: one stream's scores are
    autocorrelated, so its own empirical distribution wanders): the likelihood of the
    points judged normal is uniform on [0, 0.99), and only verdicts reach 0.99. Measured
    KS 0.042 (ensemble: its memory fills over the first 2,048 points, so early distances
    run a little high) and 0.015 (residual linear)."""
    normal, verdicts, scored = [], 0, 0
    for seed in range(12):
        det = build_detector(name, window=WINDOW, warmup=256)
        run = stream_scores(det, noise(3000, seed), 0, build_threshold(threshold))
        ok = ~np.isnan(run.likelihood)
        assert (run.likelihood[ok & run.anomalous] >= VERDICT_LINE).all()
        normal.append(run.likelihood[ok & ~run.anomalous])
        verdicts, scored = verdicts + int(run.anomalous.sum()), scored + int(ok.sum())
    lik = np.concatenate(normal)
    assert (lik < VERDICT_LINE).all()
    u = np.sort(lik / VERDICT_LINE)
    ks = np.max(np.abs(u - np.arange(1, len(u) + 1) / len(u)))
    assert ks < 0.06, ks
    assert 0.45 < np.median(lik) < 0.55
    assert verdicts / scored < 0.005  # fewer than 0.5% of the points read >= 0.99


def replay(x: np.ndarray, batch: int = 500) -> list[dict]:
    with TestClient(create_app(Settings(), ServiceMetrics(CollectorRegistry()))) as client:
        out = []
        for lo in range(0, len(x), batch):
            points = [{"timestamp": 1_700_000_000.0 + 60.0 * t, "values": [float(x[t])]}
                      for t in range(lo, min(lo + batch, len(x)))]
            r = client.post("/score", json={"stream": "s", "points": points})
            assert r.status_code == 200, r.text
            out += r.json()["results"]
    return out


def test_one_wild_value_does_not_blind_the_stream():
    """Through POST /score: a clean stream with a +40 spike now and then (8 standard
    deviations), and the same stream with one value of 1e6 (then 1e12) before the spikes.
    The wild value is flagged; the later spikes are caught exactly as in the clean control
    (the audit's 1e6 hid them for ~4,100 points); and the normal points' likelihood is
    back to its usual spread one window after it (the windows that hold the value are
    unusual, and say so)."""
    x = noise(4000, seed=1)
    spikes = np.arange(1500, 4000, 250)
    x[spikes] += 40.0
    clean = replay(x)
    caught = [clean[i]["anomaly"] for i in spikes]
    assert sum(caught) >= 2
    for wild in (1e6, 1e12):
        y = x.copy()
        y[1200] = wild
        got = replay(y)
        assert got[1200]["anomaly"]
        assert [got[i]["anomaly"] for i in spikes] == caught
        normal = [r["likelihood"] for i, r in enumerate(got[1200 + WINDOW:1500], 1200 + WINDOW)
                  if not r["anomaly"]]
        assert 0.3 <= np.median(normal) <= 0.7
        assert sum(r["anomaly"] for r in got) <= sum(r["anomaly"] for r in clean) + 1
