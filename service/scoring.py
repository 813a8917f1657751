"""Per-stream online scoring: the stream's detector, threshold and likelihood (the ML
core's ``OnlineLoop``), its alert tracker and explanations, and their state sections.

``StreamScorer.process`` takes the points an append returned (context, then the points
to score) and scores each one whose window is full, in the loop's chunks (within a chunk
the detector and threshold are fixed; between chunks the detector learns). The alert
tracker sees every freshly scored point in order, before the detector learns from it.
Results come back as columns (``Results``), one row per point scored.

The state also carries the stream's operator feedback (``fb``) and, for a stream bound to
a SPEAR artifact, its own adapted soft prompts and head (``ada``): the stream then scores
with an adapted copy of the artifact, which stays shared and unchanged
(``service/feedback``). Sections: ``service/stream_state.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from models.calibration import AnomalyLikelihood
from models.detectors import Detector, build_detector
from models.detectors.base import Adaptable
from models.streaming import OnlineLoop, Scored
from models.thresholds import ThresholdSpec, build_threshold, verdict_spec
from service import stream_state
from service.alerts.model import incarnation
from service.alerts.tracker import AlertRules, AlertTracker
from service.artifacts import Artifact, artifact_name, load_artifact
from service.explain import Explainer, Explanation
from service.feedback.labels import FeedbackSet
from service.settings import Settings
from service.shadows.stream import StreamShadows
from service.stores.base import LEGACY_SECTION, StreamMeta

# The parts of a scorer that own state sections (service/stream_state.py), and those that
# may move with any batch (the others: the detector at chunk ends, feedback and adaptation
# through their own requests)
OWNERS = ("det", "loop", "lik", "thr", "alr", "fb", "ada")
PER_BATCH = frozenset({"loop", "lik", "thr", "alr"})


@dataclass
class Results:
    """One row per point ``process`` was given to score, in order (NaN: none)."""

    scored: np.ndarray  # bool: a score is in force (False: warming up)
    scores: np.ndarray
    likelihood: np.ndarray
    thresholds: np.ndarray
    anomalous: np.ndarray  # bool
    explained: dict[int, Explanation] = field(default_factory=dict)  # anomalous rows

    def __len__(self) -> int:
        return len(self.scores)

    def head(self, n: int) -> Results:
        """The first n rows."""
        if n >= len(self):
            return self
        return Results(self.scored[:n], self.scores[:n], self.likelihood[:n],
                       self.thresholds[:n], self.anomalous[:n],
                       {k: e for k, e in self.explained.items() if k < n})


class StreamScorer:
    def __init__(self, meta: StreamMeta, settings: Settings,
                 alert_scope: str | None = None) -> None:
        """``alert_scope``: a shadow detector's name (its alerts get ids of their own)."""
        self.meta = meta
        self.settings = settings
        name = artifact_name(meta.detector)
        # a fitted artifact is shared, read-only, by every stream bound to it: it is not
        # part of the stream's state
        self.artifact: Artifact | None = None
        # the stream's own soft prompts and head (adapted from the artifact's), if any
        self.adaptation: dict[str, np.ndarray] | None = None
        self.feedback = FeedbackSet(meta.window, meta.channels)
        if name is not None:
            self.artifact = load_artifact(settings.artifacts_dir, name)
            self.detector: Detector = self.artifact.detector
        else:
            self.detector = stream_detector(settings, meta.detector, meta.window, meta.params)
        self.threshold = build_threshold(verdict_spec(
            stream_spec(settings, meta), self.detector,
            chosen=bool((meta.threshold or {}).get("kind")),
            calibrated=self.artifact.threshold if self.artifact else None))
        stride = settings.costly_score_stride if self.detector.costly else 1
        self.loop = OnlineLoop(
            self.detector, self.threshold,
            AnomalyLikelihood(settings.likelihood_history, settings.likelihood_min_scores),
            score_stride=stride, online=self.artifact is None)
        names = meta.channel_names or [str(i) for i in range(meta.channels)]
        self.explainer = Explainer(names, settings.top_channels, settings.precedents)
        life = incarnation(meta.stream, meta.created_at)
        self.tracker = AlertTracker(meta.stream, names, alert_rules(settings),
                                    f"{life}~{alert_scope}" if alert_scope else life)
        self.shadows = StreamShadows.none(meta, settings)  # shadow detectors: service/shadows
        self.points_until_scored: int | None = None  # after process(): see OnlineLoop
        self.stored: dict[str, bytes] = {}  # the sections as the store holds them
        # the loop's detector updates when the detector's sections were last encoded
        # (None: never): between chunk ends the detector does not move, nor is encoded
        self._det_encoded_at: int | None = None
        self._touched: set[str] = set()  # owners changed outside scoring (``touch``)
        # row of process() -> explanation of an anomalous point
        self._explained: dict[int, Explanation] = {}
        self._first_row = 0

    # --- state -------------------------------------------------------------------------
    @classmethod
    def from_sections(cls, meta: StreamMeta, settings: Settings, stored: Mapping[str, bytes],
                      alert_scope: str | None = None) -> StreamScorer:
        scorer = cls(meta, settings, alert_scope)
        if any(StreamShadows.owns(k) for k in stored):
            scorer.shadows = StreamShadows.load(meta, settings, dict(stored))
            stored = {k: v for k, v in stored.items() if not StreamShadows.owns(k)}
        parts = stream_state.decode(stored)
        state = {owner: stream_state.merge(owner, parts) for owner in OWNERS}
        if scorer.loop.online:
            scorer.detector.load_state_dict(state["det"])
        scorer.threshold.load_state_dict(state["thr"])
        scorer.tracker.load_state_dict(state["alr"])
        scorer.loop.load_state_dict(state["loop"])
        if state["lik"]:
            scorer.loop.likelihood.load_state_dict(state["lik"])
        scorer.feedback = FeedbackSet.from_state(state["fb"], meta.window, meta.channels)
        if adaptation := state["ada"]:
            scorer.set_adaptation(adaptation)
        scorer.stored = dict(stored)  # a legacy blob: every section differs, all written
        if LEGACY_SECTION not in stored:
            scorer._det_encoded_at = scorer.loop.learnt
        return scorer

    def _state(self, owner: str) -> dict[str, np.ndarray]:
        if owner == "det":
            return self.detector.state_dict() if self.loop.online else {}
        return {"loop": self.loop.state_dict, "lik": self.loop.likelihood.state_dict,
                "thr": self.threshold.state_dict, "alr": self.tracker.state_dict,
                "fb": self.feedback.state_dict, "ada": lambda: self.adaptation or {},
                }[owner]()

    def sections(self, owners: tuple[str, ...] = ()) -> dict[str, bytes]:
        """The sections of the stream's state (of ``owners`` only, when given), encoded."""
        out = {}
        for owner in owners or OWNERS:
            if owner == "det" and not self.loop.online:
                continue  # a shared artifact: not the stream's state
            for name, arrays in stream_state.split(owner, self._state(owner)).items():
                out[name] = stream_state.encode(arrays)
        return out

    def to_commit(self) -> tuple[dict[str, bytes], tuple[str, ...], int]:
        """(changed sections, sections to drop, bytes of the whole state) for a commit;
        what is written becomes what the store holds (``stored``). Only the parts that may
        have moved are encoded: the detector when it learnt (a chunk ended) or was never
        written, feedback and adaptation when never written (their own requests write
        them), the rest always (small, or moving with every point); then only the sections
        whose bytes differ from the stored ones are written."""
        first = not self.stored or LEGACY_SECTION in self.stored
        learnt = self._det_encoded_at != self.loop.learnt
        owners = tuple(o for o in OWNERS if first or o in PER_BATCH or o in self._touched
                       or (o == "det" and learnt))
        self._touched = set()
        encoded = self.sections(owners)
        if "det" in owners:
            self._det_encoded_at = self.loop.learnt
        changed = stream_state.changed(encoded, self.stored)
        ours = set(owners)
        drop = tuple(sorted(name for name in self.stored if name not in encoded
                            and stream_state.owner(name) in ours and name != LEGACY_SECTION))
        if first:
            self.stored = {}
        for name in drop:
            del self.stored[name]
        self.stored.update(encoded)
        # shadow detectors' sections: their own changed/drop (service/shadows)
        shadows_changed, shadows_drop, shadows_bytes = self.shadows.to_commit()
        return (changed | shadows_changed, drop + shadows_drop,
                sum(len(b) for b in self.stored.values()) + shadows_bytes)

    def touch(self, *owners: str) -> None:
        """Parts changed outside scoring (feedback, adaptation): the next commit encodes
        them."""
        self._touched.update(owners)

    def set_adaptation(self, adaptation: dict[str, np.ndarray]) -> bool:
        """Score with the stream's own soft prompts and head (``prompts``, ``head.weight``,
        ``head.bias``, ``base``: the artifact's digest, ``info``). An adaptation of another
        version of the artifact is dropped (False): the feedback stays to adapt again."""
        art = self.artifact
        base = bytes(np.asarray(adaptation["base"], dtype=np.uint8)).decode()
        if art is None or not isinstance(art.detector, Adaptable) or base != art.digest:
            self.adaptation = None
            self.touch("ada")
            return False
        self.detector = self.loop.detector = art.detector.with_parameters(adaptation)
        self.adaptation = dict(adaptation)
        self.touch("ada")
        return True

    # --- scoring -----------------------------------------------------------------------
    def process(self, points: np.ndarray, n_new: int) -> Results:
        """points: (K, 1 + C), oldest first, the last ``n_new`` rows to score."""
        self._first_row = self.meta.points_seen - n_new  # stream index of the first row
        self._explained = {}
        start = time.perf_counter()
        out = self.loop.run(points[:, 1:], points[:, 0], n_new, self._first_row,
                            self._observe)
        self.points_until_scored = self.loop.points_until_scored(self.meta.points_seen)
        results = Results(out.scored, out.scores, out.likelihood, out.thresholds,
                          out.anomalous & out.scored, self._explained)
        if self.shadows:  # the same points, before the alerts are drained
            self.shadows.meta = self.meta
            self.shadows.advance(points, n_new, self._first_row, results.scores,
                                 results.scored, results.anomalous,
                                 self.tracker.changed.values(), time.perf_counter() - start)
        return results

    def _observe(self, scored: Scored) -> None:
        """Explanations and alerts for freshly scored points, before the detector learns."""
        precedents = self.explainer.nearest_normal(self.detector, scored.windows,
                                                   scored.channel_scores, scored.anomalous)
        self.tracker.observe(scored.stamps[:, 1], scored.scores, scored.thresholds,
                             scored.anomalous, scored.channel_scores, scored.windows,
                             precedents, scored.closes_chunk)
        for i in np.flatnonzero(scored.anomalous):
            row = int(scored.index[i]) - self._first_row
            self._explained[row] = Explanation(
                self.explainer.shares(scored.channel_scores[i]), precedents.get(int(i)))


