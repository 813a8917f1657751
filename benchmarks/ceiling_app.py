"""The service with one more detector, ``none``, registered for the throughput benchmark
only: it scores every window 0 (never an alert) and learns nothing. A stream configured
with it pays everything a request costs but the detector: validation, auth, the store's
round trips, the scoring loop's bookkeeping (likelihood, threshold, alerts) and the
response. Its rows are the service's own ceiling.

    python -m uvicorn benchmarks.ceiling_app:app   # from the repository root
"""

from __future__ import annotations

import numpy as np

from models.detectors import REGISTRY
from models.detectors.base import Online


class NoDetector(Online):
    name = "none"

    def _fit(self, train: np.ndarray) -> None:
        pass

    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        return np.zeros((windows.shape[0], windows.shape[2]))

    def partial_fit(self, windows: np.ndarray, stamps: np.ndarray | None = None) -> NoDetector:
        return self  # nothing to learn

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass

    @property
    def is_fitted(self) -> bool:
        return True


REGISTRY[NoDetector.name] = NoDetector

from service.main import app  # noqa: E402 - after the registration its settings check

__all__ = ["app"]
