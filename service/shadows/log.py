"""Per-point records of live and shadow verdicts: the live detector's results of the
points the store holds (``LIVE``, in the stream's ``shadows`` section), which shadows
compare with when they catch up, and each shadow's comparison log (``COMPARED``, in
blocks of ``LOG_BLOCK`` points of the stream's index, the newest
``TSAD_SHADOW_LOG_POINTS`` kept) that the report reads."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from service.alerts.model import Alert

# per point: stamp, wall clock when stored, score (NaN: none), scored, anomalous, under an
# open alert, and the detector's seconds per point of its batch
LIVE = {"ts": np.float64, "wall": np.float64, "score": np.float64, "scored": np.uint8,
        "anomaly": np.uint8, "alerted": np.uint8, "cost": np.float64}
COMPARED = {"ts": np.float64, "live_score": np.float32, "shadow_score": np.float32,
            "live_scored": np.uint8, "shadow_scored": np.uint8, "live_anomaly": np.uint8,
            "shadow_anomaly": np.uint8, "live_alerted": np.uint8, "shadow_alerted": np.uint8}


@dataclass
class Columns:
    """Rows of named columns, in stream order."""

    data: dict[str, np.ndarray]

    @classmethod
    def empty(cls, kinds: dict[str, type]) -> Columns:
        return cls({k: np.zeros(0, t) for k, t in kinds.items()})

    @classmethod
    def of(cls, kinds: dict[str, type], **columns: np.ndarray) -> Columns:
        return cls({k: np.asarray(columns[k]).astype(t, copy=False) for k, t in kinds.items()})

    def __len__(self) -> int:
        return len(next(iter(self.data.values())))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.data[name]

    def rows(self, lo: int, hi: int) -> Columns:
        return Columns({k: v[lo:hi] for k, v in self.data.items()})

    def concat(self, other: Columns) -> Columns:
        return Columns({k: np.concatenate([v, other.data[k]]) for k, v in self.data.items()})

    @classmethod
    def join(cls, parts: Iterable[Columns], kinds: dict[str, type]) -> Columns:
        parts = list(parts)
        if not parts:
            return cls.empty(kinds)
        return cls({k: np.concatenate([p.data[k] for p in parts]) for k in kinds})

    @classmethod
    def decode(cls, arrays: dict[str, np.ndarray], kinds: dict[str, type]) -> Columns:
        if not all(k in arrays for k in kinds):
            return cls.empty(kinds)
        return cls({k: np.asarray(arrays[k]).astype(t, copy=False) for k, t in kinds.items()})


@dataclass
class LiveResults:
    """The live detector's results for the points from stream index ``first`` on."""

    first: int
    columns: Columns

    @property
    def end(self) -> int:
        return self.first + len(self.columns)

    def since(self, index: int) -> LiveResults:
        """The results from ``index`` on (those before are dropped)."""
        lo = min(max(index - self.first, 0), len(self.columns))
        return LiveResults(self.first + lo, self.columns.rows(lo, len(self.columns)))

    def extend(self, other: LiveResults) -> LiveResults:
        """``other`` appended; on a gap (points nobody recorded), ``other`` alone."""
        if other.first != self.end or not len(self.columns):
            return other
        return LiveResults(self.first, self.columns.concat(other.columns))

    def between(self, lo: int, hi: int) -> Columns:
        """The rows of stream indices [lo, hi); rows not held are missing (the caller
        aligns by stamp)."""
        a, b = max(lo - self.first, 0), max(min(hi - self.first, len(self.columns)), 0)
        return self.columns.rows(a, max(a, b))

    def encode(self) -> dict[str, np.ndarray]:
        return {**self.columns.data, "first": np.array([self.first], np.int64)}

    @classmethod
    def decode(cls, arrays: dict[str, np.ndarray], first: int) -> LiveResults:
        if "first" not in arrays:
            return cls(first, Columns.empty(LIVE))
        return cls(int(arrays["first"][0]), Columns.decode(arrays, LIVE))


def alerted(stamps: np.ndarray, alerts: Iterable[Alert | dict]) -> np.ndarray:
    """Whether each stamp lies within an alert's life ([opened_at, resolved_at], or open):
    the alerts a tracker changed over a batch cover every point of it that was alerted.

    >>> alerted(np.array([1.0, 2, 3, 4]), [{"opened_at": 2.0, "resolved_at": 3.0}])
    array([False,  True,  True, False])
    """
    out = np.zeros(len(stamps), bool)
    for a in alerts:
        opened, resolved = (a.opened_at, a.resolved_at) if isinstance(a, Alert) else (
            a["opened_at"], a["resolved_at"])
        out |= (stamps >= opened) & (stamps <= (np.inf if resolved is None else resolved))
    return out


def compared(live: LiveResults, first: int, shadow: dict[str, np.ndarray]) -> Columns:
    """Comparison rows of the points from stream index ``first`` on: the shadow's results
    (``ts``, ``score``, ``scored``, ``anomaly``, ``alerted``) beside the live detector's
    (a point without live results, lost by a crash, counts as unscored live)."""
    pos = first + np.arange(len(shadow["ts"])) - live.first
    have = (pos >= 0) & (pos < len(live.columns))
    pos = np.where(have, pos, 0)

    def pick(col: str, fill: float) -> np.ndarray:
        if not len(live.columns):
            return np.full(len(pos), fill)
        return np.where(have, live.columns[col][pos], fill)

    return Columns.of(
        COMPARED, ts=shadow["ts"], live_score=pick("score", np.nan),
        shadow_score=shadow["score"], live_scored=pick("scored", 0),
        shadow_scored=shadow["scored"], live_anomaly=pick("anomaly", 0),
        shadow_anomaly=shadow["anomaly"], live_alerted=pick("alerted", 0),
        shadow_alerted=shadow["alerted"])
