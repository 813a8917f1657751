"""The storage interface: everything the service keeps, behind one declared ``Backend``.

A backend is one package (``service/stores/memory``, ``service/stores/redis``: a single
Redis or a Redis Cluster) with six parts and an explicit atomic commit:

* ``streams`` (``StreamStore``): per stream, its metadata (channels, window, detector,
  points seen, the scored-up-to mark, last timestamp, timestamp policy, version), its
  last points, its state *sections* (named byte strings: the detector, the loop, the
  threshold, the alert tracker, feedback, ...), the kept responses of batches sent with
  an Idempotency-Key (receipts, and *pending* receipts: written with a batch's append,
  completed by the commit that scores its points) and its lock;
* ``alerts`` (``AlertStore``): alert records, queried by stream, state and time;
* ``webhooks`` (``WebhookStore``): subscriptions, the outbox of alert events, deliveries
  and dead letters;
* ``keys`` (``KeyStore``): API key records;
* ``ingest`` (``IngestStore``): what the Prometheus-native doors keep between requests
  (``service/ingest/``): the rows of grouped streams still waiting for a channel, the
  watches made over the API, each watch's cursor and which replica runs it;
* ``commit(Commit)``: a scored batch's changed sections, its scored-up-to mark, the
  alerts and events it raised and its receipt, written in one atomic step (see
  ``service/README.md``, "Durability").

Per-stream policy is fixed when the backend is built (``StreamPolicy``: the defaults of a
stream its first points create, the service-wide duplicate and timestamp rules) or when
the stream is set up (its own timestamp policy in its metadata), never passed per call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from models.streaming import CHUNK
from service.errors import StoreUnavailable

if TYPE_CHECKING:
    from service.alerts.model import Alert
    from service.alerts.query import AlertQuery
    from service.auth.keys import ApiKey
    from service.webhooks.model import Subscription

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
# What binds a stream to its detector (StreamMeta fields): ``Commit.binding`` sets them all
BINDING = ("detector", "params", "threshold", "alert_budget_per_day")
# The section a stream's state was kept in, whole, before state had sections
# (service/stream_state.py splits it)
LEGACY_SECTION = "legacy"


def retained(window: int) -> int:
    """Points a store keeps for a stream of this window."""
    return window + HISTORY_EXTRA


@dataclass(frozen=True)
class StreamPolicy:
    """What a backend applies to every append, fixed when it is built."""

    window: int = 64  # a stream created by its first points gets this window...
    detector: str = "ensemble"  # ...and this detector
    timestamps: TimestampPolicy = "reject"  # for streams that set no policy of their own
    duplicates: DuplicatePolicy = "reject"
    max_back_seconds: float = math.inf  # further behind is refused under every policy
    unscored_max_points: int = 10_000  # points a crash left unscored, held to score later
    ttl_seconds: int = 0  # idle streams expire (0: never)
    receipt_ttl_seconds: int = 86_400


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
    timestamps: TimestampPolicy | None = None  # None = the backend's policy
    # the detector's Config overrides for this stream, over TSAD_DETECTOR_PARAMS (None: none)
    params: dict | None = None
    # points whose scores are committed with the state (the scored-up-to mark); None: a
    # stream stored before the mark existed, taken as all scored
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
    # before the batch (for an append with ``known`` meta, only those scoring the batch
    # needs: window - 1, or up to retained(window) - 1 when it completes a chunk),
    # followed by the accepted points. Column 0 is the timestamp (as stored). (K, 1 + C)
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


@dataclass(frozen=True)
class PendingReceipt:
    """A batch sent with an Idempotency-Key, written with its append (atomically): if the
    process dies before the commit that keeps the batch's response, whoever scores the
    batch's points later (the stream's next request, start-up recovery) finds it
    (``StreamStore.pending_receipts``) and completes it with their results. ``encode``
    makes the bytes kept from what the append decided: each point's action and stored
    stamp, and the stream's ``created_at``."""

    key: str
    encode: Callable[[list[PointAction], list[float | None], float], bytes]


@dataclass
class Commit:
    """What one atomic write stores for a stream (``Backend.commit``)."""

    stream: str
    sections: dict[str, bytes] = field(default_factory=dict)  # changed sections only
    drop: tuple[str, ...] = ()  # sections to remove (e.g. a shadow detector retired)
    scored: int | None = None  # the scored-up-to mark (None: unchanged)
    receipt: tuple[str, bytes] | None = None  # (Idempotency-Key, the kept response)
    # the receipts of further requests committed together with it (served as one batch)
    receipts: list[tuple[str, bytes]] = field(default_factory=list)
    # pending receipts of earlier batches whose points this commit scored (a crash had
    # left them unscored), completed: Idempotency-Key -> the kept response
    completed: dict[str, bytes] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)  # records the batch changed
    events: list[dict] = field(default_factory=list)  # alert events, to the outbox
    # the stream's detector binding, switched with its state (a shadow promoted): None, or
    # every field of BINDING; unlike PUT /streams, it keeps the state it is written with
    binding: dict | None = None
    # the stream's lock as ``streams.lock`` yielded it, when the commit is the last write
    # under it: a backend may release it with the commit (Redis: in the same script)
    release: object | None = None

    @property
    def all_receipts(self) -> list[tuple[str, bytes]]:
        """Every response this commit keeps (none of them pending any more)."""
        return (([self.receipt] if self.receipt is not None else []) + self.receipts
                + list(self.completed.items()))

    @property
    def writes_state(self) -> bool:
        """A state write (bumps the stream's version), not a receipt alone."""
        return bool(self.sections or self.drop or self.scored is not None
                    or self.alerts or self.events or self.binding)


