"""The one detector contract: a small base class and opt-in capability mix-ins.

Every detector (``Detector``):

* is built from its own ``Config`` (a frozen dataclass of its tunables and their
  defaults; the constructor only stores it),
* ``fit(train)`` on a normal series of shape (T, C),
* ``channel_scores(windows)`` maps windows (B, W, C) to non-negative per-channel scores
  (B, C) for the *newest* point of each window, and ``score(windows)`` aggregates them to
  (B,): higher is more anomalous, always,
* ``state_dict()`` / ``load_state_dict()`` and ``is_fitted``,
* saves to / loads from an artifact directory that carries its own config, so
  ``load_detector(path)`` rebuilds it with nothing else,
* answers the few small defaults every caller may ask (``costly``, ``fit_many``,
  ``calibration_scores``, ``calibrated_threshold``, ``fixed_channels``,
  ``constant_channels``, ``windows_to_fit``, ``training_report``).

What a detector can do beyond that it declares by inheriting a mix-in; callers test it
with ``isinstance``, never with flags or ``hasattr``:

* ``Online``: learns per stream from windows, ``partial_fit(windows, stamps=None)``;
* ``Records``: its scores are ratios to the stream's own recent record, and scores above
  ``record_threshold`` are verdicts without a fitted threshold;
* ``Precedents``: ``precedents(windows, n)``, the nearest remembered normal windows;
* ``Adaptable``: a stream may tune its own copy (``adaptable_state``, ``with_parameters``,
  ``finetune``);
* ``LearnsFromLabels``: ``fit_series(series, point_labels)``.

``tests/test_detector_contract.py`` checks each declaration against the code.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Self

import numpy as np

ARTIFACT_CONFIG = "config.json"
ARTIFACT_WEIGHTS = "weights.safetensors"


@dataclass(frozen=True)
class DetectorConfig:
    """Fields every detector config has."""

    window: int = 64  # points per window (the newest point is the one scored)
    aggregate: str = "mean"  # how channel scores become one score: mean | max | sum


class Detector(ABC):
    """Base class: owns validation, aggregation and the artifact format."""

    name: ClassVar[str]
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig
    # What training measured (loss curve, validation), saved beside an artifact.
    training_report: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, config: DetectorConfig | None = None, **overrides: Any) -> None:
        self.config = replace(config or self.Config(), **overrides)

    # --- what each detector writes ---------------------------------------------------
    @abstractmethod
    def _fit(self, train: np.ndarray) -> None:
        """Learn from a validated float64 series (T, C)."""

    @abstractmethod
    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        """(B, W, C) float64 windows -> (B, C) non-negative scores."""

    @abstractmethod
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything learned, as named arrays (what the artifact's weights hold)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`state_dict`."""

    @property
    @abstractmethod
    def is_fitted(self) -> bool: ...

    # --- small defaults every caller may ask; a detector overrides what differs -------
    @property
    def costly(self) -> bool:
        """A language-model call per scored window: the service scores such a detector
        every TSAD_COSTLY_SCORE_STRIDE-th point and repeats the verdict in between."""
        return False

    @property
    def windows_to_fit(self) -> int | None:
        """Windows still to learn online before the detector scores: 0 once fitted, None
        when it cannot say (the service then shows no countdown). Online detectors with a
        warm-up count override it."""
        return 0 if self.is_fitted else None

    @property
    def constant_channels(self) -> list[int]:
        """Channels constant over the whole training series (offline ``fit``). A detector
        that learns each channel's scale from its training data has none for them: it
        scores them 0 (rather than dividing by a floor and letting any change explode)
        and lists them here, so callers can report it."""
        return []

    def fit_many(self, series: Sequence[np.ndarray]) -> Self:
        """One model over several series (e.g. every entity of a dataset). The default
        fits their concatenation, where a few windows straddle two series; a detector
        that can keep series apart overrides it."""
        return self.fit(np.concatenate([as_series(x, "series") for x in series]))

    def calibration_scores(self) -> np.ndarray | None:
        """(M, C) channel scores of normal training windows that the detector can give
        without a held-out split (a memory's leave-one-out scores), or None: then callers
        calibrate on a held-out tail of the training data."""
        return None

    @property
    def calibrated_threshold(self) -> float | None:
        """A cut the detector chose on its own validation data, or None (callers then
        take a quantile of held-out scores)."""
        return None

    @property
    def fixed_channels(self) -> int | None:
        """Channel count a fitted model is bound to, or None (any)."""
        return None

    # --- the shared part ---------------------------------------------------------------
    def fit(self, train: np.ndarray) -> Self:
        train = as_series(train, "train")
        if len(train) < self.config.window:
            raise ValueError(f"train: need at least window={self.config.window} points")
        self._fit(train)
        return self

    def channel_scores(self, windows: np.ndarray) -> np.ndarray:
        windows = as_windows(windows, self.config.window)
        if not self.is_fitted:
            raise RuntimeError(f"{self.name}: call fit() before scoring")
        return self._channel_scores(windows)

    def score(self, windows: np.ndarray) -> np.ndarray:
        return aggregate_channels(self.channel_scores(windows), self.config.aggregate)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"detector": self.name, "config": asdict(self.config)}
        (path / ARTIFACT_CONFIG).write_text(json.dumps(meta, indent=2))
        state = {k: np.ascontiguousarray(v) for k, v in self.state_dict().items()}
        save_file(state, str(path / ARTIFACT_WEIGHTS))
        return path

    @classmethod
    def config_fields(cls) -> set[str]:
        return {f.name for f in fields(cls.Config)}

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> Self:
        """The config from a dict; an unknown key is a ValueError naming it (a typo in a
        YAML config must not silently train the default)."""
        unknown = sorted(set(config) - cls.config_fields())
        if unknown:
            raise ValueError(f"{cls.name}: unknown config keys {unknown}; known: "
                             f"{sorted(cls.config_fields())}")
        return cls(cls.Config(**config))


