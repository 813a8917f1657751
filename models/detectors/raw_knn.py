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
    wc = windows.transpose(0, 2, 1)
    lo = wc.min(axis=2, keepdims=True)
    span = wc.max(axis=2, keepdims=True) - lo
    scaled = np.where(span > 0, (wc - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.round(scaled * levels) + 1.0


class RawKnn(MemoryDetector):
    name = "raw_knn"

    def _features(self, windows: np.ndarray) -> np.ndarray:
        return scale_windows(windows).astype(np.float32)
