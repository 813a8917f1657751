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
from models.thresholds import ThresholdSpec, build_threshold
from service.app import create_app
from service.metrics import ServiceMetrics
from service.settings import Settings

WINDOW = 64


def noise(n: int, seed: int = 0) -> np.ndarray:
    return 20.0 + 3.0 * np.random.default_rng(seed).standard_normal(n)


SETTLED = 3000  # points after which the ensemble's memory (2,048 points) is full


@pytest.mark.parametrize(("name", "threshold"), [
    ("ensemble", ThresholdSpec(kind="fixed", value=1.0)),  # as the service builds them
    ("residual_linear", ThresholdSpec(kind="spot")),
])
def test_likelihood_is_uniform_below_the_verdict_line_on_stationary_streams(name, threshold):
    """Ten independent stationary streams of 6,000 points (pooled: one stream's scores are
    autocorrelated, so its own empirical distribution wanders): only verdicts reach 0.99,
    fewer than 0.5% of the points, and the likelihood of the points judged normal is
    uniform on [0, 0.99) once the detector's scores are stationary. The ensemble's are
    from about 3,000 points on; before, its memory fills (2,048 points), its nearest
    distances shrink and its typical distance follows them a little late, so its
    likelihood runs high (median 0.54 over the whole streams, inside the issue's [0.3,
    0.7]). Measured for the ensemble: KS 0.010 from point 3,000 on (0.039 on seeds
    10-19); residual linear 0.008."""
    early, settled, verdicts, scored = [], [], 0, 0
    for seed in range(10):
        det = build_detector(name, window=WINDOW)
        run = stream_scores(det, noise(6000, seed), 0, build_threshold(threshold))
        ok = ~np.isnan(run.likelihood)
        assert (run.likelihood[ok & run.anomalous] >= VERDICT_LINE).all()
        normal = ok & ~run.anomalous
        early.append(run.likelihood[:SETTLED][normal[:SETTLED]])
        settled.append(run.likelihood[SETTLED:][normal[SETTLED:]])
        verdicts, scored = verdicts + int(run.anomalous.sum()), scored + int(ok.sum())
    assert verdicts / scored < 0.005  # fewer than 0.5% of the points read >= 0.99
    whole, lik = np.concatenate(early + settled), np.concatenate(settled)
    assert (whole < VERDICT_LINE).all()
    assert 0.3 <= np.median(whole) <= 0.7
    u = np.sort(lik / VERDICT_LINE)
    ks = np.max(np.abs(u - np.arange(1, len(u) + 1) / len(u)))
    assert ks < 0.06, ks
    assert 0.45 < np.median(lik) < 0.55


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
