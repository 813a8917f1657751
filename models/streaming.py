"""The one online scoring loop: what the service runs per stream, and what replays and
benchmarks run offline.

Points are processed in chunks of the stream's own point index (``index // chunk``), not
of requests: within a chunk the detector is fixed, so the chunk's windows are scored in
one vectorised call; when a chunk's last point has been scored, the detector learns from
the chunk's windows (those judged normal, unless it ``learns_from_anomalies``). A chunk
split over several requests is scored with the same detector state and learnt once, when
it completes, so how a stream is batched never changes a score, a verdict or an alert.

A detector whose scores are ratios to its own record (``Records``) learns its
record a chunk late; the loop carries the record of the last ``chunk`` scored points per
channel, so a point counts as a new record only if it also beats those (a novel shape
lasting ten points is one record, not ten), and beats an earlier *verdict* among them
``repeat_factor`` times over (one incident is one verdict unless a much larger one
follows).

Costly detectors score every ``score_stride``-th point of the stream (by index, again);
the points in between repeat the last verdict. Per scored point, in order: the raw score,
the threshold's verdict, the anomaly likelihood (``models.calibration``: the score's rank
among the stream's recent scores, above 0.99 only for verdicts), then ``observe`` (the
service's explanations and alerts) sees the scored points before the detector learns
from them.

>>> from models.detectors.raw_knn import RawKnn
>>> s = np.sin(np.arange(400.0) / 5.0)[:, None]
>>> det = RawKnn(window=16, stride=4, min_memory=1).fit(s[:100])
>>> run = stream_scores(det, s, start=100, score_stride=4)
>>> run.scores.shape, int(run.fresh.sum()), run.offered  # the last chunk is incomplete
((300,), 75, 71)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from models.calibration import AnomalyLikelihood
from models.detectors.base import (
    Detector,
    Online,
    Records,
    aggregate_channels,
    as_series,
    sliding_windows,
)

CHUNK = 64  # points scored between two online updates
# Records: within a chunk after a verdict, a new one must break it this many times
# over (1.5 to 4 scored the same on one half of NAB and on the other; benchmarks/nab.py)
REPEAT_FACTOR = 2.0


class StreamThreshold(Protocol):
    """What the loop needs from a threshold (``models.thresholds`` classes fit)."""

    def process(self, scores: np.ndarray,
                timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class Scored:
    """The freshly scored points of one chunk, handed to ``observe`` before learning."""

    index: np.ndarray  # (F,) stream-wide point index
    windows: np.ndarray  # (F, W, C)
    stamps: np.ndarray  # (F, 2) first and last timestamp of each window
    channel_scores: np.ndarray  # (F, C)
    scores: np.ndarray  # (F,)
    likelihood: np.ndarray  # (F,) NaN while the stream has too few scores
    thresholds: np.ndarray  # (F,) NaN while the threshold has none
    anomalous: np.ndarray  # (F,) bool
    # (F,) bool: the last point of its chunk that is scored (a chunk's last fresh point;
    # which it is depends on the stream's index only, never on how it was batched)
    closes_chunk: np.ndarray | None = None


@dataclass
class LoopOutput:
    """One entry per new point (verdicts repeat between strided fresh scores)."""

    scored: np.ndarray  # bool: a score is in force (False: warming up)
    fresh: np.ndarray  # bool: a window ending at this point was scored now
    scores: np.ndarray  # float64, NaN while warming up
    likelihood: np.ndarray
    thresholds: np.ndarray
    anomalous: np.ndarray  # bool
    offered: int  # windows offered to partial_fit


@dataclass
class Verdict:
    """The verdict in force: the last freshly scored point's, which the points between
    strided scores repeat (carried across requests in the loop's state)."""

    score: float = np.nan  # NaN: nothing scored yet
    likelihood: float = np.nan
    threshold: float = np.nan
    anomalous: bool = False

    @property
    def known(self) -> bool:
        return not np.isnan(self.score)


@dataclass
class _Pass:
    """One ``run``: its points (context then new), where the new ones start, and what it
    has produced so far."""

    values: np.ndarray  # (K, C)
    timestamps: np.ndarray  # (K,)
    start: int  # local position of the first new point
    first_index: int  # stream-wide index of the first new point
    out: LoopOutput
    observe: Callable[[Scored], None] | None
    _view: np.ndarray | None = None  # sliding windows over values, made when first needed

    def index(self, pos: int) -> int:
        """Stream-wide index of local position ``pos``."""
        return self.first_index + pos - self.start

    def windows(self, rows: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
        """The windows ending at local rows (F, W, C), C-contiguous, and their first/last
        stamps (F, 2)."""
        if len(rows) == 1:
            r = int(rows[0])
            windows = self.values[None, r - window + 1:r + 1].copy()
        else:  # one gather from the sliding view instead of a slice per window
            if self._view is None:
                self._view = sliding_window_view(self.values, window, axis=0)  # (N, C, W)
            windows = np.ascontiguousarray(self._view[rows - window + 1].transpose(0, 2, 1))
        stamps = np.stack([self.timestamps[rows - window + 1], self.timestamps[rows]], axis=1)
        return windows, stamps


class OnlineLoop:
    """A stream's detector, likelihood and threshold, advanced point by point.

    ``threshold`` None: every score is normal. ``online`` False: the detector stays as it
    is (a shared artifact). State (``state_dict``) is the verdict in force and which
    points of the unfinished chunk will be learnt, and, for a ``Records`` detector, the
    records of the last chunk (``recent/...``: only ratios above 1 count, so only they are
    kept); the detector, calibrator and threshold save their own. ``learnt`` counts the
    detector's updates: a point that completes no chunk leaves the detector as it was.
    """

    def __init__(self, detector: Detector, threshold: StreamThreshold | None = None,
                 likelihood: AnomalyLikelihood | None = None, *, chunk: int = CHUNK,
                 score_stride: int = 1, online: bool = True,
                 repeat_factor: float = REPEAT_FACTOR) -> None:
        if chunk < 1 or score_stride < 1:
            raise ValueError("chunk and score_stride must be >= 1")
        learns = isinstance(detector, Online)
        if online and not learns and not detector.is_fitted:
            raise RuntimeError(f"detector {detector.name!r} is not fitted and cannot "
                               "learn online")
        self.detector = detector
        self.threshold = threshold
        self.likelihood = likelihood or AnomalyLikelihood()
        self.chunk = chunk
        self.score_stride = score_stride
        self.online = online and learns
        self.repeat_factor = repeat_factor
        self.last = Verdict()
        self.pending = np.zeros(chunk, dtype=bool)  # learn the window ending at chunk pos i
        self.recent = np.zeros((chunk, 0))  # Records: ratios of the last chunk points
        self.learnt = 0  # partial_fit calls so far (in this process)

    # --- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        last = self.last
        state = {"verdict": np.array([last.score, last.likelihood, last.threshold,
                                      float(last.anomalous)]),
                 "pending_bits": np.packbits(self.pending)}
        if self.recent.shape[1]:  # a record ratio of at most 1 never divides: left out
            at = np.flatnonzero(self.recent > 1.0)
            state |= {"recent/at": at, "recent/ratio": self.recent.reshape(-1)[at],
                      "recent/channels": np.array([self.recent.shape[1]])}
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if "verdict" in state:
            score, likelihood, threshold, anomalous = (float(v) for v in state["verdict"])
            self.last = Verdict(score, likelihood, threshold, anomalous == 1.0)
        elif "score" in state:  # written before the verdict was one array
            self.last = Verdict(*(float(state[k][0]) for k in ("score", "likelihood",
                                                                "threshold")),
                                bool(state["anomalous"][0]))
        elif "last" in state and len(state["last"]) == 4:  # written before Verdict
            score, likelihood, threshold, anomalous = (float(v) for v in state["last"])
            self.last = Verdict(score, likelihood, threshold, anomalous == 1.0)
        if "pending_bits" in state:
            bits = np.unpackbits(np.asarray(state["pending_bits"], dtype=np.uint8))
            if len(bits) >= self.chunk:
                self.pending = bits[:self.chunk].astype(bool)
        elif "pending" in state and len(state["pending"]) == self.chunk:
            self.pending = np.asarray(state["pending"]).astype(bool)
        if "recent/channels" in state:
            recent = np.zeros((self.chunk, int(state["recent/channels"][0])))
            recent.reshape(-1)[np.asarray(state["recent/at"], dtype=np.int64)] = \
                state["recent/ratio"]
            self.recent = recent
        elif "recent" in state and len(state["recent"]) == self.chunk:
            self.recent = np.asarray(state["recent"], dtype=np.float64).copy()

    def _beyond_recent(self, ratios: np.ndarray, index: np.ndarray) -> np.ndarray:
        """(F, C) record ratios of fresh points, in order -> the records (above 1)
        divided by the largest ratio (at least 1) of the channel's previous ``chunk``
        points, where a previous verdict counts ``repeat_factor`` times: one incident,
        one verdict, unless a much larger one follows. Scores below 1 (the ranking) stay
        as they are."""
        if self.recent.shape[1] != ratios.shape[1]:
            self.recent = np.zeros((self.chunk, ratios.shape[1]))
        line = self.detector.record_threshold
        n = len(ratios)
        if n and index[-1] - index[0] == n - 1:  # consecutive points: one sliding max
            # the ring in stream order (slot of index j is j % chunk), then the fresh rows
            seq = np.concatenate([self.recent[(index[0] + np.arange(self.chunk)) % self.chunk],
                                  ratios])
            seq = np.where(seq > line, seq * self.repeat_factor, seq)
            previous = _sliding_max(seq, self.chunk)[:n]
            out = np.where(ratios > 1.0, ratios / np.maximum(previous, 1.0), ratios)
            keep = slice(max(0, n - self.chunk), n)
            self.recent[index[keep] % self.chunk] = ratios[keep]
            return out
        out = np.empty_like(ratios)
        for i, (row, at) in enumerate(zip(ratios, index, strict=True)):
            recent = np.where(self.recent > line, self.recent * self.repeat_factor,
                              self.recent)
            out[i] = np.where(row > 1.0, row / np.maximum(recent.max(axis=0), 1.0), row)
            self.recent[at % self.chunk] = row
        return out

    def points_until_scored(self, next_index: int) -> int | None:
        """Points still needed for the first score, when the next point has stream index
        ``next_index``: 1 means the next point is the first scored, 0 that the stream is
        scoring already (a point was scored). None when the detector cannot say how much it
        still has to learn. Learning happens at chunk ends, so a detector that needs k more
        windows scores from the chunk end that brings them."""
        if self.last.known:
            return 0
        det, window = self.detector, self.detector.config.window
        need = det.windows_to_fit
        if need is None:
            return None
        first = max(next_index, window - 1)  # the first full window from here
        if need > 0:
            have = int(self.pending.sum()) if next_index % self.chunk else 0
            end = (next_index // self.chunk + 1) * self.chunk
            while have + max(end - first, 0) < need:
                end += self.chunk
            first = max(end, window - 1)
        if first != window - 1 and first % self.score_stride:
            first += self.score_stride - first % self.score_stride  # the stride's grid
        return first - next_index + 1  # the first scored point counts among them

    # --- the loop ----------------------------------------------------------------------
    def run(self, values: np.ndarray, timestamps: np.ndarray, n_new: int, first_index: int,
            observe: Callable[[Scored], None] | None = None) -> LoopOutput:
        """values (K, C) and timestamps (K,): context then the ``n_new`` new points, oldest
        first; ``first_index``: the stream-wide index of the first new point. The context
        should reach back to the start of the first new point's chunk plus window - 1
        points (what the store keeps); with less, the chunk learns the windows it has."""
        out = LoopOutput(np.zeros(n_new, bool), np.zeros(n_new, bool), np.full(n_new, np.nan),
                         np.full(n_new, np.nan), np.full(n_new, np.nan),
                         np.zeros(n_new, bool), 0)
        run = _Pass(values, timestamps, len(values) - n_new, first_index, out, observe)
        pos = run.start
        while pos < len(values):
            chunk_end = pos + self.chunk - run.index(pos) % self.chunk  # local end of chunk
            hi = min(chunk_end, len(values))
            self._segment(run, pos, hi)
            if hi == chunk_end:  # the chunk is complete: learn from it
                out.offered += self._learn(run, hi - self.chunk, hi)
            pos = hi
        return out

    def _segment(self, run: _Pass, lo: int, hi: int) -> None:
        """Score the new points at local positions [lo, hi), all in one chunk."""
        det, window, out = self.detector, self.detector.config.window, run.out
        idx = run.index(lo) + np.arange(hi - lo)  # stream-wide indices of the segment
        full = (np.arange(lo, hi) >= window - 1) & (idx >= window - 1)
        slots = idx % self.chunk
        if not det.is_fitted:  # cold start: learn every full window, score none
            self.pending[slots] = full
            return
        # on the stride's grid of the stream index; the stream's first full window too, so
        # a fitted detector scores from there without a gap
        fresh = full & ((idx % self.score_stride == 0) | (idx == window - 1))
        o = slice(lo - run.start, hi - run.start)
        verdicts = np.zeros(hi - lo, bool)
        if fresh.any():
            windows, stamps = run.windows(np.arange(lo, hi)[fresh], window)
            channel_scores = det.channel_scores(windows)
            if isinstance(det, Records):
                channel_scores = self._beyond_recent(channel_scores, idx[fresh])
            scores = aggregate_channels(channel_scores, det.config.aggregate)
            if self.threshold is None:
                thr, anom = np.full(len(scores), np.nan), np.zeros(len(scores), bool)
            else:
                thr, anom = self.threshold.process(scores, stamps[:, 1])
            lik = self.likelihood.process(scores, anom, thr)
            if run.observe is not None:
                at = idx[fresh]
                # the stride's next grid point after each fresh point is in the next chunk
                following = (at // self.score_stride + 1) * self.score_stride
                run.observe(Scored(at, windows, stamps, channel_scores, scores, lik, thr,
                                   anom, following // self.chunk != at // self.chunk))
            verdicts[fresh] = anom
            out.scores[o][fresh], out.likelihood[o][fresh] = scores, lik
            out.thresholds[o][fresh], out.anomalous[o][fresh] = thr, anom
        fill = full & ~fresh
        if fill.any():
            self._repeat_verdicts(out, o, fill, fresh)
        elif len(fresh) and fresh[-1]:  # the segment's last point is fresh: in force
            j = o.stop - 1
            self.last = Verdict(float(out.scores[j]), float(out.likelihood[j]),
                                float(out.thresholds[j]), bool(out.anomalous[j]))
        elif fresh.any():
            self._repeat_verdicts(out, o, fill, fresh)
        out.fresh[o] = fresh
        out.scored[o] = full & ~np.isnan(out.scores[o])
        everything = isinstance(det, Online) and det.learns_from_anomalies
        learn = fresh if everything else fresh & ~verdicts
        self.pending[slots] = learn

    def _repeat_verdicts(self, out: LoopOutput, o: slice, fill: np.ndarray,
                         fresh: np.ndarray) -> None:
        """Between fresh scores a point repeats the verdict in force: the segment's last
        fresh one before it, else the one carried from earlier requests (``last``); then
        the segment's last fresh verdict is the one in force."""
        source = np.maximum.accumulate(np.where(fresh, np.arange(len(fresh)), -1))
        inside = fill & (source >= 0)
        carried = fill & (source < 0)
        last = self.last
        for col, value in ((out.scores, last.score), (out.likelihood, last.likelihood),
                           (out.thresholds, last.threshold), (out.anomalous, last.anomalous)):
            seg = col[o]  # a view: writes go to out
            seg[inside] = seg[source[inside]]
            if last.known:
                seg[carried] = value
        if fresh.any():
            j = o.start + int(np.flatnonzero(fresh)[-1])
            self.last = Verdict(float(out.scores[j]), float(out.likelihood[j]),
                                float(out.thresholds[j]), bool(out.anomalous[j]))

    def _learn(self, run: _Pass, lo: int, hi: int) -> int:
        """Learn the marked windows of the chunk ending at local position hi."""
        marked = self.pending.copy()
        self.pending[:] = False
        if not self.online:
            return 0
        window = self.detector.config.window
        rows = np.arange(lo, hi)[marked]
        rows = rows[rows - window + 1 >= 0]  # windows the context still holds
        if not len(rows):
            return 0
        windows, stamps = run.windows(rows, window)
        assert isinstance(self.detector, Online)  # self.online says so
        self.detector.partial_fit(windows, stamps)
        self.learnt += 1
        return len(rows)


def _sliding_max(x: np.ndarray, width: int) -> np.ndarray:
    """(N, C) -> (N - width + 1, C): the largest of each ``width`` consecutive rows, by
    doubling (log2(width) maxima of whole arrays instead of a strided reduction per row;
    the same values, max does not round).

    >>> _sliding_max(np.array([[3.0], [1.0], [4.0], [1.0], [5.0]]), 3)[:, 0].tolist()
    [4.0, 4.0, 5.0]
    """
    out, span = x, 1  # out[i]: the largest of rows i .. i + span - 1
    while 2 * span <= width:
        out = np.maximum(out[:-span], out[span:])
        span *= 2
    if span < width:  # two runs of span rows cover width rows
        count = len(x) - width + 1
        out = np.maximum(out[:count], out[width - span:width - span + count])
    return out


@dataclass
class StreamRun:
    """Per point from ``start`` on (scores and verdicts repeat between fresh scores)."""

    scores: np.ndarray  # (T - start,) float64
    likelihood: np.ndarray  # (T - start,) float64 in [0, 1], NaN while too few scores
    anomalous: np.ndarray  # (T - start,) bool: the threshold's verdict in force
    thresholds: np.ndarray  # (T - start,) float64, NaN while the threshold has none
    fresh: np.ndarray  # (T - start,) bool: a window ending here was scored
    offered: int  # windows offered to partial_fit


def stream_scores(det: Detector, series: np.ndarray, start: int,
                  threshold: StreamThreshold | None = None, *, chunk: int = CHUNK,
                  score_stride: int = 1, online: bool = True,
                  timestamps: np.ndarray | None = None,
                  repeat_factor: float = REPEAT_FACTOR) -> StreamRun:
    """Score ``series[start:]`` point by point with the service's loop, in one call (the
    loop gives the same result for any batching).

    ``threshold``: decides, per scored window, normal or anomalous (None: all normal);
    its state moves with the stream. ``timestamps`` (seconds) go to the threshold; the
    point index when None. ``start`` must leave a full window of past for a fitted
    detector (start >= window - 1); an online detector may start at 0 (cold start).
    """
    series = as_series(series)
    window = det.config.window
    if not 0 <= start < len(series) or (det.is_fitted and start < window - 1):
        raise ValueError(f"start: need window - 1 <= start < {len(series)}, got {start}")
    if online and not isinstance(det, Online):
        raise ValueError(f"{det.name} does not learn online: pass online=False")
    ts = np.arange(len(series), dtype=np.float64) if timestamps is None else np.asarray(
        timestamps, dtype=np.float64)
    loop = OnlineLoop(det, threshold, chunk=chunk, score_stride=score_stride, online=online,
                      repeat_factor=repeat_factor)
    out = loop.run(series, ts, len(series) - start, start)
    return StreamRun(out.scores, out.likelihood, out.anomalous, out.thresholds, out.fresh,
                     out.offered)


__all__ = ["CHUNK", "LoopOutput", "OnlineLoop", "Scored", "StreamRun", "stream_scores",
           "sliding_windows"]
