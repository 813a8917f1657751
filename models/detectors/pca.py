"""PCA reconstruction baseline: windows projected onto the principal subspace of normal
training windows; the score is the reconstruction error.

Channels share one subspace (each channel's window, standardised by that channel's
training mean and std, is one sample), like the residual-linear detector shares its map.
Channels constant in training carry no sample of normal variation: they are left out of
the subspace, score 0 and are listed in ``constant_channels``.

>>> import numpy as np
>>> t = np.arange(3000.0)
>>> series = np.sin(t / 7.0)[:, None]
>>> det = PcaReconstruction(window=32).fit(series)
>>> w = sliding_windows(series[-64:], 32)
>>> spiked = w.copy(); spiked[:, -1, 0] += 2.0
>>> bool(det.score(spiked).min() > 10 * det.score(w).max())
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.detectors.base import Detector, DetectorConfig, sliding_windows


@dataclass(frozen=True)
class PcaConfig(DetectorConfig):
    window: int = 64
    variance: float = 0.95  # keep the components explaining this share of variance
    max_train_windows: int = 20_000  # evenly spaced subsample for the SVD
    min_std: float = 1e-3


class PcaReconstruction(Detector):
    name = "pca"
    Config = PcaConfig

    def state_dict(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "_components"):
            return {}
        state = {"mean": self._mean, "std": self._std, "center": self._center,
                 "components": self._components, "error_scale": self._error_scale}
        if hasattr(self, "_constant"):
            state["constant"] = self._constant
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for key, value in state.items():
            setattr(self, f"_{key}", np.asarray(value, dtype=np.float64).copy())

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "_components")

    @property
    def constant_channels(self) -> list[int]:
        return np.flatnonzero(self._constant).tolist() if hasattr(self, "_constant") else []

    def _samples(self, windows: np.ndarray) -> np.ndarray:
        """(B, W, C) -> (B, C, W) standardised per channel."""
        z = (windows - self._mean) / self._std
        return z.transpose(0, 2, 1)

    def _fit(self, train: np.ndarray) -> None:
        self._mean = train.mean(axis=0)
        self._std = np.maximum(train.std(axis=0), self.config.min_std)
        windows = sliding_windows(train, self.config.window)
        if len(windows) > self.config.max_train_windows:
            pick = np.linspace(0, len(windows) - 1, self.config.max_train_windows).round()
            windows = windows[pick.astype(int)]
        self._constant = (np.ptp(train, axis=0) == 0).astype(np.float64)
        varying = self._constant == 0
        x = self._samples(windows)[:, varying].reshape(-1, self.config.window)  # (B*C', W)
        self._center = x.mean(axis=0) if len(x) else np.zeros(self.config.window)
        if len(x):
            _, s, vt = np.linalg.svd(x - self._center, full_matrices=False)
        else:  # every channel constant
            s, vt = np.zeros(0), np.zeros((0, self.config.window))
        total = float(np.sum(s**2))
        # no variance at all: no component, so any change shows (not a full-rank, blind basis)
        n = 0 if total == 0 else min(
            int(np.searchsorted(np.cumsum(s**2) / total, self.config.variance) + 1), len(s))
        self._components = vt[:n]  # (K, W)
        err = self._errors(windows)
        self._error_scale = np.maximum(np.median(err, axis=0), 1e-6)  # (C,)

    def _errors(self, windows: np.ndarray) -> np.ndarray:
        x = self._samples(windows) - self._center  # (B, C, W)
        recon = (x @ self._components.T) @ self._components
        return np.mean((x - recon) ** 2, axis=2)  # (B, C)

    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        scores = self._errors(windows) / self._error_scale
        if hasattr(self, "_constant"):
            scores[:, self._constant > 0] = 0.0
        return scores
