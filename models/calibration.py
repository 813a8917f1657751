"""Anomaly likelihood: a per-point value in [0, 1] that means the same on every stream and
for every detector.

A detector's raw score has the units of its stream (a noisy stream scores higher than a
smooth one), so one number cannot serve many streams. The likelihood puts every point on
one scale, in two parts split at ``VERDICT_LINE`` (0.99):

* a point the stream's threshold judges **normal** reads its rank among the stream's
  recent scores, ``VERDICT_LINE * (1 - p)``, with the conformal tail p-value

      p = (#{recent scores > s} + (#{recent scores = s} + 1) / 2) / (n + 1)

  (ties count half, so a flat stream reads the middle, not the top). Under normal
  operation p is uniform, so the likelihood of normal points is uniform on [0, 0.99):
  its median is about 0.5 on any stream, whatever its scale, once the detector's scores
  are stationary. A short stretch of one stream need not read 0.5: a detector's scores
  move slowly (the default's window shares 63 of its 64 values with the next), so a few
  hundred points are a few independent draws (over 40 noise draws of ``tsad demo``'s
  stream, the median of its 95 ranked points ranges from 0.13 to 0.89, 0.52 on average);
* a point the stream's threshold judges **anomalous** (its verdict) reads
  ``1 - (1 - VERDICT_LINE) * t / s`` for score s over threshold t: 0.99 just above the
  line, 0.995 at twice the threshold, 0.999 at ten times.

So ``likelihood >= 0.99`` exactly when the stream raised a verdict, verdicts stay above
every normal point (on every stream: one threshold over many streams keeps the
verdicts' order), and they are ordered by how far they break the line. A stream with no
threshold (an offline replay) has no verdicts: all its points are ranked.

Each score is compared with the history *before* it and then joins it, so a chunk of
points gives exactly what the same points give one at a time.

>>> cal = AnomalyLikelihood(history=100, min_history=10)
>>> lik = cal.process(np.r_[np.linspace(0.0, 1.0, 100), 5.0, 0.5],
...                   anomalous=np.r_[np.zeros(100, bool), True, False],
...                   thresholds=np.full(102, 1.0))
>>> bool(np.isnan(lik[:10]).all()), round(float(lik[-2]), 4), round(float(lik[-1]), 2)
(True, 0.998, 0.49)
"""

from __future__ import annotations

import numpy as np

from models.slices import sliced, unsliced

VERDICT_LINE = 0.99  # likelihoods at or above it are the stream's verdicts
BLOCK = 256  # scores ranked at once (a block costs BLOCK x (history + BLOCK) comparisons)
RING_SLICE = 128  # scores per slice of the stored history (512 bytes)


