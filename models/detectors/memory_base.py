"""Nearest-normal-precedent detectors: a bounded memory of normal windows per channel.

Score of a window's channel = mean cosine distance to its k nearest memory entries: a
window unlike anything seen in normal operation is far from all of them. Subclasses only
say how a channel window becomes a feature vector (``_features``): raw scaled values
(``raw_knn``) or a language-model embedding of the window's prompt (``embedding_memory``).

Memory is filled by ``fit`` (evenly spaced training windows, so the whole training span is
covered) or online by ``partial_fit`` (every ``stride``-th window offered), bounded by
``memory_size`` per channel with a reservoir (uniform over everything seen, so a burst of
anomalies cannot take over the memory) or recency (a ring: follows drift) policy.

Online, a candidate the threshold let through must also *look* normal to the memory:
with ``admit_quantile`` q it joins only when its distance to the memory is within the
q-quantile of the memory's own leave-one-out distances on every channel (how far normal
windows lie from each other). A long anomaly the threshold misses (a regime the SPOT tail
has absorbed) then cannot teach the memory that it is normal; slow drift still enters,
step by step. The limit is recomputed every ``memory_size / 8`` insertions.

Every entry remembers where its window came from (start and end: timestamps online,
positions in the training series after ``fit``), so a score comes with its evidence: the
nearest normal precedents (``precedents``), i.e. what "normal" looked like.
"""

from __future__ import annotations

import zlib
from abc import abstractmethod
from dataclasses import dataclass

import numpy as np

from models.detectors.base import DetectorConfig, Online, Precedents, as_windows, sliding_windows
from models.detectors.memory_index import MemoryIndex


@dataclass(frozen=True)
class MemoryConfig(DetectorConfig):
    window: int = 64
    stride: int = 16  # one memory candidate every `stride` windows
    k: int = 1  # neighbours averaged
    # entries per channel (float16; 384-d MiniLM embeddings: 768 bytes each): what a
    # served stream keeps in its state
    memory_size: int = 256
    policy: str = "reservoir"  # reservoir | recency
    min_memory: int = 16  # online: entries before the detector scores
    query_batch: int = 256  # windows scored per similarity product (bounds memory use)
    # exact | hnsw | auto: HNSW (faiss, `tsad[ann]`) from memory_index.AUTO_MIN_SIZE entries
    index: str = "auto"
    # online admission: a window judged normal joins the memory only if its distance is
    # within this quantile of the memory's own leave-one-out distances (None: every
    # candidate offered is admitted; NAB streaming, benchmarks/results/memory_nab_stream.md:
    # VUS-PR 25.9 without, 27.7 with 1.0)
    admit_quantile: float | None = 1.0