def stream_detector(settings: Settings, name: str, window: int,
                    own: dict | None = None) -> Detector:
    """A fresh detector for a stream: its Config's defaults, with the operator's
    overrides (TSAD_DETECTOR_PARAMS: "*" for every detector with the field, then the
    detector's own), the stream's own params and its window."""
    params = settings.detector_params
    return build_detector(name, defaults=params.get("*"),
                          **{**params.get(name, {}), **(own or {}), "window": window})


def stream_spec(settings: Settings, meta: StreamMeta) -> ThresholdSpec:
    """The server defaults, overridden by the stream's own configuration."""
    own = meta.threshold or {}
    budget = meta.alert_budget_per_day or settings.threshold_alert_budget_per_day
    return ThresholdSpec(
        kind=own.get("kind") or settings.threshold_kind,
        q=own.get("q") or settings.threshold_q,
        depth=own.get("depth") or settings.threshold_depth,
        level=settings.threshold_level,
        calibration=settings.threshold_calibration_points,
        min_scores=settings.threshold_min_scores,
        max_peaks=settings.threshold_max_peaks,
        # a stream's own q wins over a server-wide budget; its own budget over everything
        budget_per_day=meta.alert_budget_per_day or (None if own.get("q") else budget),
        quantile=settings.threshold_quantile,
        history=settings.threshold_history,
        value=own.get("value"),
    )


def alert_rules(settings: Settings) -> AlertRules:
    return AlertRules(
        k=settings.alert_k, m=settings.alert_m, critical_ratio=settings.alert_critical_ratio,
        quiet_points=settings.alert_quiet_points, quiet_seconds=settings.alert_quiet_seconds,
        cooldown_seconds=settings.alert_cooldown_seconds, top_channels=settings.top_channels,
        prompt_strategy=settings.alert_prompt_strategy)
