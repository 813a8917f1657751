"""Nearest-normal-precedent detectors: a bounded memory of normal windows per channel.

Score of a window's channel = mean cosine distance to its k nearest memory entries: a
window unlike anything seen in normal operation is far from all of them. Subclasses only
say how a channel window becomes a feature vector (``_features``): raw scaled values
(``raw_knn``) or a language-model embedding of the window's prompt (``embedding_memory``).

Memory is filled by ``fit`` (evenly spaced training windows, so the whole training span is
covered) or online by ``partial_fit`` (every ``stride``-th window offered), bounded by
``memory_size`` per channel with a reservoir (uniform over everything seen, so a burst of
anomalies cannot take over the memory) or recency (a ring: follows drift) policy.
"""

from __future__ import annotations

import zlib
from abc import abstractmethod
from dataclasses import dataclass

import numpy as np

from models.detectors.base import Detector, DetectorConfig, as_windows, sliding_windows


@dataclass(frozen=True)
class MemoryConfig(DetectorConfig):
    window: int = 64
    stride: int = 16  # one memory candidate every `stride` windows
    k: int = 1  # neighbours averaged
    memory_size: int = 2048  # entries per channel
    policy: str = "reservoir"  # reservoir | recency
    min_memory: int = 16  # online: entries before the detector scores
    query_batch: int = 256  # windows scored per similarity product (bounds memory use)


class MemoryDetector(Detector):
    """Base class: the memory, its update rules and the search. Subclasses: ``_features``."""

    Config = MemoryConfig
    supports_online = True

    @abstractmethod
    def _features(self, windows: np.ndarray) -> np.ndarray:
        """(B, W, C) windows -> (B, C, D) float32 features (any scale: we normalise)."""

    # --- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "_memory"):
            return {}
        return {"memory": self._memory.copy(), "filled": self._filled.copy(),
                "offered": self._offered.copy(), "kept": self._kept.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            self._memory = np.asarray(state["memory"], dtype=np.float16).copy()
            self._filled = np.asarray(state["filled"], dtype=np.int64).copy()
            self._offered = np.asarray(state["offered"], dtype=np.int64).copy()
            self._kept = np.asarray(state["kept"], dtype=np.int64).copy()

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "_filled") and int(self._filled[0]) >= max(
            1, min(self.config.min_memory, self.config.memory_size))

    @property
    def memory_entries(self) -> int:
        return int(self._filled[0]) if hasattr(self, "_filled") else 0

    @property
    def memory_bytes(self) -> int:
        return int(self._memory.nbytes) if hasattr(self, "_memory") else 0

    def _init_memory(self, channels: int, dim: int) -> None:
        # float16: half the bytes in Redis and in artifacts, the precision of the cache
        self._memory = np.zeros((channels, self.config.memory_size, dim), dtype=np.float16)
        self._filled = np.zeros(1, dtype=np.int64)  # entries in use (same for all channels)
        self._offered = np.zeros(1, dtype=np.int64)  # windows offered to partial_fit
        self._kept = np.zeros(1, dtype=np.int64)  # candidates considered (reservoir's n)

    # --- learning ----------------------------------------------------------------------
    def _fit(self, train: np.ndarray) -> None:
        windows = sliding_windows(train, self.config.window, self.config.stride)
        if len(windows) > self.config.memory_size:  # evenly spaced: cover the whole span
            pick = np.linspace(0, len(windows) - 1, self.config.memory_size).round()
            windows = windows[pick.astype(int)]
        self.fit_features(self._features(windows))

    def fit_features(self, feats: np.ndarray) -> MemoryDetector:
        """Fill the memory from precomputed training features (B, C, D), e.g. the
        embeddings ``tsad embed`` wrote; at most ``memory_size``, evenly spaced."""
        if len(feats) > self.config.memory_size:
            feats = feats[np.linspace(0, len(feats) - 1, self.config.memory_size).round()
                          .astype(int)]
        feats = _normalise(feats)
        self._init_memory(feats.shape[1], feats.shape[2])
        self._memory[:, : len(feats)] = feats.transpose(1, 0, 2)
        self._filled[:] = len(feats)
        self._kept[:] = len(feats)
        return self

    def score_features(self, feats: np.ndarray) -> np.ndarray:
        """Channel scores (B, C) of precomputed features (B, C, D)."""
        return np.concatenate([
            self.nearest(_normalise(feats[lo:lo + self.config.query_batch]))[0]
            for lo in range(0, len(feats), self.config.query_batch)])

    def calibration_scores(self) -> np.ndarray:
        """Leave-one-out channel scores (M, C) of the memory's own entries: how far a
        normal window lies from the *other* normal windows. Calibrates scores on training
        data alone, with no held-out split."""
        filled = int(self._filled[0])
        memory = self._memory[:, :filled].astype(np.float32)  # (C, M, D)
        sims = np.einsum("cmd,cnd->cmn", memory, memory)
        idx = np.arange(filled)
        sims[:, idx, idx] = -np.inf  # never your own neighbour
        k = min(self.config.k, filled - 1)
        top = -np.partition(-sims, k - 1, axis=2)[:, :, :k]
        return np.clip(1.0 - top.mean(axis=2), 0.0, 2.0).T.astype(np.float64)

    def partial_fit(self, windows: np.ndarray) -> MemoryDetector:
        """Offer windows judged normal; every ``stride``-th one becomes a candidate."""
        windows = as_windows(windows, self.config.window)
        offered = int(self._offered[0]) if hasattr(self, "_offered") else 0
        take = np.nonzero((offered + np.arange(len(windows))) % self.config.stride == 0)[0]
        if len(take):
            feats = _normalise(self._features(windows[take]))
            if not hasattr(self, "_memory"):
                self._init_memory(feats.shape[1], feats.shape[2])
            for f in feats:
                self._insert(f)
        if hasattr(self, "_offered"):
            self._offered += len(windows)
        return self

    def _insert(self, feat: np.ndarray) -> None:
        """feat: (C, D). Bounded insertion by the configured policy."""
        size, filled, n = self.config.memory_size, int(self._filled[0]), int(self._kept[0])
        if filled < size:
            slot = filled
            self._filled += 1
        elif self.config.policy == "recency":
            slot = n % size  # ring: overwrite the oldest
        else:  # reservoir (Vitter's R) with a deterministic hash of n as the coin
            draw = zlib.crc32(n.to_bytes(8, "little")) % (n + 1)
            slot = draw if draw < size else -1
        if slot >= 0:
            self._memory[:, slot] = feat
        self._kept += 1

    # --- scoring -----------------------------------------------------------------------
    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        out = [self.score_features(self._features(windows[lo:lo + self.config.query_batch]))
               for lo in range(0, len(windows), self.config.query_batch)]
        return np.concatenate(out)

    def nearest(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, D) unit features -> (mean distance to k nearest (B, C), index of the
        nearest entry (B, C))."""
        filled = int(self._filled[0])
        memory = self._memory[:, :filled].astype(np.float32)  # (C, M, D)
        sims = np.einsum("bcd,cmd->bcm", feats, memory)  # cosine: rows are unit vectors
        k = min(self.config.k, filled)
        top = -np.partition(-sims, k - 1, axis=2)[:, :, :k] if k < filled else sims
        dist = np.clip(1.0 - top.mean(axis=2), 0.0, 2.0)
        return dist.astype(np.float64), sims.argmax(axis=2)


def _normalise(feats: np.ndarray) -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float32)
    norm = np.linalg.norm(feats, axis=-1, keepdims=True)
    return feats / np.maximum(norm, 1e-12)
