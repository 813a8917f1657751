"""Score fusion: put detectors' scores on one scale learnt from training data, then add.

Two detectors disagree on units (a cosine distance, a squared reconstruction error), so
each score is first calibrated against that detector's own scores on normal training data
(``Calibration``): **z** = (score - median) / IQR, or **rank** = the share of calibration
scores below it (continued above the largest one in IQR units, so the most anomalous
points still order). The fused score is a weighted sum. Weights come from the same
training data: a detector whose calibrated scores on *normal* data already reach far
(a high 99th percentile) would raise false alarms, so it speaks softer (weight ∝
1 / q99). No label is used anywhere.

>>> cal = Calibration.of(np.array([0.0, 1.0, 2.0, 3.0, 4.0]))
>>> cal.z(np.array([2.0, 6.0])).tolist(), cal.rank(np.array([2.0, 6.0])).tolist()
([0.0, 2.0], [0.5, 2.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

METHODS = ("z", "rank")
QUANTILES = 101  # stored calibration quantiles per detector and channel (rank fusion)


@dataclass(frozen=True)
class Calibration:
    """One detector's normal-score distribution (per channel when given (N, C))."""

    center: np.ndarray  # (C,) median
    scale: np.ndarray  # (C,) IQR (std, then 1, where the IQR is 0)
    quantiles: np.ndarray  # (QUANTILES, C)

    @classmethod
    def of(cls, scores: np.ndarray) -> Calibration:
        """scores: (N,) or (N, C) of normal training data."""
        s = np.asarray(scores, dtype=np.float64)
        s = s[:, None] if s.ndim == 1 else s
        q = np.quantile(s, np.linspace(0, 1, QUANTILES), axis=0)  # (Q, C)
        iqr = q[75] - q[25]
        scale = np.where(iqr > 0, iqr, s.std(axis=0))
        return cls(center=q[50], scale=np.where(scale > 0, scale, 1.0), quantiles=q)

    def z(self, scores: np.ndarray) -> np.ndarray:
        return (np.asarray(scores, dtype=np.float64) - self.center) / self.scale

    def rank(self, scores: np.ndarray) -> np.ndarray:
        """Share of calibration scores below, in [0, 1]; above the largest: 1 + excess/IQR."""
        s = np.asarray(scores, dtype=np.float64)
        s2 = s[:, None] if s.ndim == 1 else s
        grid = np.linspace(0, 1, QUANTILES)
        out = np.empty_like(s2)
        for c in range(s2.shape[1]):
            q = self.quantiles[:, c]
            # mid-rank over ties (constant calibration scores give 0.5, not 0 or 1)
            lo = np.interp(s2[:, c], q, grid, left=0.0, right=1.0)
            hi = np.interp(s2[:, c], q[::-1], grid[::-1], left=0.0, right=1.0)
            inside = np.where(s2[:, c] <= q[-1], 0.5 * (lo + hi) if _ties(q) else lo, 1.0)
            excess = np.maximum(s2[:, c] - q[-1], 0.0) / self.scale[c]
            out[:, c] = inside + excess
        return out[:, 0] if s.ndim == 1 else out

    def spread(self) -> float:
        """99th percentile of the calibration scores' own z: how far normal data reaches."""
        return float(np.mean((self.quantiles[99] - self.center) / self.scale))

    def as_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}center": self.center, f"{prefix}scale": self.scale,
                f"{prefix}quantiles": self.quantiles}

    @classmethod
    def from_arrays(cls, state: dict[str, np.ndarray], prefix: str) -> Calibration:
        return cls(*(np.asarray(state[f"{prefix}{k}"], dtype=np.float64)
                     for k in ("center", "scale", "quantiles")))


def _ties(q: np.ndarray) -> bool:
    return bool((np.diff(q) == 0).any())


def weights_from_training(calibrations: Sequence[Calibration], how: str = "train") -> np.ndarray:
    """``train``: ∝ 1 / q99 of each detector's calibrated normal scores; ``equal``.

    >>> steady = Calibration.of(np.linspace(-1, 1, 101))
    >>> jumpy = Calibration.of(np.r_[np.linspace(-1, 1, 96), np.full(5, 10.0)])
    >>> weights_from_training([steady, jumpy]).round(2).tolist()
    [0.91, 0.09]
    """
    n = len(calibrations)
    if how == "equal":
        return np.full(n, 1.0 / n)
    if how != "train":
        raise ValueError(f"weights: unknown {how!r} (train | equal)")
    spread = np.array([max(c.spread(), 0.5) for c in calibrations])  # floor: no zero divide
    w = 1.0 / spread
    return w / w.sum()


def fuse(scores: Sequence[np.ndarray], calibrations: Sequence[Calibration],
         weights: np.ndarray, method: str = "z") -> np.ndarray:
    """Weighted sum of calibrated scores; every array the same shape ((N,) or (N, C))."""
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r} ({' | '.join(METHODS)})")
    parts = [getattr(cal, method)(s) for s, cal in zip(scores, calibrations, strict=True)]
    return sum(w * p for w, p in zip(weights, parts, strict=True))
