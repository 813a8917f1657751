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
from models.detectors.base import sliding_windows
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
    from about 3,000 points on; before, its memory fills (2,048 points) and its nearest
    distances shrink below the typical one measured when the warm-up ended, so its
    likelihood runs a little low (median 0.48 over the whole streams, 0.47 on seeds 10-19,
    inside the issue's [0.3, 0.7]). Measured for the ensemble: KS 0.017 from point 3,000 on
    (0.009 on seeds 10-19), median there 0.490; residual linear 0.008."""
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


RECOVERY = 64  # points after the wild value: the windows that still hold it


def test_one_wild_value_does_not_blind_the_stream():
    """Issue 24's poisoning case through POST /score: a clean stream with spikes growing
    from +40 to +85 (13 to 28 standard deviations) every 250 points from point 1,500 (each
    a new record: the clean control catches all ten), and the same stream with one value
    of 1e6 (then 1e12) at point 1,200. The audit's 1e6 widened the range: 0 of 6 later
    spikes caught, 1,167 of the next 1,200 normal points scored below 1e-6, for about
    4,100 points. Now the wild value is flagged once, every later spike is caught as in
    the control, no normal point scores below 1e-6, and RECOVERY points after it (one
    window) the normal points' likelihood is the control's again; the windows that still
    hold the value read below the verdict line (the level member's repeats of its record,
    divided by it as one incident: 0.14 to 0.35). Measured: within 0.044 of the
    control's point by point from there to the first spike."""
    x = noise(4000, seed=1)
    spikes = np.arange(1500, 4000, 250)
    x[spikes] += 40.0 + 5.0 * np.arange(len(spikes))
    clean = replay(x)
    caught = [clean[i]["anomaly"] for i in spikes]
    assert all(caught)
    for wild in (1e6, 1e12):
        y = x.copy()
        y[1200] = wild
        got = replay(y)
        assert got[1200]["anomaly"]
        assert [got[i]["anomaly"] for i in spikes] == caught
        assert sum(r["anomaly"] for r in got) == sum(r["anomaly"] for r in clean) + 1
        after = [got[i] for i in range(1201, 2401) if not got[i]["anomaly"]]
        assert min(r["score"] for r in after) > 1e-6
        back = range(1200 + RECOVERY, spikes[0])
        gap = max(abs(got[i]["likelihood"] - clean[i]["likelihood"]) for i in back)
        assert gap < 0.1, gap


def test_one_wild_value_does_not_blind_the_level_member():
    """A day-long flat line mid-range on a daily cycle (a level the stream never held
    its pattern at: the level member's record) is caught after one value of 1e6 as in
    the clean control: the windows that still hold the wild value stay out of the level
    member's record (else its record line was the wild value's distance for the 4,096
    points of history, and this day went unflagged)."""
    rng = np.random.default_rng(0)
    t = np.arange(7000)
    x = 50.0 + 20.0 * np.sin(2 * np.pi * t / 288) + rng.standard_normal(7000)
    x[5600:5888] = 50.0 + rng.standard_normal(288)
    flags = []
    for wild in (None, 1e6):
        y = x.copy()
        if wild is not None:
            y[3000] = wild
        run = stream_scores(build_detector("ensemble", window=WINDOW), y, 0,
                            build_threshold(ThresholdSpec(kind="fixed", value=1.0)))
        flags.append(np.flatnonzero(run.anomalous[3001:]) + 3001)
    assert len(flags[0]) and 5600 <= flags[0][0] < 5888
    assert np.array_equal(flags[0], flags[1])


def test_the_demo_streams_likelihood():
    """`tsad demo`'s stream (README, First contact), as the demo sends it (batches of 100):
    the spike is the one verdict, at 0.99 or above; the points not flagged that have a
    likelihood (95: it needs 64 scores of history) have a median in [0.3, 0.7] (issue
    22's target; measured 0.692, 0.787 while the memory's typical distance moved with each
    block). The points whose window still holds the spike read as the same stream without
    the spike reads there (the spike was reported when it came; the ranking grades what is
    new at each window's end): within 0.06 of it point by point (they read 0.91 to 0.98
    before, ranked as novel for the 63 windows that held the spike).

    One draw of this stream says little about the scale: its scores move slowly (a window
    shares 63 of its 64 values with the next), so its 95 points are a few independent
    stretches. Ranked against the scores 39 other noise draws give at the same points (a
    perfect calibration; the draws without their spike), this draw's median is 0.81, and
    the draws' medians range from 0.01 to 0.98. Its median before the spike read 0.60 (a
    bound of [0.3, 0.7] here before) and reads 0.28 now: that bound held by the draw, as
    it does on 45% of the draws with either typical distance. What the scale owes is
    ``test_the_demo_stream_reads_the_middle_over_draws``."""
    from service.demo import SPIKE, demo_series

    series = demo_series(1_700_000_000.0)
    got = replay(series[:, 1], batch=100)
    assert [i for i, r in enumerate(got) if r["anomaly"]] == [SPIKE]
    assert got[SPIKE]["likelihood"] >= VERDICT_LINE
    normal = [r["likelihood"] for r in got if r["likelihood"] is not None and not r["anomaly"]]
    assert len(normal) > 90 and 0.3 <= np.median(normal) <= 0.7, np.median(normal)
    clean = series[:, 1].copy()
    clean[SPIKE] = series[SPIKE - 1, 1]  # no spike: in the demo's range
    control = replay(clean, batch=100)
    assert not any(r["anomaly"] for r in control)
    after = np.array([r["likelihood"] for r in got[SPIKE + 1:SPIKE + WINDOW]])
    same = np.array([r["likelihood"] for r in control[SPIKE + 1:SPIKE + WINDOW]])
    assert after.max() < VERDICT_LINE
    gap = np.abs(after - same).max()
    assert gap < 0.06, gap


def test_the_demo_stream_reads_the_middle_over_draws():
    """The demo stream's likelihood is unbiased on average: over 40 noise draws (seeds 0 to
    39), the mean of each draw's median over its points not flagged is within 0.05 of 0.5
    (measured 0.522; a perfect calibration gives 0.510). While the memory's typical
    distance moved with each block it was 0.599: the first scored points were graded
    against the warm-up's three blocks, measured while the memory was small, and the later
    ones against more, so the later points ranked above the first ones (the likelihood
    ranks each point among the stream's earlier scores). Measured once when the warm-up
    ends, as raw_knn calibrates, the scale no longer moves under the ranking."""
    from service.demo import demo_series

    medians = []
    for seed in range(40):
        run = stream_scores(build_detector("ensemble", window=WINDOW),
                            demo_series(1_700_000_000.0, seed)[:, 1], 0,
                            build_threshold(ThresholdSpec(kind="fixed", value=1.0)))
        normal = ~np.isnan(run.likelihood) & ~run.anomalous
        medians.append(np.median(run.likelihood[normal]))
    assert abs(np.mean(medians) - 0.5) < 0.05, np.mean(medians)


def test_a_state_from_before_the_typical_distance_was_kept_loads():
    """A stream's detector state written before the typical distance was kept (no
    ``typical`` key) still loads: it is measured from the state's blocks, as the scale
    read then, and kept from there on; a state with it scores as the detector it came
    from."""
    x = noise(900)[:, None]
    det = build_detector("ensemble", window=WINDOW)
    for lo in range(0, 640, 64):
        det.partial_fit(sliding_windows(x[max(lo - WINDOW + 1, 0):lo + 64], WINDOW))
    windows = sliding_windows(x[640 - WINDOW + 1:], WINDOW)
    state = det.state_dict()
    same = build_detector("ensemble", window=WINDOW)
    same.load_state_dict(state)
    assert np.array_equal(same.score(windows), det.score(windows))
    old = build_detector("ensemble", window=WINDOW)
    old.load_state_dict({k: v for k, v in state.items() if k != "typical"})
    assert old.is_fitted
    mids = det._memory_mid[~np.isnan(det._memory_mid[:, 0])]  # the state holds it in slices
    assert np.array_equal(old.state_dict()["typical"], np.median(mids, axis=0))
    assert np.isfinite(old.score(windows)).all()
