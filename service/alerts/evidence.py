"""What an alert shows as evidence: per top channel, its share of the score, the window
statistics the prompts use (variance, OLS trend, lag-1 autocorrelation) now versus the
stream's recent normal, and the prompt text itself.

The statistics and the prompt come from ``models.lm.prompts`` (one implementation for the
language-model features and for the evidence an operator reads). "Recent normal" is an
exponentially weighted mean and deviation per channel and statistic, updated from one
window judged normal per scored chunk: consecutive windows overlap almost entirely, so
one in ``CHUNK`` loses little and keeps the cost off the hot path.
"""

from __future__ import annotations

import math

import numpy as np

from models.lm.prompts import PromptConfig, channel_prompt, lag1_autocorr, ols_slope, variance

STATS = ("variance", "trend", "autocorr")
_FUNCS = (variance, ols_slope, lag1_autocorr)
ALPHA = 0.1  # EWMA weight of each new normal window (~ the last 10 chunks)


def window_stats(x: np.ndarray) -> np.ndarray:
    """(W,) -> [variance, trend, autocorr]."""
    return np.array([f(x) for f in _FUNCS])


def channel_stats(window: np.ndarray) -> np.ndarray:
    """(W, C) -> (C, 3): ``window_stats`` of every channel at once (the same statistics,
    whole columns at a time: a wide stream pays no Python per channel).

    >>> w = np.random.default_rng(0).normal(size=(64, 3))
    >>> bool(np.allclose(channel_stats(w), [window_stats(w[:, c]) for c in range(3)]))
    True
    """
    n = window.shape[0]
    xc = window - window.mean(axis=0)
    t = np.arange(n, dtype=np.float64)
    tc = t - t.mean()
    t_denom = float(tc @ tc)
    x_denom = (xc * xc).sum(axis=0)
    trend = tc @ xc / t_denom if t_denom > 0 else np.zeros(window.shape[1])
    lag = (xc[:-1] * xc[1:]).sum(axis=0)
    autocorr = np.divide(lag, x_denom, out=np.zeros_like(lag), where=(x_denom > 0) & (n > 1))
    return np.column_stack([window.var(axis=0), trend, autocorr])


class NormalStats:
    """EWMA mean and variance of each statistic, per channel."""

    def __init__(self, channels: int) -> None:
        self.mean = np.zeros((channels, len(STATS)))
        self.var = np.zeros((channels, len(STATS)))
        self.count = 0

    def update(self, window: np.ndarray) -> None:
        """window: (W, C), judged normal."""
        stats = channel_stats(window)
        if self.count == 0:
            self.mean = stats
        else:
            delta = stats - self.mean
            self.mean = self.mean + ALPHA * delta
            self.var = (1 - ALPHA) * (self.var + ALPHA * delta**2)
        self.count += 1

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "var": self.var, "count": np.array([self.count])}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "mean" in state and state["mean"].shape == self.mean.shape:
            self.mean, self.var = state["mean"].copy(), state["var"].copy()
            self.count = int(state["count"][0])


def build_evidence(window: np.ndarray, channel_scores: np.ndarray, names: list[str],
                   normal: NormalStats, *, at: float, score: float, threshold: float,
                   top: int, strategy: str) -> dict:
    """Evidence for the point whose window (W, C) and per-channel scores (C,) are given."""
    total = float(channel_scores.sum()) or 1.0
    config = PromptConfig(strategy=strategy)
    channels = []
    for c in np.argsort(-channel_scores)[:top]:
        now = window_stats(window[:, c])
        entry: dict = {"channel": names[c], "share": round(float(channel_scores[c]) / total, 4),
                       "now": _named(now)}
        if normal.count:
            std = np.sqrt(normal.var[c])
            entry["normal"] = _named(normal.mean[c])
            entry["normal_std"] = _named(std)
            entry["deviation"] = _named(np.where(std > 0, (now - normal.mean[c]) /
                                                 np.where(std > 0, std, 1.0), 0.0))
        entry["prompt"] = channel_prompt(window[:, c], config)
        channels.append(entry)
    return {"at": at, "score": score, "threshold": threshold, "channels": channels,
            "normal_windows": normal.count}


def _named(values: np.ndarray) -> dict[str, float]:
    return {k: _finite(float(v)) for k, v in zip(STATS, values, strict=True)}


def _finite(v: float) -> float:
    return round(v, 6) if math.isfinite(v) else 0.0
