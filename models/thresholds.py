"""Per-stream thresholds: SPOT and DSPOT (streaming peaks-over-threshold, Siffer et al.,
KDD 2017), and a plain recent-scores quantile.

Every threshold decides point by point: ``process(scores, timestamps)`` returns the
threshold in force for each score (NaN while none) and whether the score exceeds it.
State is a handful of arrays, so it travels inside the stream's state blob (Redis) and
any replica continues it.

SPOT, in the service's terms:

1. *Provisional*: from ``min_scores`` scores on, while calibrating, a score is flagged
   only when it beats every score the stream has produced so far (under exchangeable
   scores that happens about ln(calibration / min_scores) times in the whole period).
2. *Calibration* on the stream's first ``calibration`` scores: t = their ``level``
   quantile; a GPD is fitted to the excesses over t (``models.evt``); the alarm
   threshold is z_q = t + sigma/gamma ((q n / N_t)^-gamma - 1), the score exceeded with
   probability q.
3. *Online*: a score between t and z_q is a new peak: the GPD is refitted and z_q moves;
   a score below t only counts (n += 1); a score above z_q is an alarm. Peaks are a ring
   of the last ``max_peaks`` (bounded state); n and N_t count everything. A fit costs
   about a millisecond, so after the first 50 peaks the GPD is refitted once 2% of the
   kept peaks are new rather than at every peak (one peak among 500 moves z_q by a
   fraction of a percent); z_q itself follows n at every point.

Alarms and the tail (a documented departure from the paper). The paper leaves alarms out
of the peaks so that anomalies cannot raise the threshold; but then the fitted tail is
truncated at z_q, the fit's shape turns negative, z_q drops, more scores become alarms
and are truncated too: on i.i.d. exponential scores at q = 1e-3 we measured alarm rates of
2.6-4.2e-3 after 48k points, gamma drifting to -0.4. Here an alarm joins the peaks as a
*right-censored* excess at z_q - t (``models.evt.fit_gpd``): it tells the fit "beyond the
alarm threshold" and nothing about how far, so a huge anomaly weighs no more than a
marginal one, the tail stays unbiased and the alarm rate stays at q.

DSPOT runs the same on ``score - M``, M the mean of the last ``depth`` normal scores, and
reports z_q + M: it follows slow drift of the score level.

An *alert budget* ("at most K alerts per day") becomes q = K / P, P the stream's points
per day measured over calibration (points / elapsed days). Under the fitted tail, K
points per day exceed z_q on normal data; an alert needs at least one anomalous point,
so the expected number of false alerts per day is at most K.

>>> t = QuantileThreshold(quantile=0.9, history=100, min_scores=10)
>>> t.value() is None
True
>>> _ = t.process(np.arange(100.0), np.arange(100.0))
>>> round(t.value(), 1)
89.1
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from models.detectors.base import Detector, Records
from models.evt import GPDFit, fit_gpd, gpd_quantile
from models.slices import sliced, unsliced

KINDS = ("spot", "dspot", "quantile", "fixed")
DAY_SECONDS = 86_400.0
Q_MIN, Q_MAX = 1e-7, 0.25  # what a budget may turn into
# scores per slice of a stored history (models/slices.py: 512 bytes of float64), so that a
# commit rewrites the slice a few new scores changed, not the whole history
HISTORY_SLICE = 64


@dataclass(frozen=True)
class ThresholdSpec:
    """A stream's threshold configuration: server defaults overridden per stream."""

    kind: str = "spot"
    q: float = 1e-3  # risk: probability that a normal score exceeds the threshold
    depth: int = 50  # DSPOT moving-average depth
    level: float = 0.98  # quantile of calibration scores that sets t
    calibration: int = 1000  # scores before the GPD fit
    min_scores: int = 100  # scores before anything is flagged
    max_peaks: int = 500  # peaks kept for refits
    budget_per_day: float | None = None  # replaces q once the cadence is known
    quantile: float = 0.995  # kind "quantile": this quantile of the last `history` scores
    history: int = 2000
    value: float | None = None  # kind "fixed": flag scores >= value (e.g. a calibrated cut)

    def fingerprint(self) -> float:
        """Changes whenever a field that invalidates learnt state changes."""
        fields = (self.kind, self.q, self.depth, self.level, self.calibration,
                  self.max_peaks, self.budget_per_day, self.quantile, self.history)
        text = repr(fields + ((self.value,) if self.kind == "fixed" else ()))
        return float(zlib.crc32(text.encode()))  # stable across processes, unlike hash()


