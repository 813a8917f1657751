"""T-SMOTE-style oversampling of the minority class (SPEAR, section III-C).

For a synthetic sample: pick a minority sample x_i, one of its k nearest minority
neighbours x_nn (Euclidean over the whole window), and lambda ~ U(0, 1):

    x_syn = x_i + lambda (x_nn - x_i)

The paper's example, with lambda = 0.5:

>>> x1 = np.array([4, 3, 4, 8, 7, 3.0]); x2 = np.array([3, 4, 4, 3, 7, 4.0])
>>> interpolate(x1, x2, 0.5).tolist()
[3.5, 3.5, 4.0, 5.5, 7.0, 3.5]
"""

from __future__ import annotations

import numpy as np


def interpolate(x: np.ndarray, x_nn: np.ndarray, lam: float | np.ndarray) -> np.ndarray:
    return x + lam * (x_nn - x)


def minority_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """(M, ...) minority samples -> (M, min(k, M-1)) indices of their nearest others."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    sq = (flat ** 2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * flat @ flat.T
    np.fill_diagonal(d2, np.inf)
    k = min(k, len(x) - 1)
    return np.argsort(d2, axis=1, kind="stable")[:, :k]


def tsmote(x: np.ndarray, y: np.ndarray, k: int = 5, ratio: float = 1.0,
           seed: int = 0, extra: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Append synthetic minority samples until minority = ``ratio`` x majority.

    x: (N, ...) samples; y: (N,) binary labels; extra: optional (N, ...) per-sample arrays
    carried along (e.g. point masks: a synthetic sample gets the union of its parents').
    Returns (x, y, extra) with the originals first. With fewer than two minority samples
    nothing can be interpolated and the inputs come back unchanged.
    """
    x, y = np.asarray(x), np.asarray(y).astype(np.int64)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples, y {len(y)}")
    counts = np.bincount(y, minlength=2)
    minority = int(np.argmin(counts))
    idx = np.flatnonzero(y == minority)
    n_new = int(ratio * counts[1 - minority]) - len(idx)
    if len(idx) < 2 or n_new <= 0:
        return x, y, extra
    rng = np.random.default_rng(seed)
    nn = minority_neighbours(x[idx], k)  # (M, k) positions within idx
    base = rng.integers(0, len(idx), n_new)
    partner = nn[base, rng.integers(0, nn.shape[1], n_new)]
    lam = rng.uniform(0, 1, n_new).reshape((-1,) + (1,) * (x.ndim - 1))
    xi, xn = x[idx[base]], x[idx[partner]]
    x_syn = interpolate(xi.astype(np.float64), xn.astype(np.float64), lam).astype(x.dtype)
    y_syn = np.full(n_new, minority, dtype=np.int64)
    out_extra = None
    if extra is not None:
        extra = np.asarray(extra)
        e_syn = extra[idx[base]] | extra[idx[partner]] if extra.dtype == bool else \
            np.maximum(extra[idx[base]], extra[idx[partner]])
        out_extra = np.concatenate([extra, e_syn])
    return np.concatenate([x, x_syn]), np.concatenate([y, y_syn]), out_extra
