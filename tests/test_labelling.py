"""Context-anomaly labelling and T-SMOTE on constructed series with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from models.labelling import (
    LabelConfig,
    label_window,
    label_windows,
    level_shift_pvalues,
    monotonic_trend,
    sudden_spikes,
    volatility_pvalues,
    with_point_labels,
)
from models.oversampling import interpolate, minority_neighbours, tsmote

RNG = np.random.default_rng(42)
NOISE = RNG.normal(size=60)


def test_vectorised_split_tests_match_scipy():
    x = np.r_[RNG.normal(0, 1, 25), RNG.normal(0.8, 2.5, 25)]
    ks, p_t = level_shift_pvalues(x, min_segment=2)
    ks2, p_l = volatility_pvalues(x, min_segment=2)
    assert ks.tolist() == ks2.tolist() == list(range(2, 49))
    for k, a, b in zip(ks, p_t, p_l, strict=True):
        assert a == pytest.approx(stats.ttest_ind(x[:k], x[k:]).pvalue, rel=1e-6)
        assert b == pytest.approx(stats.levene(x[:k], x[k:], center="mean").pvalue, rel=1e-6)


def test_each_rule_finds_its_own_anomaly_and_blames_the_right_points():
    only = {kind: LabelConfig(kinds=(kind,)) for kind in
            ("trend", "spike", "shift", "volatility")}
    trend = 0.05 * np.arange(60) + 0.1 * NOISE
    assert monotonic_trend(trend) and label_window(trend, only["trend"]).mask.all()

    spike = 0.1 * NOISE.copy()
    spike[40] += 5.0
    lab = label_window(spike, only["spike"])
    assert lab.kinds == ("spike",) and np.flatnonzero(lab.mask).tolist() == [40, 41]

    shift = np.r_[np.zeros(30), np.full(30, 3.0)] + 0.3 * NOISE
    lab = label_window(shift, only["shift"])
    assert lab.kinds == ("shift",)
    assert np.flatnonzero(lab.mask)[0] == 30 and lab.mask[30:].all()

    vol = np.r_[0.1 * NOISE[:30], 2.0 * NOISE[30:]]
    lab = label_window(vol, only["volatility"])
    assert lab.kinds == ("volatility",) and 27 <= np.flatnonzero(lab.mask)[0] <= 33


def test_plain_noise_is_mostly_normal_with_bonferroni_but_not_with_the_paper_rules():
    windows = np.random.default_rng(1).normal(size=(200, 50))
    labels, _, kinds = label_windows(windows, LabelConfig(kinds=("shift", "volatility")))
    assert labels.mean() < 0.08
    paper, _, _ = label_windows(windows, LabelConfig.paper().__class__(
        correction="none", min_segment=2, kinds=("shift", "volatility")))
    assert paper.mean() > 2 * labels.mean()  # why bonferroni is the default
    assert all(set(k) <= {"shift", "volatility"} for k in kinds)


def test_spike_against_the_series_reference_ignores_a_windows_own_spread():
    x = np.sin(np.arange(40) / 3.0)  # smooth: within-window jumps alone look "spiky"
    ref = np.diff(np.sin(np.arange(2000) / 3.0))
    assert not sudden_spikes(x, reference=ref).any()
    x[20] += 1.0
    assert sudden_spikes(x, reference=ref)[20]


def test_top_share_keeps_only_the_series_most_unusual_windows():
    t = np.arange(3000)
    series = np.sin(t / 7.0) + 0.05 * np.random.default_rng(0).normal(size=len(t))
    series[2000:2010] += 4.0  # one real level shift
    wins = np.lib.stride_tricks.sliding_window_view(series, 32)[::8]
    plain, _, _ = label_windows(wins, LabelConfig())
    top, _, kinds = label_windows(wins, LabelConfig(top_share=0.01))
    assert plain.mean() > 0.5  # smooth series: the tests fire almost everywhere
    assert top.mean() < 0.06
    hit = [i for i in range(len(wins)) if 2000 - 31 <= i * 8 <= 2009]
    assert top[hit].any()


def test_given_point_labels_are_merged():
    labels, masks = with_point_labels(np.array([0, 1]), np.zeros((2, 4), dtype=bool),
                                      np.array([[0, 0, 1, 0], [0, 0, 0, 0]]))
    assert labels.tolist() == [1, 1] and masks[0].tolist() == [False, False, True, False]


def test_interpolation_is_the_papers_example():
    x1 = np.array([4, 3, 4, 8, 7, 3.0])
    x2 = np.array([3, 4, 4, 3, 7, 4.0])
    assert interpolate(x1, x2, 0.5).tolist() == [3.5, 3.5, 4.0, 5.5, 7.0, 3.5]


def test_tsmote_balances_and_stays_between_minority_neighbours():
    rng = np.random.default_rng(0)
    normal = rng.normal(0, 1, (100, 8))
    anomalous = np.stack([np.full(8, 10.0 + i) for i in range(5)])  # a line of levels
    x = np.r_[normal, anomalous]
    y = np.r_[np.zeros(100), np.ones(5)].astype(int)
    masks = np.zeros(x.shape, dtype=bool)
    masks[100:, 3] = True
    xs, ys, ms = tsmote(x, y, k=2, ratio=1.0, extra=masks)
    assert (ys == 1).sum() == 100 and (ys == 0).sum() == 100
    assert np.array_equal(xs[:105], x) and ms.shape == xs.shape
    syn = xs[105:]
    # every synthetic sample is a constant window between two neighbouring levels
    assert np.allclose(syn, syn[:, :1]) and syn.min() >= 10.0 and syn.max() <= 14.0
    assert ms[105:, 3].all() and not ms[105:, 0].any()
    nn = minority_neighbours(anomalous, 2)
    assert nn[0].tolist() == [1, 2] and nn[4].tolist() == [3, 2]


def test_tsmote_leaves_data_alone_when_nothing_to_interpolate():
    x = np.zeros((10, 4))
    y = np.r_[np.zeros(9), np.ones(1)].astype(int)
    xs, ys, _ = tsmote(x, y)
    assert xs is x and ys.tolist() == y.tolist()
