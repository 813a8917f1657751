"""Per-stream online scoring: the stream's detector, threshold and alert tracker, and
their state blob.

``StreamScorer.process`` takes the points returned by an append (context, then the new
points) and scores each new point whose window is full. Work goes in chunks: within a
chunk the detector and threshold are fixed, so scoring is one vectorised call; between
chunks the detector learns from the chunk's points judged normal (anomalies never teach
the model what normal is). The threshold decides point by point (SPOT moves with every
peak); the alert tracker then sees every scored point in order.

The blob also carries the stream's operator feedback (``fb.*``) and, for a stream bound
to a SPEAR artifact, its own adapted soft prompts and head (``ada.*``): the stream then
scores with an adapted copy of the artifact, which stays shared and unchanged
(``service/feedback.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import safetensors.numpy

from models.calibration import AnomalyLikelihood
from models.detectors import Detector, build_detector
from models.streaming import OnlineLoop, Scored
from service.alerts.model import incarnation
from service.alerts.tracker import AlertRules, AlertTracker
from service.artifacts import Artifact, artifact_name, load_artifact
from service.feedback import FeedbackSet
from service.settings import Settings
from service.stores.base import StreamMeta
from service.thresholds import build_threshold, stream_spec

STATE_VERSION = 1


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
class PointResult:
    score: float | None
    likelihood: float | None  # in [0, 1]: the score against the stream's recent scores
    anomaly: bool
    threshold: float | None
    status: str  # warming_up | scored
    top_channels: list[ChannelShare] | None = None
    precedents: list[Precedent] | None = None


class StreamScorer:
    def __init__(self, meta: StreamMeta, settings: Settings) -> None:
        self.meta = meta
        self.settings = settings
        spec = stream_spec(settings, meta)
        name = artifact_name(meta.detector)
        # a fitted artifact is shared, read-only, by every stream bound to it: it is not
        # part of the stream's state blob
        self.shared_detector = name is not None
        self.artifact: Artifact | None = None
        # the stream's own soft prompts and head (adapted from the artifact's), if any
        self.adaptation: dict[str, np.ndarray] | None = None
        self.feedback = FeedbackSet(meta.window, meta.channels)
        if name is not None:
            artifact = self.artifact = load_artifact(settings.artifacts_dir, name)
            self.detector: Detector = artifact.detector
            if not (meta.threshold or {}).get("kind") and artifact.threshold is not None:
                spec = replace(spec, kind="fixed", value=artifact.threshold)
        else:
            self.detector = build_detector(meta.detector, window=meta.window, defaults={
                "warmup": settings.warmup_points, "memory_size": settings.memory_size,
                "admit_quantile": settings.memory_admit_quantile or None,
                "max_lags": settings.residual_max_lags})
        if self.detector.record_scores and not (meta.threshold or {}).get("kind"):
            # its scores are ratios to the stream's own record: a fixed cut means the same
            # on every stream, where a fitted tail would chase the records it should flag
            spec = replace(spec, kind="fixed", value=self.detector.record_threshold)
        self.threshold = build_threshold(spec)
        stride = settings.costly_score_stride if self.detector.costly else 1
        self.loop = OnlineLoop(
            self.detector, self.threshold,
            AnomalyLikelihood(settings.likelihood_history, settings.likelihood_min_scores),
            score_stride=stride, online=not self.shared_detector)
        self.tracker = AlertTracker(meta.stream, self.channel_names(), alert_rules(settings),
                                    incarnation(meta.stream, meta.created_at))
        self.points_until_scored: int | None = None  # after process(): see OnlineLoop
        # stream index -> (top channels, precedents) of anomalous points, per process() call
        self._explained: dict[int, tuple[list[ChannelShare], list[Precedent] | None]] = {}

    def channel_names(self) -> list[str]:
        return self.meta.channel_names or [str(i) for i in range(self.meta.channels)]

    # --- state -------------------------------------------------------------------------
    @classmethod
    def from_blob(cls, meta: StreamMeta, settings: Settings, blob: bytes | None) -> StreamScorer:
        scorer = cls(meta, settings)
        if blob:
            arrays = safetensors.numpy.load(blob)
            if int(arrays.pop("version", np.zeros(1))[0]) == STATE_VERSION:
                if not scorer.shared_detector:
                    scorer.detector.load_state_dict(_strip(arrays, "det."))
                scorer.threshold.load_state_dict(_strip(arrays, "thr."))
                scorer.tracker.load_state_dict(_strip(arrays, "alr."))
                scorer.loop.load_state_dict(_strip(arrays, "loop."))
                scorer.loop.likelihood.load_state_dict(_strip(arrays, "lik."))
                scorer.feedback = FeedbackSet.from_state(_strip(arrays, "fb."),
                                                         meta.window, meta.channels)
                adaptation = _strip(arrays, "ada.")
                if adaptation:
                    scorer.set_adaptation(adaptation)
        return scorer

    def set_adaptation(self, adaptation: dict[str, np.ndarray]) -> bool:
        """Score with the stream's own soft prompts and head (``prompts``, ``head.weight``,
        ``head.bias``, ``base``: the artifact's digest, ``info``). An adaptation of another
        version of the artifact is dropped (False): the feedback stays to adapt again."""
        art = self.artifact
        base = bytes(np.asarray(adaptation["base"], dtype=np.uint8)).decode()
        if art is None or not art.adaptable or base != art.digest:
            self.adaptation = None
            return False
        self.detector = self.loop.detector = art.detector.with_parameters(adaptation)
        self.adaptation = dict(adaptation)
        return True

    def to_blob(self) -> bytes:
        arrays = {"version": np.array([STATE_VERSION])}
        arrays |= {f"loop.{k}": v for k, v in self.loop.state_dict().items()}
        arrays |= {f"lik.{k}": v for k, v in self.loop.likelihood.state_dict().items()}
        if not self.shared_detector:
            arrays |= {f"det.{k}": v for k, v in self.detector.state_dict().items()}
        arrays |= {f"thr.{k}": v for k, v in self.threshold.state_dict().items()}
        arrays |= {f"alr.{k}": v for k, v in self.tracker.state_dict().items()}
        arrays |= {f"fb.{k}": v for k, v in self.feedback.state_dict().items()}
        arrays |= {f"ada.{k}": v for k, v in (self.adaptation or {}).items()}
        return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in arrays.items()})

    # --- scoring -----------------------------------------------------------------------
    def process(self, points: np.ndarray, n_new: int) -> list[PointResult]:
        """points: (K, 1 + C), oldest first, the last ``n_new`` rows new. One result each."""
        first_index = self.meta.points_seen - n_new  # stream-wide index of the first new point
        self._explained = {}
        out = self.loop.run(points[:, 1:], points[:, 0], n_new, first_index, self._observe)
        self.points_until_scored = self.loop.points_until_scored(self.meta.points_seen)
        results = []
        for i in range(n_new):
            if not out.scored[i]:
                results.append(PointResult(None, None, False, None, "warming_up"))
                continue
            threshold, lik = out.thresholds[i], out.likelihood[i]
            explained = self._explained.get(first_index + i)
            results.append(PointResult(
                float(out.scores[i]), None if np.isnan(lik) else float(lik),
                bool(out.anomalous[i]), None if np.isnan(threshold) else float(threshold),
                "scored", *(explained or (None, None))))
        return results

    def _observe(self, scored: Scored) -> None:
        """Explanations and alerts for freshly scored points, before the detector learns."""
        precedents = self._precedents(scored.windows, scored.channel_scores, scored.anomalous)
        self.tracker.observe(scored.stamps[:, 1], scored.scores, scored.thresholds,
                             scored.anomalous, scored.channel_scores, scored.windows,
                             precedents)
        for i in np.flatnonzero(scored.anomalous):
            self._explained[int(scored.index[i])] = (
                self._explain(scored.channel_scores[i]), precedents.get(int(i)))

    def _top(self, channel_scores: np.ndarray) -> np.ndarray:
        return np.argsort(-channel_scores)[: self.settings.top_channels]

    def _explain(self, channel_scores: np.ndarray) -> list[ChannelShare]:
        total = float(channel_scores.sum()) or 1.0
        names = self.channel_names()
        return [ChannelShare(names[i], round(float(channel_scores[i]) / total, 4))
                for i in self._top(channel_scores)]

    def _precedents(self, windows: np.ndarray, channel_scores: np.ndarray,
                    anomalous: np.ndarray) -> dict[int, list[Precedent]]:
        """Anomalous point i -> the nearest normal windows of its top channels (memory
        detectors only): what "normal" looked like."""
        n = self.settings.precedents
        rows = np.flatnonzero(anomalous)
        if not (n and len(rows) and self.detector.has_precedents):
            return {}
        dist, stamps = self.detector.precedents(windows[rows], n)  # (A, C, n), (A, C, n, 2)
        names = self.channel_names()
        out: dict[int, list[Precedent]] = {}
        for a, i in enumerate(rows):
            out[int(i)] = [
                Precedent(names[c], float(stamps[a, c, j, 0]), float(stamps[a, c, j, 1]),
                          round(float(dist[a, c, j]), 4))
                for c in self._top(channel_scores[i]) for j in range(dist.shape[2])
                if np.isfinite(stamps[a, c, j]).all()]
        return out


def alert_rules(settings: Settings) -> AlertRules:
    return AlertRules(
        k=settings.alert_k, m=settings.alert_m, critical_ratio=settings.alert_critical_ratio,
        quiet_points=settings.alert_quiet_points, quiet_seconds=settings.alert_quiet_seconds,
        cooldown_seconds=settings.alert_cooldown_seconds, top_channels=settings.top_channels,
        prompt_strategy=settings.alert_prompt_strategy)


def _strip(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