# --- capabilities: opt-in mix-ins, tested with isinstance -----------------------------
class Online(Detector):
    """Learns per stream, online: the service's cold-start path and every stream's
    continued learning (``models.streaming.OnlineLoop``)."""

    # Learn from every window, anomalous or not (a detector that judges surprise against
    # its own recent record must see the records); others learn normal windows only.
    learns_from_anomalies: ClassVar[bool] = False

    @abstractmethod
    def partial_fit(self, windows: np.ndarray, stamps: np.ndarray | None = None) -> Self:
        """Learn from windows (B, W, C), oldest first, each adding its newest point.
        ``stamps`` (B, 2): the first and last timestamp of each window (a detector that
        keeps precedents remembers them; the others ignore them)."""


class Records(Detector):
    """Scores are ratios to the stream's own recent record (1 = as surprising as the worst
    recent point): comparable across streams, calibrated by the ratio alone
    (``models.calibration``), and a score at or above ``record_threshold`` is anomalous
    without a fitted threshold (``models.thresholds.verdict_spec``)."""

    record_threshold: ClassVar[float] = 1.0


class Precedents(Detector):
    """A memory of normal windows, each with where it came from: a score comes with its
    evidence, the nearest normal precedents."""

    @abstractmethod
    def precedents(self, windows: np.ndarray, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` nearest remembered normal windows of each channel window, nearest
        first: (B, W, C) -> distances (B, C, n) and their [start, end] (B, C, n, 2)."""


class Adaptable(Detector):
    """A trained artifact whose streams may tune their own copy (soft prompts and head)
    from labelled windows (``service/feedback``); the shared artifact never changes."""

    @abstractmethod
    def adaptable_state(self) -> dict[str, np.ndarray]:
        """The parameters a stream may tune, as named arrays."""

    @abstractmethod
    def with_parameters(self, state: dict[str, np.ndarray] | None = None) -> Self:
        """A copy sharing the frozen parts, with ``state`` (None: its own) as parameters."""

    @abstractmethod
    def finetune(self, windows: np.ndarray, targets: np.ndarray, *, steps: int = 20,
                 lr: float = 1e-2, max_seconds: float = 10.0) -> dict[str, Any]:
        """Tune the copy in place on (N, W, C) windows and their targets; a report with
        ``steps``, ``seconds``, ``loss_before``, ``loss_after``."""


class LearnsFromLabels(Detector):
    """One model over many univariate series of any length, with optional point labels
    (``tsad train`` prefers it when the data allows)."""

    @abstractmethod
    def fit_series(self, series: list[np.ndarray],
                   point_labels: list[np.ndarray | None] | None = None) -> Self: ...


CAPABILITIES: tuple[type[Detector], ...] = (Online, Records, Precedents, Adaptable,
                                            LearnsFromLabels)


def aggregate_channels(channel_scores: np.ndarray, how: str) -> np.ndarray:
    """(B, C) -> (B,).

    >>> aggregate_channels(np.array([[1.0, 3.0]]), "mean").tolist()
    [2.0]
    >>> aggregate_channels(np.array([[1.0, 3.0]]), "max").tolist()
    [3.0]
    >>> aggregate_channels(np.array([[1.0, 3.0]]), "sum").tolist()
    [4.0]
    """
    if how == "mean":
        return channel_scores.mean(axis=1)
    if how == "max":
        return channel_scores.max(axis=1)
    if how == "sum":  # e.g. log tail probabilities of independent channels
        return channel_scores.sum(axis=1)
    raise ValueError(f"aggregate: unknown aggregation {how!r} (mean | max | sum)")


def as_series(x: np.ndarray, name: str = "series") -> np.ndarray:
    """Validate a (T, C) or (T,) series of finite numbers; returns float64 (T, C)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected shape (T, C), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def as_windows(x: np.ndarray, window: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] != window:
        raise ValueError(f"windows: expected shape (B, {window}, C), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("windows: contains NaN or infinite values")
    return x


def sliding_windows(series: np.ndarray, window: int, stride: int = 1) -> np.ndarray:
    """(T, C) -> (N, window, C) views, newest point last.

    >>> sliding_windows(np.arange(5.0)[:, None], 3).shape
    (3, 3, 1)
    """
    series = np.asarray(series)
    if len(series) < window:
        return np.empty((0, window, series.shape[1]), dtype=series.dtype)
    view = np.lib.stride_tricks.sliding_window_view(series, window, axis=0)  # (N, C, W)
    return view[::stride].transpose(0, 2, 1)
