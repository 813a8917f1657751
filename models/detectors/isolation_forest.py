"""Isolation Forest baseline (Liu et al., 2008) on standardised windows, one forest per
channel. Score = the forest's anomaly score (higher = easier to isolate).

The artifact stores the training sample and the seed, not pickled trees: loading refits
the same forests deterministically, so artifacts stay plain arrays (safetensors).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> series = rng.standard_normal((2000, 1))
>>> det = IsolationForest(window=8).fit(series)
>>> w = sliding_windows(series[-40:], 8)
>>> spiked = w.copy(); spiked[:, -1, 0] += 8.0
>>> bool(det.score(spiked).mean() > det.score(w).mean())
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.detectors.base import Detector, DetectorConfig, sliding_windows


@dataclass(frozen=True)
class IsolationForestConfig(DetectorConfig):
    window: int = 64
    n_estimators: int = 100
    max_samples: int = 256
    sample_size: int = 4096  # training windows kept (evenly spaced) to grow the forests
    seed: int = 0
    min_std: float = 1e-3


class IsolationForest(Detector):
    name = "isolation_forest"
    Config = IsolationForestConfig

    def state_dict(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "_sample"):
            return {}
        return {"mean": self._mean, "std": self._std, "sample": self._sample}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            self._mean, self._std, self._sample = (
                np.asarray(state[k], dtype=np.float64).copy() for k in ("mean", "std", "sample"))
            self._grow()

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "_forests")

    def _standardise(self, windows: np.ndarray) -> np.ndarray:
        return ((windows - self._mean) / self._std).transpose(0, 2, 1)  # (B, C, W)

    def _fit(self, train: np.ndarray) -> None:
        self._mean = train.mean(axis=0)
        self._std = np.maximum(train.std(axis=0), self.config.min_std)
        windows = sliding_windows(train, self.config.window)
        if len(windows) > self.config.sample_size:
            pick = np.linspace(0, len(windows) - 1, self.config.sample_size).round()
            windows = windows[pick.astype(int)]
        self._sample = self._standardise(windows)  # (N, C, W)
        self._grow()

    def _grow(self) -> None:
        from sklearn.ensemble import IsolationForest as SkIsolationForest

        self._forests = [
            SkIsolationForest(n_estimators=self.config.n_estimators,
                              max_samples=min(self.config.max_samples, len(self._sample)),
                              random_state=self.config.seed).fit(self._sample[:, c])
            for c in range(self._sample.shape[1])
        ]

    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        x = self._standardise(windows)
        return np.stack([-f.score_samples(x[:, c]) for c, f in enumerate(self._forests)],
                        axis=1)