class StreamStore(Protocol):
    """Streams: metadata, points, state sections, receipts, locks."""

    policy: StreamPolicy

    async def put(self, meta: StreamMeta) -> tuple[StreamMeta, bool]:
        """Create a stream or update its configuration; (meta, created). Conflict when
        ``channels`` differs from the stored stream's. A change of window, detector or
        its params drops the stream's state sections."""
        ...

    async def get(self, stream: str) -> StreamMeta | None: ...

    async def list(self, limit: int | None = None,
                   after: str | None = None) -> list[StreamMeta]:
        """Streams by id, ascending: at most ``limit``, only ids after ``after``."""
        ...

    async def count(self, exact: bool = False, prefix: str | None = None) -> int:
        """Streams stored (only ids starting with ``prefix`` when given: a tenant's).
        Redis counts its index, which may still hold streams expired by TTL; ``exact``
        tidies those first (one round trip per call, O(streams)). With a prefix, Redis
        scans its index (O(streams)): a tenant's count is taken when it creates one."""
        ...

    async def versions(self, streams: Collection[str]) -> dict[str, tuple[float, int]]:
        """(created_at, version) of each of ``streams`` that exists, in one round trip:
        what a process checks its cached scorers against."""
        ...

    async def delete(self, stream: str) -> bool: ...

    async def append(self, stream: str, points: np.ndarray, *,
                     known: StreamMeta | None = None,
                     pending: PendingReceipt | None = None,
                     lock: object = None) -> AppendResult:
        """Atomically append ``points`` (N, 1 + C; column 0 the timestamp) as
        ``plan_append`` decides under the stream's timestamp policy (else the backend's),
        and trim the points to what scoring needs.

        Creates the stream (the policy's window and detector) when it does not exist.
        Raises InvalidInput (nothing written) on a channel-count mismatch or when the
        plan rejects a point. ``known``: the stream's meta as the caller last saw it (a
        cached scorer's): the plan is made on it without reading it first, and made again
        if its version is no longer the stored one; the context returned is then only
        what scoring the batch needs (``plan.context_needed``). ``pending``: the batch's
        pending receipt, written with the append (``PendingReceipt``). ``lock``: the
        stream's lock as ``lock(stream, deferred=True)`` yielded it: if not held yet, the
        append takes it first (on Redis in the same round trip), and returns holding it.
        """
        ...

    async def window(self, stream: str, last: int | None = None) -> np.ndarray:
        """The stored window, oldest first: (n <= window, 1 + C); ``last``: up to that many
        of the points held instead (e.g. ``retained(window)``, for a detector to warm up)."""
        ...

    async def sections(self, stream: str,
                       names: Collection[str] | None = None) -> dict[str, bytes]:
        """The stream's state sections (only ``names`` when given; absent ones are
        left out); a state kept whole by an earlier version comes as LEGACY_SECTION."""
        ...

    async def receipt(self, stream: str, key: str) -> bytes | None:
        """The kept response of the batch sent with Idempotency-Key ``key``, if any (or
        its pending receipt, until a commit completes it)."""
        ...

    async def pending_receipts(self, stream: str) -> dict[str, bytes]:
        """The stream's pending receipts (Idempotency-Key -> bytes): batches stored whose
        response no commit has kept yet."""
        ...

    def lock(self, stream: str, deferred: bool = False) -> AbstractAsyncContextManager[object]:
        """Serialises read-modify-write of one stream (across replicas for Redis), its
        writers served in arrival order. Yields a handle that the last commit under it
        may carry (``Commit.release``). ``deferred``: the block's first call is an
        ``append`` given the handle, which takes the lock (nothing reads before it)."""
        ...


class AlertStore(Protocol):
    """Alert records (written by ``Backend.commit``)."""

    async def get(self, alert_id: str) -> dict | None: ...

    async def list(self, query: AlertQuery) -> tuple[list[dict], str | None]: ...

    async def count_open(self) -> int: ...

    async def forget_stream(self, stream: str) -> list[dict]:
        """The stream was deleted: its open alert resolves (event reason "stream
        deleted", so receivers see the incident end) and all its alerts expire after
        the retention like resolved ones. Returns the events emitted."""
        ...


