"""Anomaly likelihood: a per-point score in [0, 1] that means the same on every stream.

A detector's raw score has the units of its stream (a noisy stream scores higher than a
smooth one), so one threshold cannot serve many streams. The likelihood compares each
score with the stream's own recent scores instead:

    p = (1 + #{recent scores > s}) / (n + 1)              (a conformal tail p-value)
    p = 1 / (n + 1) * (max / s) ** tail   when s > max    (beyond the record: a Pareto tail)
    likelihood = 1 - p

Under normal operation (exchangeable scores) p is uniform, so ``likelihood >= 0.999``
happens for about one point in a thousand on any stream, whatever its scale. The Pareto
tail keeps ordering among scores that break the recent record (a score twice the record
is less likely than one just above it) instead of tying them all at 1 / (n + 1).

Each score is compared with the history *before* it and then joins it, so a chunk of
points gives exactly what the same points give one at a time.

A detector whose score already *is* a ratio to the stream's recent record
(a ``Records`` detector: 1 = as surprising as the worst of its recent history) is
calibrated by that ratio r alone, with the same tail: ``p = min(1, 1 / ((n + 1) r))``,
n = ``history``. Ranking the record ratio through a second history would let a stream's
second-worst moments compete with other streams' records (measured on NAB:
``benchmarks/results/nab.md``).

>>> cal = AnomalyLikelihood(history=100, min_history=10)
>>> lik = cal.process(np.r_[np.linspace(0.0, 1.0, 100), 5.0])
>>> bool(np.isnan(lik[:10]).all()), round(float(lik[-1]), 4)
(True, 0.998)
"""

from __future__ import annotations

import numpy as np


class AnomalyLikelihood:
    """Streaming likelihood of scores against a ring of the last ``history`` scores."""

    def __init__(self, history: int = 2000, min_history: int = 64, tail: float = 1.0,
                 record_ratio: bool = False) -> None:
        if history < 2 or not 1 <= min_history <= history or tail <= 0:
            raise ValueError("need history >= 2, 1 <= min_history <= history, tail > 0")
        self.history = history
        self.min_history = min_history
        self.tail = tail
        self.record_ratio = record_ratio
        # a record-ratio likelihood needs no history: the detector keeps the record
        self._ring = np.zeros(0 if record_ratio else history, dtype=np.float32)
        self._count = 0  # scores seen (ring index = count % history)

    def process(self, scores: np.ndarray) -> np.ndarray:
        """Likelihood of each score (NaN while fewer than ``min_history`` came before it);
        then every score joins the history, in order. A record ratio needs no history: its
        likelihood is there from the first score."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.record_ratio:  # the detector measured against its own record history
            ratio = np.maximum(scores, 1e-300) ** self.tail
            return 1.0 - np.minimum(1.0, 1.0 / ((self.history + 1.0) * ratio))
        out = np.full(len(scores), np.nan)
        for i, s in enumerate(scores):
            n = min(self._count, self.history)
            if n >= self.min_history:
                out[i] = 1.0 - self._p_value(s, self._ring[:n])
            self._ring[self._count % self.history] = s
            self._count += 1
        return out

    def _p_value(self, s: float, past: np.ndarray) -> float:
        n = len(past)
        above = int(np.count_nonzero(past > s))
        if above:
            return (1.0 + above) / (n + 1.0)
        record = float(past.max())
        if s <= record or s <= 0:
            return 1.0 / (n + 1.0)
        return (max(record, 0.0) / s if record > 0 else 0.0) ** self.tail / (n + 1.0)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"ring": self._ring.copy(), "count": np.array([self._count], dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        ring = np.asarray(state["ring"], dtype=np.float32)
        if ring.shape != self._ring.shape:  # the history setting changed: start again
            return
        self._ring = ring.copy()
        self._count = int(np.asarray(state["count"]).reshape(-1)[0])