class Threshold(Protocol):
    spec: ThresholdSpec

    def process(self, scores: np.ndarray,
                timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def value(self) -> float | None: ...

    def describe(self) -> dict: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


def build_threshold(spec: ThresholdSpec) -> Threshold:
    if spec.kind == "spot":
        return Spot(spec)
    if spec.kind == "dspot":
        return DSpot(spec)
    if spec.kind == "quantile":
        return QuantileThreshold(spec.quantile, spec.history, spec.min_scores, spec)
    if spec.kind == "fixed":
        return FixedThreshold(spec)
    raise ValueError(f"threshold.kind: unknown {spec.kind!r}; known: {KINDS}")


def budget_to_q(budget_per_day: float, points_per_day: float) -> float:
    """q such that ``budget_per_day`` points a day exceed z_q on normal data.

    >>> budget_to_q(2, 1440)  # one point a minute, at most 2 alerts a day
    0.001388888888888889
    """
    return min(max(budget_per_day / max(points_per_day, 1e-9), Q_MIN), Q_MAX)


class Spot:
    """SPOT on the raw scores (DSPOT subclasses it and feeds it residuals)."""

    kind = "spot"

    def __init__(self, spec: ThresholdSpec) -> None:
        self.spec = spec
        self._calib = np.zeros(spec.calibration)
        self._peaks = np.zeros(spec.max_peaks)
        self._censored = np.zeros(spec.max_peaks)  # 1 where the peak was an alarm
        self.n_calib = 0
        self.n_peaks_kept = 0  # peaks written to the ring (ring index = count % size)
        self.n_fitted = 0  # n_peaks_kept at the last GPD fit
        self.n = 0  # normal observations since calibration began (alarms excluded)
        self.n_t = 0  # of which peaks (above t)
        self.t = math.nan  # initial threshold
        self.z = math.nan  # alarm threshold (in the units SPOT sees)
        self.q = spec.q
        self.record = -math.inf  # highest score seen while calibrating
        self.fit = GPDFit(0.0, 0.0, "none")
        self.first_ts = math.nan
        self.last_ts = math.nan

    @property
    def calibrated(self) -> bool:
        return math.isfinite(self.z)

    # --- the algorithm ---------------------------------------------------------------
    def _offset(self) -> float:
        return 0.0  # DSPOT: the local mean

    def _learn_normal(self, x: float) -> None:
        """DSPOT hook: a score judged normal (x is the raw score)."""

    def process(self, scores: np.ndarray,
                timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        thresholds = np.full(len(scores), np.nan)
        anomalous = np.zeros(len(scores), bool)
        for i, (x, ts) in enumerate(zip(np.asarray(scores, float), timestamps, strict=True)):
            thresholds[i], anomalous[i] = self._step(float(x), float(ts))
        return thresholds, anomalous

    def _step(self, x: float, ts: float) -> tuple[float, bool]:
        if not self.calibrated:
            return self._calibrate_step(x, ts)
        m = self._offset()
        r = x - m
        threshold = self.z + m
        self.n += 1
        if r > self.z:  # an alarm: censored at the alarm threshold, not learnt as normal
            self._add_peak(self.z - self.t, censored=True)
            self._refit()
            return threshold, True
        if r > self.t:
            self._add_peak(r - self.t)
        self._refit()
        self._learn_normal(x)
        return threshold, False

    def _calibrate_step(self, x: float, ts: float) -> tuple[float, bool]:
        """Collect; flag only new records once min_scores are in; fit when full."""
        m = self._offset()  # DSPOT: the mean before this score joins the moving window
        ready = self._offset_ready()
        threshold = self.record + m if self.n_calib >= self.spec.min_scores else math.nan
        flagged = bool(math.isfinite(threshold) and x > threshold)
        self._learn_normal(x)
        if not ready:
            return threshold, flagged
        if self.n_calib == 0:
            self.first_ts = ts
        self.last_ts = ts
        self._calib[self.n_calib] = x - m
        self.n_calib += 1
        self.record = max(self.record, x - m)
        if self.n_calib == len(self._calib):
            self._initialise()
        return threshold, flagged

    def _offset_ready(self) -> bool:
        return True

    def _initialise(self) -> None:
        data = self._calib
        if self.spec.budget_per_day is not None:
            days = (self.last_ts - self.first_ts) / DAY_SECONDS
            per_day = len(data) / days if days > 0 else len(data)
            self.q = budget_to_q(self.spec.budget_per_day, per_day)
        # t must leave more than q of the mass above it for z_q >= t to exist
        level = min(self.spec.level, 1.0 - 2.0 * self.q)
        self.t = float(np.quantile(data, level))
        excess = data[data > self.t] - self.t
        self.n = len(data)
        self.n_t = 0
        for e in excess:
            self._add_peak(float(e))
        self._refit(force=True)
        self._calib = np.zeros(0)  # the state blob no longer carries calibration scores

    def _add_peak(self, excess: float, censored: bool = False) -> None:
        size = len(self._peaks)
        self._peaks[self.n_peaks_kept % size] = excess
        self._censored[self.n_peaks_kept % size] = censored
        self.n_peaks_kept += 1
        self.n_t += 1

    def peaks(self) -> tuple[np.ndarray, np.ndarray]:
        """(observed excesses, censored excesses) in the ring."""
        k = min(self.n_peaks_kept, len(self._peaks))
        peaks, censored = self._peaks[:k], self._censored[:k] > 0
        return peaks[~censored], peaks[censored]

    def _refit(self, force: bool = False) -> None:
        kept = min(self.n_peaks_kept, len(self._peaks))
        due = max(1, kept // 50) if kept >= 50 else 1
        if force or self.n_peaks_kept - self.n_fitted >= due:
            self._fit()
        elif self.fit.method != "none":  # same tail, but n moved: z_q follows it
            self.z = max(gpd_quantile(self.t, self.fit, self.q, self.n, self.n_t), self.t)

    def _fit(self) -> None:
        self.n_fitted = self.n_peaks_kept
        observed, censored = self.peaks()
        if len(observed) == 0:  # a constant calibration: anything above it is an alarm
            self.fit, self.z = GPDFit(0.0, 0.0, "none"), self.t
            return
        self.fit = fit_gpd(observed, censored)
        self.z = max(gpd_quantile(self.t, self.fit, self.q, self.n, self.n_t), self.t)

    # --- reporting and state ---------------------------------------------------------
    def value(self) -> float | None:
        if self.calibrated:
            return self.z + self._offset()
        if self.n_calib >= self.spec.min_scores:
            return self.record + self._offset()
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, "q": self.q, "calibrated": self.calibrated,
                "t": self.t if self.calibrated else None, "value": self.value(),
                "gamma": self.fit.gamma, "sigma": self.fit.sigma, "fit": self.fit.method,
                "n": self.n, "peaks": self.n_t}

    _SCALARS = ("n_calib", "n_peaks_kept", "n_fitted", "n", "n_t", "t", "z", "q", "record",
                "first_ts", "last_ts")

    def state_dict(self) -> dict[str, np.ndarray]:
        # one array of the scalars (what moves with every point: one small section)
        state = {"scalars": np.array([float(getattr(self, k)) for k in self._SCALARS])}
        state |= sliced("calib", HISTORY_SLICE, scores=self._calib)
        state |= sliced("peaks", HISTORY_SLICE, excess=self._peaks, censored=self._censored)
        state |= {"fit": np.array([self.fit.gamma, self.fit.sigma]),
                  "kind": np.array([KINDS.index(self.kind)]),
                  "spec": np.array([self.spec.fingerprint()])}
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Loads a state written by the same spec; anything else leaves a fresh one."""
        if "spec" not in state or float(state["spec"][0]) != self.spec.fingerprint():
            return
        scalars = (state["scalars"] if "scalars" in state  # else one array each, as before
                   else [state[k][0] for k in self._SCALARS])
        for k, value in zip(self._SCALARS, (float(v) for v in scalars), strict=True):
            setattr(self, k, int(value) if k.startswith("n") else value)
        self._calib = _history(state, "calib", "scores")
        self._peaks = _history(state, "peaks", "excess", whole="peaks")
        self._censored = _history(state, "peaks", "censored", whole="censored")
        gamma, sigma = (float(v) for v in state["fit"])
        self.fit = GPDFit(gamma, sigma, "mle" if self.calibrated else "none")


class DSpot(Spot):
    """SPOT on the difference from the mean of the last ``depth`` normal scores."""

    kind = "dspot"

    def __init__(self, spec: ThresholdSpec) -> None:
        super().__init__(spec)
        self._recent = np.zeros(spec.depth)
        self.n_recent = 0
        self._mean = 0.0  # mean of the moving window, kept incrementally (hot path)

    def _offset_ready(self) -> bool:
        return self.n_recent >= len(self._recent)

    def _offset(self) -> float:
        return self._mean

    def _learn_normal(self, x: float) -> None:
        d = len(self._recent)
        i = self.n_recent % d
        old, self._recent[i] = self._recent[i], x
        self.n_recent += 1
        if i == 0 or self.n_recent <= d:  # exact once per turn: no drift from rounding
            self._mean = float(self._recent[:min(self.n_recent, d)].mean())
        else:
            self._mean += (x - old) / d

    def state_dict(self) -> dict[str, np.ndarray]:
        return super().state_dict() | {"recent": self._recent.copy(),
                                       "n_recent": np.array([self.n_recent]),
                                       "mean": np.array([self._mean])}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "spec" not in state or float(state["spec"][0]) != self.spec.fingerprint():
            return
        super().load_state_dict(state)
        self._recent = np.asarray(state["recent"], float).copy()
        self.n_recent = int(state["n_recent"][0])
        self._mean = float(state["mean"][0])


class QuantileThreshold:
    """A high quantile of the stream's recent scores, fixed within one call."""

    kind = "quantile"

    def __init__(self, quantile: float = 0.995, history: int = 2000, min_scores: int = 100,
                 spec: ThresholdSpec | None = None):
        self.spec = spec or ThresholdSpec(kind="quantile", quantile=quantile,
                                          history=history, min_scores=min_scores)
        self.quantile = quantile
        self.history = history
        self.min_scores = min_scores
        self._buf = np.zeros(history)
        self._count = 0  # scores seen (the ring buffer holds the last `history`)

    def value(self) -> float | None:
        n = min(self._count, self.history)
        if n < self.min_scores:
            return None
        return float(np.quantile(self._buf[:n], self.quantile))

    def process(self, scores: np.ndarray,
                timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        value = self.value()
        scores = np.asarray(scores, dtype=np.float64)
        anomalous = scores > value if value is not None else np.zeros(len(scores), bool)
        for s in scores[-self.history:]:
            self._buf[self._count % self.history] = s
            self._count += 1
        return np.full(len(scores), np.nan if value is None else value), anomalous

    def describe(self) -> dict:
        return {"kind": self.kind, "quantile": self.quantile, "value": self.value(),
                "n": self._count}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"count": np.array([self._count]), "kind": np.array([KINDS.index(self.kind)]),
                **sliced("buf", HISTORY_SLICE, scores=self._buf)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        buf = _history(state, "buf", "scores")
        if len(buf) == self.history and int(state.get("kind", [2])[0]) == 2:
            self._buf = buf.copy()
            self._count = int(state["count"][0])


class FixedThreshold:
    """A constant threshold: scores >= value are anomalous. What a calibrated artifact
    brings (SPEAR: the probability cut with the best F1 on validation data)."""

    kind = "fixed"

    def __init__(self, spec: ThresholdSpec) -> None:
        if spec.value is None:
            raise ValueError("threshold.value: kind fixed needs a value")
        self.spec = spec

    def value(self) -> float | None:
        return float(self.spec.value)

    def process(self, scores: np.ndarray,
                timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = np.asarray(scores, dtype=np.float64)
        return np.full(len(scores), self.value()), scores >= self.value()

    def describe(self) -> dict:
        return {"kind": self.kind, "value": self.value()}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"kind": np.array([KINDS.index(self.kind)])}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Nothing is learnt."""


def _history(state: dict[str, np.ndarray], name: str, field: str, whole: str | None = None
             ) -> np.ndarray:
    """A history from its slices, or whole (``whole``, default ``name``: as versions before
    the slices wrote it); empty when neither is there."""
    whole = whole or name
    values = state[whole] if whole in state else unsliced(state, name, field)
    return np.zeros(0) if values is None else np.asarray(values, float).copy()


def verdict_spec(spec: ThresholdSpec, detector: Detector, *, chosen: bool,
                 calibrated: float | None = None) -> ThresholdSpec:
    """The threshold a stream of ``detector`` runs: ``spec`` when the stream chose its
    kind (``chosen``); else a fixed cut where the detector brings one. A ``Records``
    detector's scores are ratios to the stream's own record, so its record threshold
    means the same on every stream, where a fitted tail would chase the records it should
    flag; a trained artifact brings the cut it was calibrated at (``calibrated``).

    >>> from models.detectors import build_detector
    >>> verdict_spec(ThresholdSpec(), build_detector("ensemble"), chosen=False).value
    1.0
    >>> cut = verdict_spec(ThresholdSpec(), build_detector("pca"), chosen=False, calibrated=0.7)
    >>> cut.kind, cut.value
    ('fixed', 0.7)
    >>> verdict_spec(ThresholdSpec(), build_detector("ensemble"), chosen=True).kind
    'spot'
    """
    if chosen:
        return spec
    if isinstance(detector, Records):
        return replace(spec, kind="fixed", value=detector.record_threshold)
    if calibrated is not None:
        return replace(spec, kind="fixed", value=calibrated)
    return spec