class WebhookStore(Protocol):
    """Subscriptions, the event outbox, deliveries and dead letters."""

    async def add(self, sub: Subscription) -> None: ...

    async def remove(self, sub_id: str) -> bool:
        """Unsubscribe; its pending deliveries become dead letters (reason DELETED)."""
        ...

    async def subscriptions(self) -> dict[str, Subscription]: ...
    async def recover(self) -> None: ...
    async def fan_out(self, subs: dict[str, Subscription], limit: int) -> int: ...
    async def claim_due(self, now: float, limit: int, lease: float) -> list[dict]: ...
    async def ack(self, delivery: dict) -> None: ...
    async def retry(self, delivery: dict, due: float) -> None:
        """Due again at ``due``, and *waiting* on its subscription until then (a failed
        attempt, or held back behind its alert's previous event)."""
        ...

    async def release(self, subscription_id: str) -> int:
        """The subscription's receiver answered: its waiting deliveries are due at once,
        oldest event first (due = the event's time). Returns how many."""
        ...

    async def pending(self, delivery_ids: Collection[str]) -> dict[str, float]:
        """The due time of each of these deliveries still queued (claimed ones: their
        lease's end)."""
        ...
    async def bury(self, delivery: dict) -> None: ...
    async def dead_letters(self, limit: int) -> list[dict]: ...
    async def dead_letter(self, delivery_id: str) -> dict | None: ...
    async def replay(self, delivery_id: str) -> dict | None: ...
    async def depth(self) -> int: ...


class KeyStore(Protocol):
    """API key records (hashes only)."""

    async def add(self, key: ApiKey) -> None: ...
    async def get(self, kid: str) -> ApiKey | None: ...
    async def list(self) -> list[ApiKey]: ...
    async def revoke(self, kid: str) -> bool: ...


Row = list[float | None]  # one value per channel; None: not arrived yet


@dataclass
class HeldRows:
    """A grouped stream's rows not yet stored, by time stamp (ms), and the last stored
    value of each channel (what a row missing one is completed with)."""

    rows: dict[int, Row] = field(default_factory=dict)
    last: Row | None = None

    def copy(self) -> HeldRows:
        return HeldRows({t: list(row) for t, row in self.rows.items()},
                        None if self.last is None else list(self.last))


class IngestStore(Protocol):
    """What the Prometheus-native doors keep (``service/ingest/``). Held rows live in the
    stream's slot; watches, cursors and leases in one slot of their own."""

    async def held(self, stream: str) -> HeldRows:
        """A grouped stream's held rows (a copy: change it, then ``hold`` it)."""
        ...

    async def hold(self, stream: str, held: HeldRows, removed: Collection[int]) -> None:
        """Keep ``held`` as the stream's held rows, the rows at ``removed`` (ms) gone."""
        ...

    def holding(self, stream: str) -> AbstractAsyncContextManager[None]:
        """Serialises read-modify-write of one stream's held rows (across replicas for
        Redis); taken outside the stream's own lock, which scoring takes."""
        ...

    async def forget_stream(self, stream: str) -> None:
        """The stream was deleted: its held rows go (a new stream of the id starts bare)."""
        ...

    async def watches(self) -> dict[str, dict]:
        """The watches made over the API: name -> definition."""
        ...

    async def put_watch(self, name: str, spec: dict) -> bool:
        """Store a watch's definition; True when it is new."""
        ...

    async def delete_watch(self, name: str) -> bool:
        """Forget a watch and its cursor; False when there was none."""
        ...

    async def cursor(self, name: str) -> float | None:
        """A watch's last evaluated time (epoch s); None: not evaluated yet."""
        ...

    async def set_cursor(self, name: str, t: float) -> None: ...

    async def lease(self, name: str, owner: str, seconds: float) -> bool:
        """Take, or renew if ``owner`` holds it, the right to run watch ``name`` for
        ``seconds``; False while another owner holds it."""
        ...

    async def release(self, name: str, owner: str) -> None:
        """Give the lease up (if ``owner`` holds it): another replica may take it now."""
        ...


class Backend(Protocol):
    """One storage backend: its parts and the atomic commit that spans them."""

    name: str  # "memory" | "redis" (the metrics' backend label)
    streams: StreamStore
    alerts: AlertStore
    webhooks: WebhookStore
    keys: KeyStore
    ingest: IngestStore

    async def commit(self, commit: Commit) -> int:
        """Write ``commit`` atomically (a receipt alone needs no atomicity with anything)
        and bump the stream's version when it writes state; returns the version (0: no
        such stream)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


__all__ = ["BINDING", "LEGACY_SECTION", "AlertStore", "AppendResult", "Backend", "Commit",
           "DuplicatePolicy", "HeldRows", "IngestStore", "KeyStore", "PendingReceipt",
           "PointAction", "StoreUnavailable", "StreamMeta", "StreamPolicy", "StreamStore",
           "TimestampPolicy", "WebhookStore", "retained"]
