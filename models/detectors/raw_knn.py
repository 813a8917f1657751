"""Raw-window nearest neighbours: the memory detector without the language model.

Each channel window is rescaled to integers 1..100 across its own min..max (the same
scaling the prompts use for their value lists) and compared by cosine distance to the
nearest normal training windows. This is the ablation of ``embedding_memory``: same
memory, same search, same spreading; only the language-model embedding is missing.

>>> import numpy as np
>>> series = np.sin(np.arange(600.0) / 6.0)[:, None]
>>> det = RawKnn(window=32, stride=4).fit(series)
>>> w = sliding_windows(series[-64:], 32)
>>> bool(det.score(w).max() < 0.05)
True
"""

from __future__ import annotations

import numpy as np

from models.detectors.base import sliding_windows  # noqa: F401 - used in the doctest
from models.detectors.memory_base import MemoryDetector


def scale_windows(windows: np.ndarray, levels: int = 99) -> np.ndarray:
    """(B, W, C) -> (B, C, W) integers 1..levels+1 over each window's own range.

    A constant window maps to all ones, so constant windows match each other exactly.
    """
    # computed in the windows' own (B, W, C) layout, in place after the first division
    # (a wide stream's chunk is 64 x 64 x C values), and returned transposed
    lo = windows.min(axis=1, keepdims=True)
    span = windows.max(axis=1, keepdims=True) - lo
    varies = span > 0
    scaled = (windows - lo) / np.where(varies, span, 1.0)
    if not varies.all():  # 0 already where the span is 0; this clears a NaN span's values
        np.copyto(scaled, 0.0, where=~varies)
    scaled *= levels
    np.round(scaled, out=scaled)
    scaled += 1.0
    return scaled.transpose(0, 2, 1)


class RawKnn(MemoryDetector):
    name = "raw_knn"

    def _features(self, windows: np.ndarray) -> np.ndarray:
        return scale_windows(windows).astype(np.float32)
