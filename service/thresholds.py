"""Per-stream thresholds. For now: a high quantile of the stream's recent scores.

State is a handful of arrays so it travels inside the stream's state blob (Redis).

>>> t = QuantileThreshold(quantile=0.9, history=100, min_scores=10)
>>> t.value() is None
True
>>> t.update(np.arange(100.0))
>>> round(t.value(), 1)
89.1
"""

from __future__ import annotations

import numpy as np


class QuantileThreshold:
    def __init__(self, quantile: float = 0.995, history: int = 2000, min_scores: int = 100):
        self.quantile = quantile
        self.history = history
        self.min_scores = min_scores
        self._buf = np.zeros(history)
        self._count = 0  # scores seen (the ring buffer holds the last `history`)

    def value(self) -> float | None:
        n = min(self._count, self.history)
        if n < self.min_scores:
            return None
        return float(np.quantile(self._buf[:n], self.quantile))

    def update(self, scores: np.ndarray) -> None:
        for s in np.asarray(scores, dtype=np.float64)[-self.history:]:
            self._buf[self._count % self.history] = s
            self._count += 1

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"buf": self._buf.copy(), "count": np.array([self._count])}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        buf = np.asarray(state["buf"], dtype=np.float64)
        if len(buf) == self.history:
            self._buf = buf.copy()
            self._count = int(state["count"][0])