class AnomalyLikelihood:
    """Streaming likelihood of scores against a ring of the last ``history`` scores."""

    def __init__(self, history: int = 2000, min_history: int = 64) -> None:
        if history < 2 or not 1 <= min_history <= history:
            raise ValueError("need history >= 2 and 1 <= min_history <= history")
        self.history = history
        self.min_history = min_history
        self._ring = np.zeros(history, dtype=np.float32)
        self._count = 0  # scores seen (ring index = count % history)

    def process(self, scores: np.ndarray, anomalous: np.ndarray | None = None,
                thresholds: np.ndarray | None = None) -> np.ndarray:
        """Likelihood of each score, given the threshold's verdict and cut at each point
        (None: no verdicts). A normal point reads NaN while fewer than ``min_history``
        scores came before it; a verdict needs no history. Then every score joins the
        history, in order."""
        scores = np.asarray(scores, dtype=np.float64)
        flagged = (np.zeros(len(scores), bool) if anomalous is None
                   else np.asarray(anomalous, dtype=bool))
        cuts = (np.full(len(scores), np.nan) if thresholds is None
                else np.asarray(thresholds, dtype=np.float64))
        out = np.full(len(scores), np.nan)
        for lo in range(0, len(scores), BLOCK):
            part = slice(lo, lo + BLOCK)
            out[part] = self._block(scores[part], flagged[part], cuts[part])
        return out

    def _block(self, scores: np.ndarray, flagged: np.ndarray, cuts: np.ndarray
               ) -> np.ndarray:
        """``process`` for a few scores at once: each compared with the history before it
        (the ring's last scores, then the block's earlier ones), exactly as one point at a
        time would be."""
        count, size = self._count, self.history
        s32 = scores.astype(np.float32)  # the ring holds float32: compare like with like
        seen = min(count, size)
        past = self._ring[(count - seen + np.arange(seen)) % size]  # oldest first
        n = np.minimum(count + np.arange(len(scores)), size)  # the history of point i
        above, ties = _counts(past, s32, seen + np.arange(len(scores)) - n)
        p = (above + (ties + 1) / 2.0) / (n + 1.0)  # the conformal tail p-value
        out = np.where(n >= self.min_history, VERDICT_LINE * (1.0 - p), np.nan)
        for i in np.flatnonzero(flagged):
            out[i] = verdict_likelihood(scores[i], cuts[i])
        keep = slice(max(0, len(scores) - size), len(scores))  # a long block: its tail
        self._ring[(count + np.arange(len(scores))[keep]) % size] = s32[keep]
        self._count = count + len(scores)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """The ring in slices of RING_SLICE scores, ``"ring<k>/scores"``
        (models/slices.py): a store that keeps ``part/name`` keys apart
        (service/stream_state.py) rewrites only the slice a few new scores changed, not
        the whole history (8 KB at the default 2,000).

        >>> cal = AnomalyLikelihood(history=300, min_history=10)
        >>> sorted(cal.state_dict())
        ['count', 'ring0/scores', 'ring1/scores', 'ring2/scores']
        """
        return {"count": np.array([self._count], dtype=np.int64),
                **sliced("ring", RING_SLICE, scores=self._ring)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        # "ring": one array, as versions before the slices wrote it
        ring = state["ring"] if "ring" in state else unsliced(state, "ring", "scores")
        ring = np.zeros(0, np.float32) if ring is None else np.asarray(ring, np.float32)
        if ring.shape != self._ring.shape:  # the history setting changed: start again
            return
        self._ring = ring.copy()
        self._count = int(np.asarray(state["count"]).reshape(-1)[0])


def _counts(past: np.ndarray, s: np.ndarray, dropped: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """For each score s[i], how many of its history lie above it and how many tie: the
    history is ``past[dropped[i]:]`` (oldest first) and then ``s[:i]``. The whole past is
    counted once, sorted; the few dropped and in-block values are compared directly."""
    if np.isnan(past).any() or np.isnan(s).any():  # NaN does not sort like it compares
        seq = np.concatenate([past, s])
        at = np.arange(len(seq))[None, :]
        ends = len(past) + np.arange(len(s))
        inside = (at >= dropped[:, None]) & (at < ends[:, None])
        return (np.count_nonzero((seq[None, :] > s[:, None]) & inside, axis=1),
                np.count_nonzero((seq[None, :] == s[:, None]) & inside, axis=1))
    ordered = np.sort(past)
    right = np.searchsorted(ordered, s, side="right")
    above, ties = len(past) - right, right - np.searchsorted(ordered, s, side="left")
    gone = past[:dropped.max(initial=0)]
    if len(gone):  # the oldest values left the history of the later points
        out = np.arange(len(gone))[None, :] < dropped[:, None]
        above = above - np.count_nonzero((gone[None, :] > s[:, None]) & out, axis=1)
        ties = ties - np.count_nonzero((gone[None, :] == s[:, None]) & out, axis=1)
    # the block's own earlier scores (beyond the history's length, only the latest)
    at = np.arange(len(s))[None, :]
    earlier = (at < np.arange(len(s))[:, None]) & (at >= (dropped - len(past))[:, None])
    above = above + np.count_nonzero((s[None, :] > s[:, None]) & earlier, axis=1)
    ties = ties + np.count_nonzero((s[None, :] == s[:, None]) & earlier, axis=1)
    return above, ties


def verdict_likelihood(score: float, threshold: float) -> float:
    """The likelihood of a point judged anomalous: in [VERDICT_LINE, 1), higher the
    further its score breaks the threshold (a threshold <= 0 or unknown reads the line).

    >>> verdict_likelihood(1.0, 1.0), verdict_likelihood(10.0, 1.0)
    (0.99, 0.999)
    """
    if not np.isfinite(threshold) or threshold <= 0 or score <= threshold:
        return VERDICT_LINE
    return 1.0 - (1.0 - VERDICT_LINE) * threshold / score
