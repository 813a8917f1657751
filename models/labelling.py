"""Context-anomaly labelling of windows (SPEAR, section III-C), reusable by any detector.

Four statistical rules label a window (T,) as a *context anomaly* and say which points:

* **monotonic trend**: OLS x_t = b0 + b1 t; |b1| > ``slope_threshold`` and the two-sided
  p-value of b1 = 0 below ``alpha`` (all points marked);
* **sudden spike**: first differences d_t = |x_t - x_{t-1}|; a spike where
  d_t > mean(d) + ``spike_k`` std(d) (point t marked). The paper takes mean and std over
  the window itself; pass ``reference`` differences (e.g. of the whole training series)
  to judge a window against its series' context instead;
* **level shift**: split at every k, two-sample t-test (equal variances, as the paper)
  of x[:k] against x[k:]; the smallest p-value below ``alpha`` (points from k on marked);
* **volatility change**: the same splits with Levene's test (mean-centred, Levene 1960;
  scipy's default centres on the median) (points from k on marked).

The paper scans every split point at alpha = 0.05 with no correction; on a window of 100
points that is ~96 correlated tests, so noise alone is labelled a shift or a volatility
change in a large share of windows. ``correction="bonferroni"`` divides alpha by the number
of splits (the default here); ``LabelConfig.paper()`` gives the paper's exact rules.
Even so, OLS and t-tests assume independent noise: on smooth or autocorrelated series
(a sine, most telemetry) nearly every window has a "significant" trend or shift (92% of
16-point sine windows in the detector contract's series). ``top_share`` makes the rules
relative to the series, its context: over the windows of one series, a rule fires only
where its test passes and its strength is among the top ``top_share`` of those windows.

Tests over splits are vectorised (cumulative sums), not one scipy call per split.

>>> x = np.r_[np.zeros(20), np.full(20, 5.0)] + 0.1 * np.random.default_rng(0).normal(size=40)
>>> label_window(x).kinds  # a step is also a trend, a jump and uneven spread about a mean
('trend', 'spike', 'shift', 'volatility')
>>> int(np.flatnonzero(label_window(x, LabelConfig(kinds=("shift",))).mask)[0])
20
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

KINDS = ("trend", "spike", "shift", "volatility")


@dataclass(frozen=True)
class LabelConfig:
    alpha: float = 0.05
    slope_threshold: float = 0.01  # |b1| per step, in the window's units
    spike_k: float = 3.0  # threshold = mean + k std of the differences
    min_segment: int = 3  # smallest segment either side of a split
    correction: str = "bonferroni"  # none (paper) | bonferroni (over split points)
    kinds: tuple[str, ...] = KINDS
    top_share: float | None = None  # label_windows: only the top share of a series per rule

    def __post_init__(self) -> None:
        if self.correction not in ("none", "bonferroni"):
            raise ValueError(f"correction: none | bonferroni, got {self.correction!r}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"kinds: unknown {sorted(unknown)}; known: {KINDS}")
        if self.min_segment < 2:
            raise ValueError("min_segment: at least 2 (a variance needs two points)")

    @classmethod
    def paper(cls) -> LabelConfig:
        """The paper's rules exactly: alpha 0.05 at every split, no correction."""
        return cls(correction="none", min_segment=2, top_share=None)


@dataclass(frozen=True)
class WindowLabel:
    label: int  # 1 = context anomaly
    kinds: tuple[str, ...]  # which rules fired
    mask: np.ndarray  # (T,) bool: the points the rules blame


def monotonic_trend(x: np.ndarray, slope_threshold: float = 0.01,
                    alpha: float = 0.05) -> bool:
    """OLS slope test (Algorithm 1).

    >>> monotonic_trend(np.arange(30.0))
    True
    >>> monotonic_trend(np.sin(np.arange(30.0)))
    False
    """
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0:
        return False
    res = stats.linregress(np.arange(len(x), dtype=np.float64), x)
    return bool(abs(res.slope) > slope_threshold and res.pvalue < alpha)


