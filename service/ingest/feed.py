"""The ingest doors' way into the score transaction of POST /score.

Remote-write, OTLP and watches call the same ``ScoreTransaction`` (``service/
transaction.py``) as the /score router, with arrays, so they get exactly what /score
does: the stream's lock, the atomic append before anything is acknowledged, the
timestamp policy and retry recognition, the limits, the commit of state, alerts and
webhook events, crash recovery. What is the doors' own is here: batches of at most
TSAD_MAX_BATCH_POINTS, a refusal by the stream's rules counted instead of raised (an
error would make the sender drop, or retry forever, the request's other series), stored
points sent again before new ones split from them, and grouped streams created with
their channels' names (``StreamAdmin.put``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from service.errors import Conflict, InvalidInput, LimitReached, ServiceError
from service.schemas import StreamConfigIn
from service.stores.base import StreamMeta
from service.streams import StreamAdmin
from service.transaction import ScoreOutcome, ScoreTransaction

# what the stream's rules refuse (a 4xx of /score); StoreUnavailable is not one: it is
# transient, and propagates so that the sender retries
REFUSALS = (InvalidInput, Conflict, LimitReached)
# (stored time stamp (epoch s), score, likelihood (None until calibrated), anomaly)
ScoredPoint = tuple[float, float, float | None, bool]


@dataclass
class Outcome:
    """What became of one stream's points."""

    stream: str
    sent: int = 0
    stored: int = 0  # appended (as sent, or nudged)
    duplicate: int = 0  # retries of stored points: not stored again
    dropped: int = 0  # the timestamp policy dropped them
    rejected: int = 0  # refused by the stream's rules (a 4xx of /score)
    reason: str | None = None  # why, when rejected
    # every point scored now, in order (those a crash had left unscored first)
    scored: list[ScoredPoint] = field(default_factory=list)


class StreamFeed:
    def __init__(self, score: ScoreTransaction, streams: StreamAdmin) -> None:
        self.transaction = score
        self.streams = streams
        self.backend = score.backend
        self.batch = score.settings.max_batch_points

    async def grouped(self, stream: str, channel_names: list[str]
                      ) -> tuple[StreamMeta | None, str | None]:
        """A grouped stream, created with its channels' names when new (its first append
        would create it nameless): (its meta, None), or (None, why) when the service's
        rules refuse it (the stream cap, too many channels)."""
        meta = await self.backend.streams.get(stream)
        if meta is None:
            try:
                await self.streams.put(stream, StreamConfigIn(
                    channels=len(channel_names), channel_names=channel_names))
            except REFUSALS as exc:
                return None, exc.message
            meta = await self.backend.streams.get(stream)
        return meta, None

    async def score(self, stream: str, timestamps: np.ndarray, values: np.ndarray
                    ) -> Outcome:
        """Score (N,) time stamps (epoch s) and (N, C) values on ``stream`` as POST /score
        would, in batches of at most TSAD_MAX_BATCH_POINTS. A batch the stream's rules
        refuse (a stamp too far back, another channel count, the stream cap) is counted
        as rejected with its reason."""
        out = Outcome(stream)
        for start in range(0, len(timestamps), self.batch):
            ts = timestamps[start:start + self.batch]
            vs = values[start:start + self.batch]
            out.sent += len(ts)
            try:
                self._settle(await self.transaction(stream, ts, vs), out)
            except REFUSALS as exc:
                # Points already stored, sent again with new ones after them (a watch
                # evaluating again after a crash, a sender replaying its log after a
                # restart), are refused as one /score batch: sent as two, the stored
                # ones are answered as retries and the new ones stored.
                meta = await self.backend.streams.get(stream)
                last = None if meta is None else meta.last_timestamp
                cut = 0 if last is None else int(np.searchsorted(ts, last, side="right"))
                if not 0 < cut < len(ts):
                    _refused(out, len(ts), exc)
                    continue
                for part in (slice(0, cut), slice(cut, None)):
                    try:
                        self._settle(await self.transaction(stream, ts[part], vs[part]),
                                     out)
                    except REFUSALS as exc:
                        _refused(out, len(ts[part]), exc)
        return out

    @staticmethod
    def _settle(done: ScoreOutcome, out: Outcome) -> None:
        appended, results = done.appended, done.results
        assert appended is not None  # no Idempotency-Key: never a kept response
        actions = Counter(appended.actions)
        out.stored += actions["stored"] + actions["nudged"]
        out.duplicate += actions["duplicate"]
        out.dropped += actions["dropped"]
        if results is None:
            return
        # the scorer's rows are the last to_score stored points
        stamps = appended.points[len(appended.points) - appended.to_score:, 0]
        for k in np.flatnonzero(results.scored).tolist():
            likelihood = float(results.likelihood[k])
            out.scored.append((float(stamps[k]), float(results.scores[k]),
                               None if likelihood != likelihood else likelihood,
                               bool(results.anomalous[k])))


def _refused(out: Outcome, n: int, exc: ServiceError) -> None:
    out.rejected += n
    out.reason = exc.message
