"""Extreme value theory for thresholds: fit a Generalised Pareto Distribution (GPD) to
excesses over a high threshold and turn it into an extreme quantile (Siffer et al.,
"Anomaly Detection in Streams with Extreme Value Theory", KDD 2017).

The fit is maximum likelihood through Grimshaw's reduction: with x = gamma / sigma fixed,
the likelihood is maximised by gamma = (A + B) / d in closed form (A = sum log(1 + x y)
over the d observed excesses, B the same over right-censored ones), which leaves a
one-dimensional profile likelihood in x,

    L(x) = -d log((A + B) / (d x)) - A - d,   x in (-1/Y_max, 0) or (0, 2(Ybar - Y_min)/Y_min^2)

(Grimshaw's bounds). It is maximised by a vectorised grid scan on each side of 0 and two
zoomed grids around the best point, then compared with the exponential case (x -> 0):
deterministic, no optimiser start points, about a millisecond for 500 peaks. Without
censored values the stationary points are exactly the roots of Grimshaw's u(x) v(x) = 1.
Censoring is what lets SPOT keep its alarms out of the tail without truncating it
(``models.thresholds``).
Fewer than ``MIN_PEAKS_MLE`` peaks fall back to the method of moments.

>>> rng = np.random.default_rng(0)
>>> fit = fit_gpd(rng.exponential(2.0, 5000))
>>> abs(fit.gamma) < 0.05, round(fit.sigma, 1)
(True, 2.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_PEAKS_MLE = 10
_GRID = 48  # grid points on each side of x = 0
_ZOOM = 17  # points of each refinement


@dataclass(frozen=True)
class GPDFit:
    gamma: float  # shape (xi); 0 = exponential tail, > 0 heavy tail, < 0 bounded tail
    sigma: float  # scale, > 0
    method: str  # grimshaw | exponential | moments


def gpd_loglik(y: np.ndarray, gamma: float, sigma: float,
               censored: np.ndarray | None = None) -> float:
    """Log-likelihood of excesses ``y`` (and right-censored ``censored``) under
    GPD(gamma, sigma); -inf outside the support."""
    c = np.zeros(0) if censored is None else np.asarray(censored, dtype=np.float64)
    if sigma <= 0:
        return -math.inf
    n = len(y)
    if abs(gamma) < 1e-12:
        return -n * math.log(sigma) - (float(y.sum()) + float(c.sum())) / sigma
    s, sc = 1.0 + gamma * y / sigma, 1.0 + gamma * c / sigma
    if (s <= 0).any() or (sc <= 0).any():
        return -math.inf
    return (-n * math.log(sigma) - (1.0 + 1.0 / gamma) * float(np.log(s).sum())
            - float(np.log(sc).sum()) / gamma)


def _profile(y: np.ndarray, c: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Profile log-likelihood in x = gamma / sigma (gamma maximised out: (A + B) / d)."""
    d = len(y)
    a = np.log1p(np.multiply.outer(x, y)).sum(axis=-1)
    b = np.log1p(np.multiply.outer(x, c)).sum(axis=-1) if len(c) else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        out = -d * np.log((a + b) / (d * x)) - a - d
    return np.where(np.isfinite(out), out, -np.inf)


def _maximise(y: np.ndarray, c: np.ndarray, grid: np.ndarray) -> float | None:
    """Argmax of the profile on a grid, zoomed in twice around the best point."""
    x = None
    for _ in range(3):
        ll = _profile(y, c, grid)
        i = int(np.argmax(ll))
        if not np.isfinite(ll[i]):
            return x
        x = float(grid[i])
        grid = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], _ZOOM)
    return x


def fit_moments(y: np.ndarray) -> GPDFit:
    """Method of moments: quick and always defined (needs gamma < 1/2 to be consistent)."""
    m, var = float(y.mean()), float(y.var())
    if var <= 0:
        return GPDFit(0.0, max(m, 1e-12), "moments")
    r = m * m / var
    return GPDFit(0.5 * (1.0 - r), max(0.5 * m * (r + 1.0), 1e-12), "moments")


def fit_gpd(excesses: np.ndarray, censored: np.ndarray | None = None) -> GPDFit:
    """Maximum-likelihood GPD(gamma, sigma) for positive excesses over a threshold.

    ``censored``: excesses known only to be at least this large (right-censored), e.g.
    scores that were alarms: they weigh as "beyond the alarm threshold", never more.
    """
    y = np.asarray(excesses, dtype=np.float64)
    y = y[y > 0]
    c = np.zeros(0) if censored is None else np.asarray(censored, dtype=np.float64)
    c = c[c > 0]
    if len(y) == 0:
        return GPDFit(0.0, max(float(c.sum()), 1e-12), "exponential")
    ymean, ymin = float(y.mean()), float(y.min())
    ymax = max(float(y.max()), float(c.max()) if len(c) else 0.0)
    if len(y) < MIN_PEAKS_MLE or ymax - ymin <= 1e-12 * ymax:
        return fit_moments(np.concatenate([y, c]))
    d = len(y)
    sigma0 = (float(y.sum()) + float(c.sum())) / d  # exponential case, the limit x -> 0
    best, best_ll = GPDFit(0.0, sigma0, "exponential"), -d * math.log(sigma0) - d
    eps = 1e-8 / ymean
    hi = max(2 * (ymean - ymin) / ymin**2, 1.0 / ymean)  # Grimshaw's upper bound
    for grid in (np.linspace(-1.0 / ymax + eps, -eps, _GRID), np.geomspace(eps, hi, _GRID)):
        x = _maximise(y, c, grid)
        if x is None:
            continue
        gamma = (float(np.log1p(x * y).sum()) + float(np.log1p(x * c).sum())) / d
        sigma = gamma / x
        ll = gpd_loglik(y, gamma, sigma, c)
        if sigma > 0 and ll > best_ll:
            best, best_ll = GPDFit(gamma, sigma, "mle"), ll
    return best


def gpd_quantile(t: float, fit: GPDFit, q: float, n: int, n_peaks: int) -> float:
    """z_q = t + sigma/gamma ((q n / N_t)^-gamma - 1): exceeded with probability q.

    >>> round(gpd_quantile(0.0, GPDFit(0.0, 1.0, "exponential"), 1e-3, 100, 100), 3)
    6.908
    """
    r = q * n / max(n_peaks, 1)
    if abs(fit.gamma) < 1e-8:
        return t - fit.sigma * math.log(r)
    return t + fit.sigma / fit.gamma * (r ** (-fit.gamma) - 1.0)
