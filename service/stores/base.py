"""The window-store protocol, shared by the Redis and in-memory implementations.

A store keeps, per stream: its metadata (channel count, window length, detector, points
seen, points scored, last timestamp, timestamp policy), the last points (``retained``),
the stamps its last nudged points were sent with (to recognise their retries), an opaque
state blob (the stream's online detector and threshold) and the kept responses of
batches sent with an ``Idempotency-Key`` (receipts). ``append`` checks the channel count,
decides what happens to each point (``plan_append``: stored, nudged, dropped, duplicate
or a rejection) and writes atomically: either every accepted point of the batch is stored
or none is.

Crash consistency: ``points_scored`` (the scored-up-to mark) is written with the state
blob (``save_state(scored=...)``, atomically). Points stored but not yet scored (the
process died between the append and the commit) stay held beyond the retained window
(up to ``unscored_max_points``) and come back from the next ``append`` before the batch's
own points, so they are scored first; the last batch stays held whole until the next
append, so a retry of it is recognised however long it is.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import numpy as np

from models.streaming import CHUNK

DuplicatePolicy = Literal["reject", "drop"]
# a point whose stamp is not after the previous one (in the batch, or the stream's last)
TimestampPolicy = Literal["nudge", "drop", "reject"]
# What happened to one point of an append: "stored" as sent, "nudged" (stored just after the
# previous point), "dropped" (timestamp policy drop), "duplicate" (a retry of a stored point)
PointAction = Literal["stored", "nudged", "dropped", "duplicate"]
NUDGE_SECONDS = 0.001

# Points kept per stream beyond its window: the scoring loop learns a chunk when it
# completes, from windows that started up to a chunk before the newest point.
HISTORY_EXTRA = CHUNK - 1


def retained(window: int) -> int:
    """Points a store keeps for a stream of this window."""
    return window + HISTORY_EXTRA


@dataclass
class StreamMeta:
    stream: str
    channels: int
    window: int
    detector: str
    channel_names: list[str] | None = None
    created_at: float = field(default_factory=time.time)
    points_seen: int = 0
    last_timestamp: float | None = None
    threshold: dict | None = None  # {"kind", "q", "depth"} overrides; None = defaults
    alert_budget_per_day: float | None = None
    timestamps: TimestampPolicy | None = None  # None = the server default (TSAD_TIMESTAMPS)
    # points whose scores are committed with the state blob (the scored-up-to mark); None:
    # a stream stored before the mark existed, taken as all scored
    points_scored: int | None = None
    # bumped by the store, atomically, with every append that writes, state commit and
    # configuration change: a process's cached scorer is valid while it matches
    version: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AppendResult:
    meta: StreamMeta  # after the append
    created: bool  # this append created the stream
    duplicates: int  # points recognised as retries of stored points (policy "drop")
    accepted: int  # points written
    # Context then accepted points, oldest first: up to retained(window) - 1 points stored
    # before the batch, followed by the accepted points. Column 0 is the timestamp (as
    # stored). (K, 1 + C)
    points: np.ndarray
    actions: list[PointAction]  # one per point sent, in order
    # one per point sent: the stamp it is stored under (a duplicate: its stored twin's);
    # None when dropped
    stamps: list[float | None]
    # stored points a crash left unscored, held in ``points`` just before the accepted ones
    # (score them first: they come before the batch), and those no longer held (skipped)
    unscored: int = 0
    skipped: int = 0

    @property
    def to_score(self) -> int:
        """The last rows of ``points`` to score: the unscored, then the accepted."""
        return self.unscored + self.accepted


class StoreRejection(Exception):
    """The request conflicts with stored state (4xx). Nothing was written."""

    def __init__(self, loc: tuple[str | int, ...], message: str, status: int = 422) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message
        self.status = status


class StoreUnavailable(Exception):
    """The backing store cannot be reached (503); the request may be retried."""


class WindowStore(Protocol):
    backend: str

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    async def put_stream(self, meta: StreamMeta) -> tuple[StreamMeta, bool]:
        """Create a stream or update its window/detector/names/threshold configuration.
        Returns (meta, created).

        Raises StoreRejection when ``channels`` differs from the stored stream's.
        A change of window or detector drops the stream's state blob.
        """
        ...

    async def get_stream(self, stream: str) -> StreamMeta | None: ...

    async def list_streams(self, limit: int | None = None,
                           after: str | None = None) -> list[StreamMeta]:
        """Streams by id, ascending: at most ``limit``, only ids after ``after``."""
        ...

    async def count_streams(self, exact: bool = False) -> int:
        """Streams stored. Redis counts its index, which may still hold streams expired
        by TTL; ``exact`` tidies those first (one round trip per call, O(streams))."""
        ...

    async def delete_stream(self, stream: str) -> bool: ...

    async def append(
        self,
        stream: str,
        points: np.ndarray,
        *,
        default_window: int,
        default_detector: str,
        duplicates: DuplicatePolicy = "reject",
        default_timestamps: TimestampPolicy = "reject",
        max_back_seconds: float = math.inf,
        known: StreamMeta | None = None,
    ) -> AppendResult:
        """Atomically append ``points`` (N, 1 + C; column 0 the timestamp) as
        ``plan_append`` decides, with the stream's own timestamp policy or else
        ``default_timestamps``, and trim the window to its last ``window`` points.

        Creates the stream from the first batch when it does not exist. Raises
        StoreRejection (nothing written) on a channel-count mismatch or when the plan
        rejects a point. ``known``: the stream's meta as the caller last saw it (a cached
        scorer's): the plan is made on it without reading it first, and made again if
        its version is no longer the stored one.
        """
        ...

    async def window(self, stream: str) -> np.ndarray:
        """The stored window, oldest first: (n <= window, 1 + C)."""
        ...

    async def load_state(self, stream: str) -> bytes | None: ...

    async def save_state(self, stream: str, blob: bytes, *, scored: int | None = None,
                         receipt: tuple[str, bytes] | None = None) -> int:
        """Write the state blob and, in the same atomic step, the scored-up-to mark
        (``scored``: the stream's points_seen the blob has scored) and a batch's receipt
        (``(idempotency key, response)``); bump the stream's version. Returns the new
        version (0: no such stream)."""
        ...

    async def get_receipt(self, stream: str, key: str) -> bytes | None:
        """The kept response of the batch sent with Idempotency-Key ``key``, if any."""
        ...

    async def put_receipt(self, stream: str, key: str, data: bytes) -> None: ...

    def lock(self, stream: str) -> AbstractAsyncContextManager[None]:
        """Serialises read-modify-write of one stream's state (across replicas for Redis)."""
        ...


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


def encode_point(row: np.ndarray) -> bytes:
    """One point (timestamp + values) as little-endian float64 bytes: exact and compact."""
    return np.ascontiguousarray(row, dtype="<f8").tobytes()


def decode_points(blobs: list[bytes], channels: int) -> np.ndarray:
    if not blobs:
        return np.empty((0, 1 + channels))
    return np.frombuffer(b"".join(blobs), dtype="<f8").reshape(len(blobs), 1 + channels).copy()


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
    """Decide, point by point, what an append does; raises StoreRejection (nothing to
    write) when a policy says reject. Both stores call this, so they agree exactly.

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
            raise StoreRejection(loc, f"timestamp {ts!r} is {previous - ts:g} s before "
                                 f"{after}: more than TSAD_TIMESTAMP_MAX_BACK_SECONDS="
                                 f"{max_back_seconds:g}, so not a repeated or reordered stamp "
                                 "but older data; to send a series again, delete the stream "
                                 "first (tsad replay --reset)")
        if timestamps == "reject":
            raise StoreRejection(loc, f"timestamp {ts!r} is not after {after} (timestamp "
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
        raise StoreRejection(("body", "points", i, "timestamp"),
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
