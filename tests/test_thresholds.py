"""SPOT/DSPOT against known tails: the GPD fit recovers the generating parameters, the
calibrated threshold matches the analytic quantile, the online alarm rate stays at q,
and the state survives a save/load (what a second replica does)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import genpareto

from models.evt import fit_gpd, gpd_loglik
from models.thresholds import DSpot, Spot, ThresholdSpec, budget_to_q, build_threshold

MINUTE = 60.0


def ts(n: int, start: int = 0) -> np.ndarray:
    return (start + np.arange(n)) * MINUTE


@pytest.mark.parametrize("gamma,sigma", [(0.0, 1.0), (0.25, 1.5), (-0.2, 2.0)])
def test_gpd_fit_recovers_shape_and_scale_and_is_the_mle(gamma, sigma):
    y = genpareto.rvs(gamma, scale=sigma, size=4000, random_state=np.random.default_rng(7))
    fit = fit_gpd(y)
    assert abs(fit.gamma - gamma) < 0.06, fit
    assert abs(fit.sigma / sigma - 1) < 0.08, fit
    ref_gamma, _, ref_sigma = genpareto.fit(y, floc=0)  # scipy's numerical MLE as reference
    assert gpd_loglik(y, fit.gamma, fit.sigma) >= gpd_loglik(y, ref_gamma, ref_sigma) - 1e-3


def test_censored_fit_recovers_the_tail_that_truncation_loses():
    y = genpareto.rvs(0.2, scale=1.0, size=6000, random_state=np.random.default_rng(3))
    cap = float(np.quantile(y, 0.95))
    observed, censored = y[y <= cap], np.full(int((y > cap).sum()), cap)
    fit = fit_gpd(observed, censored)
    assert abs(fit.gamma - 0.2) < 0.08 and abs(fit.sigma - 1.0) < 0.1, fit
    truncated = fit_gpd(observed)  # what dropping alarms does: a much lighter tail
    assert truncated.gamma < fit.gamma - 0.2


def calibrated(kind: str, scores: np.ndarray, q: float) -> Spot:
    spot = build_threshold(ThresholdSpec(kind=kind, q=q, calibration=len(scores)))
    spot.process(scores, ts(len(scores)))
    assert spot.calibrated
    return spot


def test_spot_threshold_matches_the_analytic_quantile_of_an_exponential_tail():
    scores = np.random.default_rng(0).exponential(1.0, 20_000)
    spot = calibrated("spot", scores, q=1e-4)
    assert abs(spot.fit.gamma) < 0.1
    assert spot.value() == pytest.approx(-math.log(1e-4), rel=0.08)  # 9.21


def test_spot_threshold_matches_the_analytic_quantile_of_a_pareto_tail():
    gamma, sigma, q = 0.2, 1.0, 1e-4
    scores = genpareto.rvs(gamma, scale=sigma, size=20_000,
                           random_state=np.random.default_rng(1))
    spot = calibrated("spot", scores, q=q)
    assert abs(spot.fit.gamma - gamma) < 0.15, spot.describe()
    analytic = sigma / gamma * (q ** -gamma - 1)  # 26.5
    assert spot.value() == pytest.approx(analytic, rel=0.2)


@pytest.mark.parametrize("kind", ["spot", "dspot"])
def test_online_alarm_rate_stays_at_q(kind):
    q, n = 2e-3, 40_000
    scores = np.random.default_rng(5).exponential(1.0, n)
    thr = build_threshold(ThresholdSpec(kind=kind, q=q, calibration=2000))
    _, alarms = thr.process(scores, ts(n))
    rate = alarms[3000:].mean()
    assert 0.6 * q < rate < 1.6 * q, rate


def test_dspot_follows_drift_that_spot_cannot():
    n, q = 30_000, 1e-3
    rng = np.random.default_rng(2)
    scores = rng.exponential(1.0, n) + np.linspace(0, 6, n)
    rates = {}
    for kind in ("spot", "dspot"):
        _, alarms = build_threshold(ThresholdSpec(kind=kind, q=q, calibration=2000)).process(
            scores, ts(n))
        rates[kind] = alarms[3000:].mean()
    assert rates["dspot"] < 2 * q < rates["spot"], rates


@pytest.mark.parametrize("kind", ["spot", "dspot", "quantile"])
def test_state_round_trip_continues_exactly(kind):
    spec = ThresholdSpec(kind=kind, q=1e-3, calibration=500, min_scores=50, history=300)
    scores = np.random.default_rng(4).exponential(1.0, 3000)

    def run(thr, lo: int, hi: int) -> list:  # in chunks, as the scorer calls it
        return [thr.process(scores[i:i + 100], ts(100, i)) for i in range(lo, hi, 100)]

    expected = run(build_threshold(spec), 0, 3000)
    first = build_threshold(spec)
    got = run(first, 0, 1700)
    second = build_threshold(spec)  # another replica, from the saved state
    second.load_state_dict(first.state_dict())
    got += run(second, 1700, 3000)
    for (t, a), (te, ae) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(t, te)
        np.testing.assert_array_equal(a, ae)


def test_a_changed_spec_starts_a_fresh_threshold():
    scores = np.random.default_rng(4).exponential(1.0, 600)
    old = build_threshold(ThresholdSpec(q=1e-3, calibration=500))
    old.process(scores, ts(600))
    new = build_threshold(ThresholdSpec(q=1e-2, calibration=500))
    new.load_state_dict(old.state_dict())
    assert not new.calibrated and new.value() is None
    dspot = DSpot(ThresholdSpec(kind="dspot", calibration=500))
    dspot.load_state_dict(old.state_dict())
    assert not dspot.calibrated


def test_provisional_threshold_flags_only_new_records_while_calibrating():
    scores = np.concatenate([np.ones(100), [0.5, 2.0, 1.5, 3.0]])
    thr = build_threshold(ThresholdSpec(calibration=1000, min_scores=100))
    values, alarms = thr.process(scores, ts(len(scores)))
    assert np.isnan(values[:100]).all() and not alarms[:100].any()
    assert alarms[100:].tolist() == [False, True, False, True]


def test_alert_budget_becomes_q_from_the_measured_cadence():
    assert budget_to_q(2, 1440) == pytest.approx(2 / 1440)
    scores = np.random.default_rng(0).exponential(1.0, 1440)
    thr = build_threshold(ThresholdSpec(calibration=1440, budget_per_day=3))  # 1 point/min
    thr.process(scores, ts(1440))
    assert thr.q == pytest.approx(3 / 1440, rel=0.01)
