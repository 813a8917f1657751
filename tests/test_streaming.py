"""The offline stream replay (models.streaming): the online rule grows the memory from
normal windows only, a frozen detector stays as fitted, and every score uses the past only."""

from __future__ import annotations

import numpy as np
import pytest

from models.detectors.raw_knn import RawKnn, scale_windows
from models.detectors.residual_linear import ResidualLinear
from models.streaming import stream_scores


class Cut:
    """A fixed threshold, recording what it saw."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.seen: list[float] = []

    def process(self, scores, timestamps):
        self.seen += list(scores)
        return np.full(len(scores), self.value), np.asarray(scores) > self.value


def series(n: int = 800, spike: tuple[int, int] = (600, 616)) -> np.ndarray:
    rng = np.random.default_rng(0)
    s = np.sin(np.arange(n) / 5.0) + 0.02 * rng.standard_normal(n)
    s[spike[0]:spike[1]] += np.linspace(0.0, 6.0, spike[1] - spike[0])  # a ramp up
    return s[:, None]


def test_online_memory_grows_from_normal_windows_only():
    s = series()
    # no admission rule: every window the threshold lets through is kept
    det = RawKnn(window=16, stride=1, min_memory=1, memory_size=1000,
                 admit_quantile=None).fit(s[:200])
    fitted = det.memory_entries
    cut = Cut(0.02)
    run = stream_scores(det, s, 200, cut, chunk=32, score_stride=4)
    flagged = run.fresh & run.anomalous
    assert run.scores.shape == (600,) and run.fresh.sum() == 150
    assert flagged[400:432].sum() >= 3  # windows over the ramp (points 600-616) are flagged...
    assert flagged.sum() == flagged[400:432].sum()  # ...and nothing else
    assert run.offered == 150 - flagged.sum()
    assert det.memory_entries == fitted + run.offered  # stride 1: every offered window kept
    # no flagged window is in the memory
    ends = 200 + np.nonzero(flagged)[0]
    feats = scale_windows(np.stack([s[e - 15:e + 1] for e in ends]))[:, 0]
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    memory = det.state_dict()["memory"][0, :det.memory_entries].astype(np.float32)
    assert (feats @ memory.T).max() < 0.999
    # between fresh scores a point repeats the last score
    assert np.array_equal(run.scores[1:4], np.repeat(run.scores[0], 3))


def test_frozen_detector_is_not_updated_and_no_threshold_means_all_normal():
    s = series()
    frozen = RawKnn(window=16, stride=4, min_memory=1).fit(s[:200])
    before = frozen.state_dict()["memory"].copy()
    run = stream_scores(frozen, s, 200, online=False, score_stride=8)
    assert run.offered == 0 and not run.anomalous.any()
    np.testing.assert_array_equal(frozen.state_dict()["memory"], before)
    online = RawKnn(window=16, stride=4, min_memory=1).fit(s[:200])
    # 75 fresh windows; the last 4 lie in the unfinished chunk (768-799), not learnt yet
    assert stream_scores(online, s, 200, score_stride=8).offered == 71


def test_scores_use_the_past_only():
    s = series()
    changed = s.copy()
    changed[500:] += 3.0
    a = stream_scores(ResidualLinear(window=16).fit(s[:200]), s, 200, Cut(5.0), chunk=48)
    b = stream_scores(ResidualLinear(window=16).fit(s[:200]), changed, 200, Cut(5.0),
                      chunk=48)
    np.testing.assert_array_equal(a.scores[:300], b.scores[:300])
    assert not np.array_equal(a.scores[300:], b.scores[300:])


def test_bad_arguments():
    det = RawKnn(window=16, stride=4, min_memory=1).fit(series()[:200])
    with pytest.raises(ValueError, match="start"):
        stream_scores(det, series(), 10)
    with pytest.raises(ValueError, match="online"):
        from models.detectors.pca import PcaReconstruction

        stream_scores(PcaReconstruction(window=16).fit(series()[:200]), series(), 200)


@pytest.mark.parametrize(("name", "config", "stride"), [
    ("ensemble", {"window": 64, "warmup": 256}, 1),  # the service's default
    ("residual_linear", {"window": 20, "warmup": 100}, 1),
    ("residual_linear", {"window": 20, "warmup": 100}, 7),  # a costly detector's stride
])
def test_points_until_scored_counts_down_to_the_first_score(name, config, stride):
    """The countdown the service shows while a stream warms up is exact: whatever the
    batch sizes, every prediction names the point that is in fact scored first."""
    from models.detectors import build_detector
    from models.streaming import OnlineLoop

    values = series(900)
    loop = OnlineLoop(build_detector(name, **config), Cut(1e9), score_stride=stride)
    rng = np.random.default_rng(1)
    predicted, first_scored, at = set(), None, 0
    while first_scored is None:
        predicted.add(at + loop.points_until_scored(at) - 1)  # counts the first scored
        n = int(rng.integers(1, 90))
        lo = max(0, at - 64 - config["window"])  # context the store keeps
        out = loop.run(values[lo:at + n], np.arange(lo, at + n, dtype=float), n, at)
        if out.scored.any():
            first_scored = at + int(np.flatnonzero(out.scored)[0])
        at += n
    assert predicted == {first_scored}
    assert loop.points_until_scored(at) == 0