def sudden_spikes(x: np.ndarray, k: float = 3.0,
                  reference: np.ndarray | None = None) -> np.ndarray:
    """(T,) bool: points t whose jump |x_t - x_{t-1}| exceeds mean + k std (Algorithm 2).

    >>> x = np.sin(np.arange(40) / 3.0); x[25] += 4.0
    >>> np.flatnonzero(sudden_spikes(x)).tolist()
    [25, 26]
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(len(x), dtype=bool)
    if len(x) < 3:
        return out
    d = np.abs(np.diff(x))
    ref = d if reference is None else np.abs(np.asarray(reference, dtype=np.float64))
    theta = ref.mean() + k * ref.std()
    out[1:] = d > theta
    return out


def _splits(n: int, min_segment: int) -> np.ndarray:
    return np.arange(min_segment, n - min_segment + 1)


def level_shift_pvalues(x: np.ndarray, min_segment: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """p-values of the pooled two-sample t-test of x[:k] vs x[k:] for every split k.
    Returns (splits, p); matches ``scipy.stats.ttest_ind`` split by split."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    ks = _splits(n, min_segment)
    if len(ks) == 0:
        return ks, np.ones(0)
    c1, c2 = np.cumsum(x), np.cumsum(x * x)
    n1, n2 = ks.astype(np.float64), (n - ks).astype(np.float64)
    s1, q1 = c1[ks - 1], c2[ks - 1]
    s2, q2 = c1[-1] - s1, c2[-1] - q1
    m1, m2 = s1 / n1, s2 / n2
    ss = np.maximum((q1 - n1 * m1 ** 2) + (q2 - n2 * m2 ** 2), 0.0)
    dof = n - 2
    sp2 = ss / dof
    se = np.sqrt(sp2 * (1 / n1 + 1 / n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, (m1 - m2) / se, np.where(m1 == m2, 0.0, np.inf))
    return ks, 2 * stats.t.sf(np.abs(t), dof)


def volatility_pvalues(x: np.ndarray, min_segment: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """p-values of Levene's test (mean-centred) of x[:k] vs x[k:] for every split k.
    Matches ``scipy.stats.levene(a, b, center="mean")`` split by split."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    ks = _splits(n, min_segment)
    if len(ks) == 0:
        return ks, np.ones(0)
    c1 = np.cumsum(x)
    n1, n2 = ks.astype(np.float64), (n - ks).astype(np.float64)
    m1 = c1[ks - 1] / n1
    m2 = (c1[-1] - c1[ks - 1]) / n2
    first = np.arange(n)[None, :] < ks[:, None]  # (K, n): point in segment A
    z = np.abs(x[None, :] - np.where(first, m1[:, None], m2[:, None]))  # (K, n)
    za = np.where(first, z, 0.0).sum(1) / n1
    zb = np.where(~first, z, 0.0).sum(1) / n2
    zbar = z.mean(1)
    between = n1 * (za - zbar) ** 2 + n2 * (zb - zbar) ** 2  # k - 1 = 1 dof
    within = (np.where(first, (z - za[:, None]) ** 2, (z - zb[:, None]) ** 2)).sum(1)
    dof = n - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(within > 0, between / (within / dof), np.where(between > 0, np.inf, 0.0))
    return ks, stats.f.sf(f, 1, dof)


def _best_split(ks: np.ndarray, p: np.ndarray, alpha: float,
                correction: str) -> int | None:
    if len(p) == 0:
        return None
    level = alpha / len(p) if correction == "bonferroni" else alpha
    i = int(np.argmin(p))
    return int(ks[i]) if p[i] < level else None


def rule_strengths(x: np.ndarray, config: LabelConfig | None = None,
                   spike_reference: np.ndarray | None = None
                   ) -> dict[str, tuple[bool, float, np.ndarray]]:
    """Per rule: (fired by the paper's test, strength, blamed points (T,) bool).

    Strength orders windows within a series (``LabelConfig.top_share``): -log10 p for
    the tests, the largest jump over the spike threshold for spikes.
    """
    cfg = config or LabelConfig()
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    out: dict[str, tuple[bool, float, np.ndarray]] = {}
    none = np.zeros(n, dtype=bool)
    flat = n < 3 or np.ptp(x) == 0
    if "trend" in cfg.kinds:
        if flat:
            out["trend"] = (False, 0.0, none)
        else:
            res = stats.linregress(np.arange(n, dtype=np.float64), x)
            fired = bool(abs(res.slope) > cfg.slope_threshold and res.pvalue < cfg.alpha)
            out["trend"] = (fired, float(-np.log10(max(res.pvalue, 1e-300))),
                            np.ones(n, dtype=bool))
    if "spike" in cfg.kinds:
        spikes = sudden_spikes(x, cfg.spike_k, spike_reference)
        if n < 3:
            out["spike"] = (False, 0.0, none)
        else:
            d = np.abs(np.diff(x))
            ref = d if spike_reference is None else np.abs(spike_reference)
            theta = ref.mean() + cfg.spike_k * ref.std()
            out["spike"] = (bool(spikes.any()), float(d.max() / theta) if theta > 0 else
                            float(d.max() > 0) * 1e9, spikes)
    for kind, fn in (("shift", level_shift_pvalues), ("volatility", volatility_pvalues)):
        if kind not in cfg.kinds:
            continue
        ks, p = (np.zeros(0, dtype=int), np.ones(0)) if flat else fn(x, cfg.min_segment)
        k = _best_split(ks, p, cfg.alpha, cfg.correction)
        mask = np.zeros(n, dtype=bool)
        if k is not None:
            mask[k:] = True
        strength = float(-np.log10(max(p.min(), 1e-300))) if len(p) else 0.0
        out[kind] = (k is not None, strength, mask)
    return out


def label_window(x: np.ndarray, config: LabelConfig | None = None,
                 spike_reference: np.ndarray | None = None) -> WindowLabel:
    """Apply the configured rules to one window (T,) (the paper's tests alone)."""
    x = np.asarray(x, dtype=np.float64)
    rules = rule_strengths(x, config, spike_reference)
    mask = np.zeros(len(x), dtype=bool)
    kinds = []
    for kind in KINDS:
        if kind in rules and rules[kind][0]:
            kinds.append(kind)
            mask |= rules[kind][2]
    return WindowLabel(int(bool(kinds)), tuple(kinds), mask)


def label_windows(windows: np.ndarray, config: LabelConfig | None = None,
                  spike_reference: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, ...]]]:
    """(N, T) windows of one series -> labels (N,) int64, point masks (N, T) bool, kinds.

    With ``config.top_share`` set, a rule fires only on windows where its test passes
    *and* its strength is within the top share of these windows (context: unusual for
    this series), so smooth or autocorrelated series are not labelled wholesale.
    """
    cfg = config or LabelConfig()
    windows = np.asarray(windows, dtype=np.float64)
    n, t = windows.shape if windows.ndim == 2 else (0, 0)
    rules = [rule_strengths(w, cfg, spike_reference) for w in windows]
    masks = np.zeros((n, t), dtype=bool)
    kinds: list[list[str]] = [[] for _ in range(n)]
    for kind in cfg.kinds:
        fired = np.array([r[kind][0] for r in rules], dtype=bool)
        if cfg.top_share is not None and n:
            strength = np.array([r[kind][1] for r in rules])
            fired &= strength >= np.quantile(strength, 1 - cfg.top_share)
        for i in np.flatnonzero(fired):
            kinds[i].append(kind)
            masks[i] |= rules[i][kind][2]
    labels = masks.any(1).astype(np.int64)
    return labels, masks, [tuple(k) for k in kinds]


def with_point_labels(labels: np.ndarray, masks: np.ndarray,
                      point_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge a dataset's given point labels (N, T) into context labels and masks."""
    point_labels = np.asarray(point_labels).astype(bool)
    masks = masks | point_labels
    return np.maximum(labels, point_labels.any(1).astype(np.int64)), masks


def label_share(labels: np.ndarray, kinds: list[tuple[str, ...]]) -> dict[str, float]:
    """Share of windows labelled, overall and per rule (for training reports)."""
    n = max(len(labels), 1)
    out = {"any": float(np.sum(labels)) / n}
    for kind in KINDS:
        out[kind] = sum(kind in k for k in kinds) / n
    return out


__all__ = ["KINDS", "LabelConfig", "WindowLabel", "label_share", "label_window",
           "label_windows", "level_shift_pvalues", "monotonic_trend", "rule_strengths",
           "sudden_spikes", "volatility_pvalues", "with_point_labels"]
