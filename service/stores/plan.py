"""Planning an append: what happens to each point sent (stored, nudged, dropped, a
duplicate of a stored point, or a rejection), decided in Python on the stream's stored
state so that every backend agrees exactly, and the encoding of stored points."""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

from models.streaming import CHUNK
from service.errors import InvalidInput
from service.stores.base import (
    NUDGE_SECONDS,
    DuplicatePolicy,
    PointAction,
    StreamMeta,
    TimestampPolicy,
    retained,
)


def scoreable_unscored(unscored: int, held: int, new: int, points_seen: int,
                       window: int) -> int:
    """How many of a stream's ``unscored`` points (stored before a batch of ``new`` points,
    never scored) the ``held`` points an append returned can still score: each needs the
    ``retained(window) - 1`` points before it (its window, and its chunk to learn from),
    unless the store holds the stream from its first point.

    >>> scoreable_unscored(100, held=10 + 100 + retained(8) - 1, new=10, points_seen=500,
    ...                    window=8)
    100
    >>> scoreable_unscored(100, held=10 + 40 + retained(8) - 1, new=10, points_seen=500,
    ...                    window=8)  # 60 were no longer held
    40
    """
    if points_seen <= held:
        return unscored
    return max(0, min(unscored, held - new - (retained(window) - 1)))


def encode_points(rows: np.ndarray) -> bytes:
    """Points (timestamp + values per row) as little-endian float64 bytes, row after row:
    exact and compact (a store keeps each row as one such string)."""
    return np.ascontiguousarray(rows, dtype="<f8").tobytes()


def decode_points(blobs: list[bytes] | bytes, channels: int) -> np.ndarray:
    """Rows stored by ``encode_points``: a list of them, or one string of many."""
    data = blobs if isinstance(blobs, bytes) else b"".join(blobs)
    return np.frombuffer(data, dtype="<f8").reshape(-1, 1 + channels).copy()


def context_needed(meta: StreamMeta, new: int) -> int:
    """How many stored points before a batch of ``new`` points scoring them needs: the
    window of the first one, and, when the batch completes a chunk, the windows of that
    whole chunk, which the detector then learns (at most ``retained(window) - 1``).

    >>> context_needed(StreamMeta("s", 1, 64, "ensemble", points_seen=130), 1)
    63
    >>> context_needed(StreamMeta("s", 1, 64, "ensemble", points_seen=127), 1)  # ends one
    126
    """
    completes = meta.points_seen % CHUNK + new >= CHUNK
    return (meta.points_seen % CHUNK if completes else 0) + meta.window - 1


def may_resend(points: np.ndarray, last: float | None) -> bool:
    """Whether ``plan_append`` needs the stored window: some point is not after ``last``
    (else the stores skip reading it)."""
    return last is not None and bool((points[:, 0] <= last).any())


def nudge(previous: float) -> float:
    """The stamp a nudged point gets: 1 ms after the previous one (the next float when
    1 ms is below the stamp's precision)."""
    stamp = previous + NUDGE_SECONDS
    return stamp if stamp > previous else float(np.nextafter(previous, np.inf))


@dataclass
class AppendPlan:
    rows: np.ndarray  # (K, 1 + C) the points to write, stamps as they will be stored
    actions: list[PointAction]
    stamps: list[float | None]
    # (M, 2) for each nudged point written: its stored stamp and the stamp it was sent
    # with, kept beside the window so that a retry of it is recognised
    nudges: np.ndarray

    @property
    def duplicates(self) -> int:
        return self.actions.count("duplicate")


NO_NUDGES = np.empty((0, 2))


