"""Synthetic anomalies for training window classifiers (SPEAR): copies of normal windows
with one injected anomaly each and the points it changed, and random-length suffixes for
a model that reads windows of any length."""

from __future__ import annotations

import numpy as np

INJECT_KINDS = ("spike", "shift", "trend", "volatility")


def inject_anomalies(raw: np.ndarray, sd: np.ndarray, fraction: float,
                     rng: np.random.Generator, kinds: tuple[str, ...] = INJECT_KINDS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of a random ``fraction`` of windows (N, T), each with one anomaly of a random
    kind at a random point, sized in units of its series' std ``sd`` (N,). Returns the
    copies, their point masks (the points the anomaly changed) and the rows copied.

    >>> x, m, _ = inject_anomalies(np.zeros((4, 10)), np.ones(4), 1.0,
    ...                            np.random.default_rng(0))
    >>> x.shape, bool(m.any(1).all())
    ((4, 10), True)
    """
    n, t = raw.shape
    pick = np.sort(rng.choice(n, int(round(fraction * n)), replace=False))
    x = raw[pick].copy()
    masks = np.zeros(x.shape, dtype=bool)
    s = np.where(sd[pick] > 0, sd[pick], 1.0)
    for i in range(len(x)):
        kind = kinds[rng.integers(len(kinds))]
        k = int(rng.integers(0, t))
        sign = rng.choice([-1.0, 1.0])
        if kind == "spike" or t < 4:
            x[i, k] += sign * rng.uniform(3, 6) * s[i]
            masks[i, k] = True
        elif kind == "shift":
            x[i, k:] += sign * rng.uniform(2, 4) * s[i]
            masks[i, k:] = True
        elif kind == "trend":
            ramp = np.arange(t - k) / max(t - k, 1)
            x[i, k:] += sign * rng.uniform(3, 6) * s[i] * ramp
            masks[i, k + 1:] = True
            masks[i, k] = masks[i, k] or t - k == 1
        else:  # volatility burst
            x[i, k:] += rng.normal(0, rng.uniform(1.5, 3) * s[i], t - k)
            masks[i, k:] = True
    return x, masks, pick


def random_suffixes(tokens: np.ndarray, masks: np.ndarray, min_length: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep a random-length newest part (min_length..T) of each window, left-aligned and
    right-padded: variable-length training for a variable-length model."""
    n, t = tokens.shape
    lengths = rng.integers(min_length, t + 1, n)
    out_t, out_m = np.empty_like(tokens), np.zeros_like(masks)
    out_t[:] = tokens[:, :1]
    for i, ln in enumerate(lengths):
        out_t[i, :ln] = tokens[i, t - ln:]
        out_m[i, :ln] = masks[i, t - ln:]
    return out_t, out_m, lengths
