"""Fusion: two (or more) detectors, each calibrated on training data, added.

The embedding memory sees shape changes a forecaster misses and the other way round, so
serving them as one detector is the option the memory issue asks for. ``fit`` fits every
member and learns each one's normal-score distribution per channel: memories from their
leave-one-out distances (one fit), other detectors from the last ``calibration`` share of
the training series scored by a copy fitted on the rest. Channel scores are then fused by
``models.fusion`` (z or rank, weights from training data or equal) and passed through a
softplus, which keeps the order and makes them non-negative (the detector contract).

>>> import numpy as np
>>> series = np.sin(np.arange(800.0) / 5.0)[:, None]
>>> det = Fusion(window=32, members=({"detector": "raw_knn", "params": {"stride": 4}},
...                                  {"detector": "residual_linear"})).fit(series[:600])
>>> normal = sliding_windows(series[600:], 32)[:1]
>>> spiky = normal.copy()
>>> spiky[0, -1, 0] += 3.0
>>> bool(det.score(spiky)[0] > det.score(normal)[0])
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.detectors.base import Detector, DetectorConfig, sliding_windows
from models.fusion import Calibration, fuse, weights_from_training

DEFAULT_MEMBERS = ({"detector": "embedding_memory"}, {"detector": "residual_linear"})


@dataclass(frozen=True)
class FusionConfig(DetectorConfig):
    # members: {"detector": registered name, "params": {...}}; the window is the fusion's
    members: tuple = DEFAULT_MEMBERS
    method: str = "z"  # z | rank (models.fusion)
    weights: str = "train"  # train (∝ 1 / q99 of calibrated normal scores) | equal
    calibration: float = 0.2  # held-out end of the training series (non-memory members)
    calibration_stride: int = 4  # held-out windows scored every this many points

    def __post_init__(self) -> None:  # JSON gives lists: one canonical form, for equality
        object.__setattr__(self, "members", tuple(dict(m) for m in self.members))


class Fusion(Detector):
    name = "fusion"
    Config = FusionConfig

    @property
    def costly(self) -> bool:
        return any(m.costly for m in self._members())

    def _members(self) -> list[Detector]:
        if not hasattr(self, "members"):
            from models.detectors import build_detector

            self.members = [
                build_detector(m["detector"], **{**m.get("params", {}),
                                                 "window": self.config.window})
                for m in self.config.members]
        return self.members

    def _fit(self, train: np.ndarray) -> None:
        from models.detectors import build_detector

        if len(self.config.members) < 2:
            raise ValueError("members: fusion needs at least two detectors")
        window = self.config.window
        cals = []
        for spec, member in zip(self.config.members, self._members(), strict=True):
            member.fit(train)
            normal = member.calibration_scores()  # (M, C) leave-one-out, or None
            if normal is None:
                cut = int(len(train) * (1 - self.config.calibration))
                if cut < window or len(train) - cut < 2:
                    raise ValueError(f"train: too short to hold out {self.config.calibration}"
                                     f" of it for calibration (window {window})")
                held = build_detector(spec["detector"], **{**spec.get("params", {}),
                                                           "window": window}).fit(train[:cut])
                tail = sliding_windows(train[cut - window + 1:], window,
                                       self.config.calibration_stride)
                normal = held.channel_scores(tail)
            cals.append(Calibration.of(normal))
        self.calibrations = cals
        self.weights = weights_from_training(cals, self.config.weights)

    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        parts = [m.channel_scores(windows) for m in self._members()]  # each (B, C)
        fused = fuse(parts, self.calibrations, self.weights, self.config.method)
        return np.logaddexp(0.0, fused)  # softplus: order kept, >= 0

    def state_dict(self) -> dict[str, np.ndarray]:
        if not self.is_fitted:
            return {}
        state: dict[str, np.ndarray] = {"weights": self.weights}
        for i, (m, cal) in enumerate(zip(self._members(), self.calibrations, strict=True)):
            state |= {f"m{i}.{k}": v for k, v in m.state_dict().items()}
            state |= cal.as_arrays(f"cal{i}.")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        for i, m in enumerate(self._members()):
            m.load_state_dict({k[len(f"m{i}."):]: v for k, v in state.items()
                               if k.startswith(f"m{i}.")})
        self.calibrations = [Calibration.from_arrays(state, f"cal{i}.")
                             for i in range(len(self.config.members))]
        self.weights = np.asarray(state["weights"], dtype=np.float64)

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "weights")
