"""Replay a series through a fitted detector the way the service scores a stream
(``service/scoring.py``), for offline evaluation of online learning.

The series is cut at ``start``: everything before it is the past the detector was fitted
on; from ``start`` on, points arrive in chunks of ``chunk``. Within a chunk the detector and
the threshold are fixed, so the chunk's windows are scored in one batch; a window is
scored every ``score_stride`` points (the service's stride for costly detectors) and the
points in between repeat the last score, so every point's score uses only the past.
The threshold then decides which scored windows are normal, and with ``online`` the
detector learns from those only (``partial_fit``): anomalies never teach it what normal
is. Scores are the continuous scores; thresholds only drive the update.

>>> from models.detectors.raw_knn import RawKnn
>>> s = np.sin(np.arange(400.0) / 5.0)[:, None]
>>> det = RawKnn(window=16, stride=4, min_memory=1).fit(s[:100])
>>> run = stream_scores(det, s, start=100, score_stride=4)
>>> run.scores.shape, int(run.fresh.sum()), run.offered
((300,), 75, 75)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from models.detectors.base import Detector, aggregate_channels, as_series, sliding_windows


class StreamThreshold(Protocol):
    """What the replay needs from a threshold (``service.thresholds`` classes fit)."""

    def process(self, scores: np.ndarray,
                timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class StreamRun:
    """Per point from ``start`` on (scores and verdicts repeat between fresh scores)."""

    scores: np.ndarray  # (T - start,) float64
    anomalous: np.ndarray  # (T - start,) bool: the threshold's verdict in force
    thresholds: np.ndarray  # (T - start,) float64, NaN while the threshold has none
    fresh: np.ndarray  # (T - start,) bool: a window ending here was scored
    offered: int  # windows offered to partial_fit (judged normal)


def stream_scores(det: Detector, series: np.ndarray, start: int,
                  threshold: StreamThreshold | None = None, *, chunk: int = 64,
                  score_stride: int = 1, online: bool = True,
                  timestamps: np.ndarray | None = None) -> StreamRun:
    """Score ``series[start:]`` point by point with a detector fitted on the past.

    ``threshold``: decides, per scored window, normal or anomalous (None: all normal);
    its state moves with the stream. ``timestamps`` (seconds) go to the threshold; the
    point index when None. ``start`` must leave a full window of past: start >= window - 1.
    """
    series = as_series(series)
    window = det.config.window
    if not window - 1 <= start < len(series):
        raise ValueError(f"start: need window - 1 <= start < {len(series)}, got {start}")
    if chunk < 1 or score_stride < 1:
        raise ValueError("chunk and score_stride must be >= 1")
    if online and not det.supports_online:
        raise ValueError(f"{det.name} does not learn online: pass online=False")
    ts = np.arange(len(series), dtype=np.float64) if timestamps is None else np.asarray(
        timestamps, dtype=np.float64)
    n = len(series) - start
    scores, thresholds = np.full(n, np.nan), np.full(n, np.nan)
    anomalous, fresh = np.zeros(n, bool), np.zeros(n, bool)
    offered = 0
    last = (np.nan, np.nan, False)  # score, threshold, verdict of the last fresh window
    for lo in range(start, len(series), chunk):
        hi = min(lo + chunk, len(series))
        idx = np.arange(lo, hi)
        is_fresh = (idx - start) % score_stride == 0
        if is_fresh.any():
            windows = sliding_windows(series[lo - window + 1:hi], window)[is_fresh]
            s = aggregate_channels(det.channel_scores(windows), det.config.aggregate)
            if threshold is None:
                thr, anom = np.full(len(s), np.nan), np.zeros(len(s), bool)
            else:
                thr, anom = threshold.process(s, ts[idx[is_fresh]])
            if online and (~anom).any():
                det.partial_fit(windows[~anom])
                offered += int((~anom).sum())
        k = 0
        for j, f in enumerate(is_fresh):
            if f:
                last = (float(s[k]), float(thr[k]), bool(anom[k]))
                k += 1
            pos = lo - start + j
            scores[pos], thresholds[pos], anomalous[pos] = last
            fresh[pos] = f
    return StreamRun(scores, anomalous, thresholds, fresh, offered)
