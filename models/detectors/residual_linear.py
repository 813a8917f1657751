"""Residual-linear forecaster (Curse-of-Attention paper, section 2.3).

    f(x) = <w, x - x_last> + x_last

The window's last context value is subtracted, a linear map shared by all channels
forecasts the change, and the last value is added back. The paper shows this residual
form learns sign-inconsistent (residual) structure that attention under-learns, so the
product always keeps it: as the default online detector and as the baseline beside every
language-model detector.

Score of the newest point of a window = |forecast error| per channel, measured in units of
that channel's typical forecast error, aggregated over channels (mean or max).

Channels constant over an offline training series (``fit``) have no scale to measure
errors in: they score 0 and are listed in ``constant_channels`` (online learning has no
such mask: a channel constant so far is scored once its variance is floored).

Everything learned is a sufficient statistic (ridge normal equations, Welford moments,
residual scale), so the detector trains offline with ``fit`` and online, per stream, with
``partial_fit``: the same code path, state small enough to live in Redis.

The forecast uses the newest ``min(window - 1, max_lags)`` context values. The normal
equations are quadratic in that lag count (a window of 4096 would otherwise carry a
4095 x 4095 float64 matrix, 134 MB, read and written on every batch); 128 lags keep the
state near 130 KB whatever the window, and a longer window still gives its points to the
statistics that depend on it (scale, evidence, language-model prompts). A state saved with
another lag count (before the cap, or under another setting) keeps its own lag count.

>>> import numpy as np
>>> t = np.arange(2000.0)
>>> series = np.sin(t / 5.0)[:, None]
>>> det = ResidualLinear(window=16).fit(series)
>>> windows = sliding_windows(series[-32:], 16)
>>> spiked = windows.copy(); spiked[:, -1, 0] += 3.0
>>> bool(det.score(spiked).min() > 10 * det.score(windows).max())
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.detectors.base import DetectorConfig, Online, as_windows, sliding_windows


@dataclass(frozen=True)
class ResidualLinearConfig(DetectorConfig):
    window: int = 64  # lags = min(window - 1, max_lags)
    max_lags: int = 128  # caps the (lags x lags) normal equations: state size
    ridge: float = 1.0  # L2 penalty of the normal equations
    warmup: int = 256  # online: points before the first solve (half of them estimate scale)
    refit_every: int = 64  # online: points between re-solves
    min_std: float = 1e-3  # floor on a channel's scale (constant channels stay finite)
    min_residual: float = 0.05  # floor on the typical error, in channel-scale units
    residual_memory: int = 2000  # online: effective sample count of the error scale


class ResidualLinear(Online):
    name = "residual_linear"
    Config = ResidualLinearConfig

    # --- state -------------------------------------------------------------------------
    @property
    def lags(self) -> int:
        """Context values the forecast uses: the learned state's, else the config's."""
        if hasattr(self, "_xtx"):
            return self._xtx.shape[0]
        return min(self.config.window - 1, self.config.max_lags)

    def _init_state(self, channels: int) -> None:
        lags = min(self.config.window - 1, self.config.max_lags)
        self._n = np.zeros(1)  # points seen (Welford count)
        self._mean = np.zeros(channels)
        self._m2 = np.zeros(channels)
        self._xtx = np.zeros((lags, lags))
        self._xty = np.zeros(lags)
        self._samples = np.zeros(1)  # rows accumulated in the normal equations
        self._since_solve = np.zeros(1)
        self._weights = np.zeros(lags)
        self._solved = np.zeros(1)
        self._resid_var = np.ones(channels)

    def state_dict(self) -> dict[str, np.ndarray]:
        names = ("n", "mean", "m2", "xtx", "xty", "samples", "since_solve", "weights",
                 "solved", "resid_var")
        if not hasattr(self, "_n"):  # nothing learned yet
            return {}
        names += ("constant",) if hasattr(self, "_constant") else ()
        return {k: getattr(self, f"_{k}").copy() for k in names}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for key, value in state.items():
            setattr(self, f"_{key}", np.asarray(value, dtype=np.float64).copy())

    @property
    def is_fitted(self) -> bool:
        return bool(getattr(self, "_solved", np.zeros(1))[0])

    @property
    def windows_to_fit(self) -> int | None:
        # the first solve comes with the warm-up's last window
        return 0 if self.is_fitted else max(self.config.warmup - self.points_seen, 1)

    @property
    def constant_channels(self) -> list[int]:
        # only an offline fit knows which channels were constant
        return np.flatnonzero(self._constant).tolist() if hasattr(self, "_constant") else []

    @property
    def points_seen(self) -> int:
        return int(getattr(self, "_n", np.zeros(1))[0])

    # --- learning ----------------------------------------------------------------------
    def _fit(self, train: np.ndarray) -> None:
        self._init_state(train.shape[1])
        self._constant = (np.ptp(train, axis=0) == 0).astype(np.float64)
        windows = sliding_windows(train, self.config.window)
        self._update_moments(train)
        self._accumulate(windows)
        self._solve()
        err = self._standardised_errors(windows)
        self._resid_var = np.maximum(np.mean(err**2, axis=0), self.config.min_residual**2)

    def partial_fit(self, windows: np.ndarray,
                    stamps: np.ndarray | None = None) -> ResidualLinear:
        """Learn online from windows (B, W, C), each contributing its newest point
        (``stamps`` unused: no precedents)."""
        windows = as_windows(windows, self.config.window)
        if not hasattr(self, "_n"):
            self._init_state(windows.shape[2])
        if self.is_fitted:  # track the typical error before the new rows move the fit
            err = self._standardised_errors(windows)
            alpha = 1.0 / min(self._n[0] + 1.0, self.config.residual_memory)
            for row in err**2:
                self._resid_var = np.maximum(
                    (1 - alpha) * self._resid_var + alpha * row, self.config.min_residual**2
                )
        self._update_moments(windows[:, -1, :])
        # The first half of the warm-up only estimates scale, so early rows are not
        # normalised by a scale estimated from a handful of points.
        if self._n[0] >= self.config.warmup // 2:
            self._accumulate(windows)
        self._since_solve += len(windows)
        due = self._since_solve[0] >= self.config.refit_every
        if self._n[0] >= self.config.warmup and (not self.is_fitted or due):
            self._solve()
        return self

    def _update_moments(self, points: np.ndarray) -> None:
        # Chan et al.'s merge of two (count, mean, M2) summaries: stable, vectorised.
        n_b = float(len(points))
        if n_b == 0:
            return
        mean_b = points.mean(axis=0)
        m2_b = ((points - mean_b) ** 2).sum(axis=0)
        n_a = self._n[0]
        total = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / total)
        self._m2 = self._m2 + m2_b + delta**2 * (n_a * n_b / total)
        self._n[:] = total

    def _scale(self) -> np.ndarray:
        var = self._m2 / max(self._n[0] - 1.0, 1.0)
        return np.maximum(np.sqrt(var), self.config.min_std)  # (C,)

    def _design(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, W, C) -> X (B, C, L) and y (B, C) in channel-scale units, last value removed."""
        scale = self._scale()[None, :, None]
        lags = self.lags
        # (B, C, L + 1): the newest lags and the target, lags contiguous
        wc = np.ascontiguousarray(windows[:, -(lags + 1):, :].transpose(0, 2, 1))
        last = wc[:, :, -2:-1]  # newest context value
        x = (wc[:, :, :-1] - last) / scale  # (B, C, L)
        y = (wc[:, :, -1:] - last) / scale  # (B, C, 1)
        return x, y[:, :, 0]

    def _accumulate(self, windows: np.ndarray) -> None:
        x, y = self._design(windows)
        x = x.reshape(-1, x.shape[-1])  # (B*C, L): one weight vector shared by channels
        self._xtx += x.T @ x
        self._xty += x.T @ y.reshape(-1)
        self._samples += len(x)

    def _solve(self) -> None:
        lags = self._xtx.shape[0]
        # Scale the penalty with the sample count so ridge means the same at any size.
        penalty = self.config.ridge * max(self._samples[0], 1.0) / 1000.0
        self._weights = np.linalg.solve(self._xtx + penalty * np.eye(lags), self._xty)
        self._solved[:] = 1
        self._since_solve[:] = 0

    # --- scoring -----------------------------------------------------------------------
    def _standardised_errors(self, windows: np.ndarray) -> np.ndarray:
        x, y = self._design(windows)
        return y - x @ self._weights  # (B, C)

    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        err = self._standardised_errors(windows)
        scores = np.abs(err) / np.sqrt(self._resid_var)
        if hasattr(self, "_constant"):
            scores[:, self._constant > 0] = 0.0
        return scores
