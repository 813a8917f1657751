"""The window-store protocol, shared by the Redis and in-memory implementations.

A store keeps, per stream: its metadata (channel count, window length, detector, points
seen, last timestamp), the last ``window`` points, and an opaque state blob (the stream's
online detector and threshold). ``append`` validates ordering and channel count and writes
atomically: either every accepted point of the batch is stored or none is.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import numpy as np

from models.streaming import CHUNK

DuplicatePolicy = Literal["reject", "drop"]

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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AppendResult:
    meta: StreamMeta  # after the append
    created: bool  # this append created the stream
    dropped: int  # leading points dropped as exact duplicates (policy "drop")
    accepted: int  # points written
    # Context then accepted points, oldest first: up to retained(window) - 1 points stored
    # before the batch, followed by the accepted points. Column 0 is the timestamp. (K, 1 + C)
    points: np.ndarray


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
    ) -> AppendResult:
        """Atomically append ``points`` (N, 1 + C; column 0 the timestamp, strictly
        increasing) and trim the window to its last ``window`` points.

        Creates the stream from the first batch when it does not exist. Raises
        StoreRejection (nothing written) on a channel-count mismatch or a timestamp not
        after the stream's last one; with ``duplicates="drop"``, leading points that
        exactly equal stored points are dropped instead.
        """
        ...

    async def window(self, stream: str) -> np.ndarray:
        """The stored window, oldest first: (n <= window, 1 + C)."""
        ...

    async def load_state(self, stream: str) -> bytes | None: ...

    async def save_state(self, stream: str, blob: bytes) -> None: ...

    def lock(self, stream: str) -> AbstractAsyncContextManager[None]:
        """Serialises read-modify-write of one stream's state (across replicas for Redis)."""
        ...


def encode_point(row: np.ndarray) -> bytes:
    """One point (timestamp + values) as little-endian float64 bytes: exact and compact."""
    return np.ascontiguousarray(row, dtype="<f8").tobytes()


def decode_points(blobs: list[bytes], channels: int) -> np.ndarray:
    if not blobs:
        return np.empty((0, 1 + channels))
    return np.frombuffer(b"".join(blobs), dtype="<f8").reshape(len(blobs), 1 + channels).copy()