def plan_append(points: np.ndarray, stored: np.ndarray, last: float | None,
                duplicates: DuplicatePolicy, timestamps: TimestampPolicy,
                nudges: np.ndarray = NO_NUDGES,
                max_back_seconds: float = math.inf) -> AppendPlan:
    """Decide, point by point, what an append does; raises InvalidInput (nothing to
    write) when a policy says reject. Every backend calls this, so they agree exactly.

    ``stored`` is the stream's stored window (oldest first), ``last`` its last stored
    stamp (None: no points yet) and ``nudges`` the (stored, sent) stamps of its recent
    nudged points. A point's *previous* stamp is that of the batch's last point to be
    written, or ``last`` while none is.

    Retries first: while nothing of the batch is to be written yet (a retry resends
    stored points, in order), a point at or before ``last`` that equals a stored point
    of the window (after the one the previous retried point matched) is a *duplicate*:
    the same stamp and values, or the same values and the stamp it was sent with when it
    was nudged. Duplicates follow ``duplicates``: "drop" answers them, "reject" refuses
    a request that also has points to write; a batch with nothing new (a retry of a
    stored batch) is answered under both, never refused: its sender cannot tell it was
    stored. (Points older than the window cannot be told from new points with a
    backward stamp: the timestamp policy applies to them.)

    Then order: a point whose stamp is not after its previous one follows ``timestamps``:
    "nudge" stores it at previous + 1 ms (later points still after that keep their
    stamps), "drop" skips it, "reject" refuses the request. A point more than
    ``max_back_seconds`` before its previous one is refused under every policy: that is
    not a repeated or reordered stamp (a daylight-saving hour) but older data sent again,
    which nudging would append as new.

    >>> p = np.array([[10.0, 1.0], [10.0, 2.0], [9.0, 3.0], [11.0, 4.0]])
    >>> plan = plan_append(p, np.empty((0, 2)), None, "reject", "nudge")
    >>> plan.actions, [round(t, 6) for t in plan.stamps]
    (['stored', 'nudged', 'nudged', 'stored'], [10.0, 10.001, 10.002, 11.0])
    >>> plan.nudges[:, 1].tolist()  # the stamps the nudged points were sent with
    [10.0, 9.0]
    >>> again = plan_append(p, plan.rows, 11.0, "drop", "nudge", plan.nudges)  # a retry
    >>> again.actions, again.stamps == plan.stamps, len(again.rows)
    (['duplicate', 'duplicate', 'duplicate', 'duplicate'], True, 0)
    >>> plan_append(p, plan.rows, 11.0, "reject", "nudge", plan.nudges).actions
    ['duplicate', 'duplicate', 'duplicate', 'duplicate']
    >>> plan_append(p, np.empty((0, 2)), None, "reject", "drop").actions
    ['stored', 'dropped', 'dropped', 'stored']
    """
    previous = -np.inf if last is None else last
    retries = len(stored) > 0 and may_resend(points, last)
    if retries:
        matcher = _RetryMatcher(stored, nudges)
    keep: list[np.ndarray] = []
    actions: list[PointAction] = []
    stamps: list[float | None] = []
    moved: list[tuple[float, float]] = []
    first_duplicate: tuple[int, float] | None = None
    for i, row in enumerate(points):
        ts = float(row[0])
        if ts > previous:
            keep.append(row)
            actions.append("stored")
            stamps.append(ts)
            previous = ts
            continue
        loc = ("body", "points", i, "timestamp")
        if retries and not keep and (twin := matcher.match(row)) is not None:
            first_duplicate = first_duplicate or (i, ts)
            actions.append("duplicate")
            stamps.append(twin)
            continue
        after = (f"the stream's last stored timestamp {previous!r}" if not keep else
                 f"the previous point's timestamp {previous!r}")
        if previous - ts > max_back_seconds:
            raise InvalidInput(loc, f"timestamp {ts!r} is {previous - ts:g} s before "
                                 f"{after}: more than TSAD_TIMESTAMP_MAX_BACK_SECONDS="
                                 f"{max_back_seconds:g}, so not a repeated or reordered stamp "
                                 "but older data; to send a series again, delete the stream "
                                 "first (tsad replay --reset)")
        if timestamps == "reject":
            raise InvalidInput(loc, f"timestamp {ts!r} is not after {after} (timestamp "
                                 "policy reject)")
        if timestamps == "drop":
            actions.append("dropped")
            stamps.append(None)
            continue
        previous = nudge(previous)
        keep.append(np.concatenate([[previous], row[1:]]))
        actions.append("nudged")
        stamps.append(previous)
        moved.append((previous, ts))
    if duplicates != "drop" and first_duplicate is not None and keep:
        i, ts = first_duplicate
        raise InvalidInput(("body", "points", i, "timestamp"),
                             f"point {i} (timestamp {ts!r}) is a duplicate of a stored point "
                             "and the batch goes on with new points: send the new points "
                             "alone, or with TSAD_DUPLICATES=drop the retried ones are "
                             "answered status \"duplicate\"")
    rows = np.array(keep, dtype=np.float64).reshape(len(keep), points.shape[1])
    return AppendPlan(rows=rows, actions=actions, stamps=stamps,
                      nudges=np.array(moved, dtype=np.float64).reshape(len(moved), 2))


class _RetryMatcher:
    """Finds the stored twin of a resent point by dictionary: stored rows by their bytes,
    nudged ones also by (the stamp they were sent with, their values)."""

    def __init__(self, stored: np.ndarray, nudges: np.ndarray) -> None:
        self.ts = stored[:, 0]
        self.exact = {row.tobytes(): k for k, row in enumerate(stored)}
        self.sent: dict[bytes, list[int]] = {}  # several nudged points may share a stamp
        for at, sent in nudges:
            k = int(np.searchsorted(self.ts, at))
            if k < len(stored) and self.ts[k] == at:  # else it has left the window
                key = np.concatenate([[sent], stored[k, 1:]]).tobytes()
                self.sent.setdefault(key, []).append(k)
        for found in self.sent.values():
            found.sort()
        self.cursor = -1  # a retry resends stored points in order

    def match(self, row: np.ndarray) -> float | None:
        k = self.exact.get(row.tobytes())
        if k is None or k <= self.cursor:
            found = self.sent.get(row.tobytes(), [])
            j = bisect_left(found, self.cursor + 1)
            if j == len(found):
                return None
            k = found[j]
        self.cursor = k
        return float(self.ts[k])
