"""What explains an anomalous point: the channels that led its score, and, for a detector
with a memory (``Precedents``), the nearest normal windows of those channels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.detectors.base import Detector, Precedents


@dataclass
class ChannelShare:
    channel: str
    share: float


@dataclass
class Precedent:
    """A normal window from the detector's memory near the scored one."""

    channel: str
    start: float  # timestamps (positions in the training series for a fitted artifact)
    end: float
    distance: float  # cosine distance, 0 = identical


@dataclass
class Explanation:
    top_channels: list[ChannelShare]
    precedents: list[Precedent] | None


class Explainer:
    def __init__(self, names: list[str], top_channels: int, precedents: int) -> None:
        self.names = names
        self.top_channels = top_channels
        self.precedents = precedents

    def top(self, channel_scores: np.ndarray) -> np.ndarray:
        return np.argsort(-channel_scores)[: self.top_channels]

    def shares(self, channel_scores: np.ndarray) -> list[ChannelShare]:
        total = float(channel_scores.sum()) or 1.0
        return [ChannelShare(self.names[i], round(float(channel_scores[i]) / total, 4))
                for i in self.top(channel_scores)]

    def nearest_normal(self, detector: Detector, windows: np.ndarray,
                       channel_scores: np.ndarray,
                       anomalous: np.ndarray) -> dict[int, list[Precedent]]:
        """Anomalous point i -> the nearest normal windows of its top channels (memory
        detectors only): what "normal" looked like."""
        n = self.precedents
        rows = np.flatnonzero(anomalous)
        if not (n and len(rows) and isinstance(detector, Precedents)):
            return {}
        dist, stamps = detector.precedents(windows[rows], n)  # (A, C, n), (A, C, n, 2)
        out: dict[int, list[Precedent]] = {}
        for a, i in enumerate(rows):
            out[int(i)] = [
                Precedent(self.names[c], float(stamps[a, c, j, 0]), float(stamps[a, c, j, 1]),
                          round(float(dist[a, c, j]), 4))
                for c in self.top(channel_scores[i]) for j in range(dist.shape[2])
                if np.isfinite(stamps[a, c, j]).all()]
        return out