class MemoryDetector(Online, Precedents):
    """Base class: the memory, its update rules and the search. Subclasses: ``_features``."""

    Config = MemoryConfig

    @abstractmethod
    def _features(self, windows: np.ndarray) -> np.ndarray:
        """(B, W, C) windows -> (B, C, D) float32 features (any scale: we normalise)."""

    # --- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "_memory"):
            return {}
        state = {"memory": self._memory.copy(), "filled": self._filled.copy(),
                 "offered": self._offered.copy(), "kept": self._kept.copy(),
                 "stamps": self._stamps.copy(), "refused": self._refused.copy()}
        if hasattr(self, "_admit_limit"):
            state |= {"admit_limit": self._admit_limit.copy(), "admit_at": self._admit_at.copy()}
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            self._memory = np.asarray(state["memory"], dtype=np.float16).copy()
            self._filled = np.asarray(state["filled"], dtype=np.int64).copy()
            self._offered = np.asarray(state["offered"], dtype=np.int64).copy()
            self._kept = np.asarray(state["kept"], dtype=np.int64).copy()
            stamps = state.get("stamps")  # absent in states written before precedents
            self._stamps = (np.asarray(stamps, dtype=np.float64).copy() if stamps is not None
                            else np.full((self._memory.shape[1], 2), np.nan))
            self._refused = np.asarray(state.get("refused", np.zeros(1)), dtype=np.int64).copy()
            if "admit_limit" in state:
                self._admit_limit = np.asarray(state["admit_limit"], dtype=np.float64).copy()
                self._admit_at = np.asarray(state["admit_at"], dtype=np.int64).copy()
            self._search().reset()

    def _search(self) -> MemoryIndex:
        """The search over the memory (lazy: the constructor only stores the config). Every
        write to the memory goes through ``mark_changed`` or ``reset``."""
        if not hasattr(self, "_index"):
            self._index = MemoryIndex(self.config.index)
        return self._index

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
        # (M, 2) start and end of each entry's window; NaN where unknown
        self._stamps = np.full((self.config.memory_size, 2), np.nan)
        self._refused = np.zeros(1, dtype=np.int64)  # online candidates that looked abnormal
        self.__dict__.pop("_admit_limit", None)
        self._search().reset()

    # --- learning ----------------------------------------------------------------------
    def _fit(self, train: np.ndarray) -> None:
        window, stride = self.config.window, self.config.stride
        windows = sliding_windows(train, window, stride)
        starts = np.arange(len(windows)) * stride
        pick = _evenly(len(windows), self.config.memory_size)
        stamps = np.stack([starts[pick], starts[pick] + window - 1], axis=1)
        self.fit_features(self._features(windows[pick]), stamps.astype(np.float64))

    def fit_features(self, feats: np.ndarray,
                     stamps: np.ndarray | None = None) -> MemoryDetector:
        """Fill the memory from precomputed training features (B, C, D), e.g. the
        embeddings ``tsad embed`` wrote; at most ``memory_size``, evenly spaced.
        ``stamps`` (B, 2): where each window starts and ends (for precedents)."""
        pick = _evenly(len(feats), self.config.memory_size)
        feats = _normalise(feats[pick])
        self._init_memory(feats.shape[1], feats.shape[2])
        self._memory[:, : len(feats)] = feats.transpose(1, 0, 2)
        if stamps is not None:
            self._stamps[: len(feats)] = np.asarray(stamps, dtype=np.float64)[pick]
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

    def partial_fit(self, windows: np.ndarray,
                    stamps: np.ndarray | None = None) -> MemoryDetector:
        """Offer windows judged normal; every ``stride``-th one becomes a candidate.
        ``stamps`` (B, 2): each window's start and end timestamps (for precedents)."""
        windows = as_windows(windows, self.config.window)
        offered = int(self._offered[0]) if hasattr(self, "_offered") else 0
        take = np.nonzero((offered + np.arange(len(windows))) % self.config.stride == 0)[0]
        if len(take):
            feats = _normalise(self._features(windows[take]))
            if not hasattr(self, "_memory"):
                self._init_memory(feats.shape[1], feats.shape[2])
            admit = self._admissible(feats)
            for i, f, ok in zip(take, feats, admit, strict=True):
                if ok:
                    self._insert(f, None if stamps is None else stamps[i])
            self._refused += int((~admit).sum())
        if hasattr(self, "_offered"):
            self._offered += len(windows)
        return self

    @property
    def refused(self) -> int:
        """Online candidates kept out because they looked unlike the memory."""
        return int(self._refused[0]) if hasattr(self, "_refused") else 0

    def _admissible(self, feats: np.ndarray) -> np.ndarray:
        """(B, C, D) unit candidates -> (B,) bool: close enough to the memory to join."""
        q = self.config.admit_quantile
        if q is None or not self.is_fitted or int(self._filled[0]) < 2:
            return np.ones(len(feats), dtype=bool)
        kept = int(self._kept[0])
        if (not hasattr(self, "_admit_limit")
                or kept - int(self._admit_at[0]) >= max(1, self.config.memory_size // 8)):
            self._admit_limit = np.quantile(self.calibration_scores(), q, axis=0)  # (C,)
            self._admit_at = np.array([kept])
        dist, _ = self.nearest(feats)  # (B, C)
        return (dist <= self._admit_limit + 1e-6).all(axis=1)

    def _insert(self, feat: np.ndarray, stamp: np.ndarray | None = None) -> None:
        """feat: (C, D), stamp: (2,). Bounded insertion by the configured policy."""
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
            self._stamps[slot] = np.nan if stamp is None else stamp
            self._search().mark_changed(slot)  # all channels share the slot
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
        # cosine: rows are unit vectors; (B, C, k) each, nearest first
        sims, slots = self._search().search(self._memory[:, :filled], feats,
                                            min(self.config.k, filled))
        dist = np.clip(1.0 - sims.mean(axis=2), 0.0, 2.0)
        return dist.astype(np.float64), slots[:, :, 0]

    def precedents(self, windows: np.ndarray, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` nearest normal precedents of each channel window, nearest first:
        (B, W, C) -> cosine distances (B, C, n) and their windows' [start, end] (B, C, n, 2).

        >>> from models.detectors.raw_knn import RawKnn
        >>> series = np.array([0.0, 0, 0, 1, 2, 3, 0, 0, 0])
        >>> det = RawKnn(window=4, stride=1, min_memory=1).fit(series)
        >>> dist, stamps = det.precedents(series[None, 3:7, None], n=2)
        >>> dist[0, 0].round(3).tolist(), stamps[0, 0].tolist()
        ([0.0, 0.397], [[3.0, 6.0], [4.0, 7.0]])
        """
        windows = as_windows(windows, self.config.window)
        feats = _normalise(self._features(windows))  # (B, C, D)
        filled = int(self._filled[0])
        sims, slots = self._search().search(self._memory[:, :filled], feats, min(n, filled))
        dist = np.clip(1.0 - sims, 0.0, 2.0)  # (B, C, n), nearest first
        return dist.astype(np.float64), self._stamps[slots]


def _evenly(total: int, at_most: int) -> np.ndarray:
    """Indices of at most ``at_most`` of ``total`` items, evenly spaced, ends included.

    >>> _evenly(5, 10).tolist(), _evenly(9, 3).tolist()
    ([0, 1, 2, 3, 4], [0, 4, 8])
    """
    if total <= at_most:
        return np.arange(total)
    return np.linspace(0, total - 1, at_most).round().astype(int)


def _normalise(feats: np.ndarray) -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float32)
    norm = np.linalg.norm(feats, axis=-1, keepdims=True)
    return feats / np.maximum(norm, 1e-12)
