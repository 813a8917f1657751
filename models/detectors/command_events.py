"""Command events: discrete channels (commands, flags, modes) scored as events, not series.

MSL's columns 1..54 are one-hot command flags: a command is sent, or it is not. A series
detector reads them as a signal of mostly zeros with rare unit steps and learns nothing
about them but their noise, so every detector loses ranking when they are added as series
(``benchmarks/results/msl_memory.md``). What they carry is *which commands were sent, how
often*: a command the training period never saw, or a burst of a rare one, is news.

A channel is an event channel when its training values take at most ``max_states``
distinct values (one-hot flags take 2, a constant channel 1); others are not this
detector's business and score 0. An event is a point whose value is not the channel's
most common training value. Each event channel c has a training rate
``r_c = (events + 1/2) / (T + 1)`` (the half keeps a never-seen command finite), and a
window with ``k_c`` events on it scores its Poisson tail surprise

    s_c = -log P(N >= k_c),  N ~ Poisson(r_c * W)      (0 when k_c = 0)

so an ordinary command costs little, a never-seen one or a burst a lot. The window's score
is the sum over channels (``aggregate: sum``; the log of a product of independent tail
probabilities), or their max.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> flags = np.zeros((4000, 3)); flags[rng.integers(0, 4000, 40), 0] = 1.0
>>> det = CommandEvents(window=32).fit(flags)
>>> quiet, usual, novel = np.zeros((3, 32, 3)); usual[5, 0] = 1.0; novel[5, 2] = 1.0
>>> [round(float(s), 2) for s in det.score(np.stack([quiet, usual, novel]))]
[0.0, 1.28, 5.52]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.detectors.base import Detector, DetectorConfig


@dataclass(frozen=True)
class CommandEventsConfig(DetectorConfig):
    window: int = 64
    aggregate: str = "sum"  # channel surprises -> one: sum (independent tails) | max
    max_states: int = 2  # a channel with more distinct training values is not an event one
    tolerance: float = 1e-9  # |value - usual value| above this is an event

    def __post_init__(self) -> None:
        if self.max_states < 1:
            raise ValueError("max_states: at least 1")


class CommandEvents(Detector):
    name = "command_events"
    Config = CommandEventsConfig

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "_rate")

    @property
    def event_channels(self) -> list[int]:
        """The channels scored as events (the others score 0)."""
        return np.flatnonzero(self._is_event).tolist() if self.is_fitted else []

    def state_dict(self) -> dict[str, np.ndarray]:
        if not self.is_fitted:
            return {}
        return {"usual": self._usual, "rate": self._rate,
                "is_event": self._is_event.astype(np.uint8)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            self._usual = np.asarray(state["usual"], dtype=np.float64).copy()
            self._rate = np.asarray(state["rate"], dtype=np.float64).copy()
            self._is_event = np.asarray(state["is_event"]).astype(bool)

    def _fit(self, train: np.ndarray) -> None:
        t, c = train.shape
        self._usual = np.empty(c)
        self._is_event = np.zeros(c, dtype=bool)
        for j in range(c):
            values, counts = np.unique(train[:, j], return_counts=True)
            self._usual[j] = values[np.argmax(counts)]
            self._is_event[j] = len(values) <= self.config.max_states
        events = self._events(train).sum(axis=0)  # (C,)
        self._rate = (events + 0.5) / (t + 1.0)

    def _events(self, x: np.ndarray) -> np.ndarray:
        """(..., C) values -> (..., C) 0/1 events on the event channels."""
        return ((np.abs(x - self._usual) > self.config.tolerance) & self._is_event
                ).astype(np.float64)

    def _channel_scores(self, windows: np.ndarray) -> np.ndarray:
        from scipy.stats import poisson

        if windows.shape[2] != len(self._rate):
            raise ValueError(f"windows: {windows.shape[2]} channels, fitted on "
                             f"{len(self._rate)}")
        k = self._events(windows).sum(axis=1)  # (B, C) events per channel window
        lam = self._rate * windows.shape[1]  # expected events in a window of this length
        tail = poisson.sf(k - 1, lam)  # P(N >= k)
        return np.where(k > 0, -np.log(np.maximum(tail, 1e-300)), 0.0)
