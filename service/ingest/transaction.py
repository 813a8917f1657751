"""The one door from ``service/ingest/`` into the scoring transaction of POST /score.

Remote-write, OTLP and watches score their points through here, so they get exactly what
/score does: the stream's lock, the atomic append before anything is acknowledged, the
timestamp policy (nudge, drop, reject) and retry recognition, the limits, the commit of
state, alerts and webhook events, crash recovery. Nothing else in the package touches
the pipeline or the stores: when the pipeline becomes a plain transaction object called
with (stream, timestamps, values), only this module changes.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import numpy as np
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from service.pipeline import ScoringPipeline
from service.schemas import ScoreRequest, StreamConfigIn
from service.stores.base import StoreRejection


@dataclass
class Outcome:
    """What became of one stream's points."""

    stream: str
    sent: int = 0
    stored: int = 0  # appended (as sent, or nudged)
    duplicate: int = 0  # retries of stored points: not stored again
    dropped: int = 0  # the timestamp policy dropped them
    rejected: int = 0  # the whole batch refused by a policy (a 4xx of /score)
    reason: str | None = None  # why, when rejected
    # the points scored now (a retried point a crash left unscored included), in order:
    # stored time stamp (epoch s), score, likelihood (None until calibrated), anomaly
    scored: list[tuple[float, float, float | None, bool]] = field(default_factory=list)


class ScoringTransaction:
    def __init__(self, pipeline: ScoringPipeline) -> None:
        self.pipeline = pipeline
        self._known: set[str] = set()  # streams seen to exist (with their channel names)

    @property
    def raw_store(self):  # noqa: ANN201 - the backend (memory or Redis) under the metrics
        """The store's backend, where the ingest state (grouping stage, watches) lives
        beside the streams."""
        return getattr(self.pipeline.store, "inner", self.pipeline.store)

    def lock(self, name: str) -> AbstractAsyncContextManager[None]:
        """A lock of the store's kind (a lease across replicas with Redis) on ``name``."""
        return self.pipeline.store.lock(name)

    async def last_timestamp(self, stream: str) -> float | None:
        meta = await self.pipeline.store.get_stream(stream)
        return None if meta is None else meta.last_timestamp

    async def ensure_stream(self, stream: str, channel_names: list[str]) -> str | None:
        """A grouped stream is created with its channels' names (its first append would
        create it nameless). Returns why not when a policy refuses it (the stream cap,
        too many channels), else None."""
        if stream in self._known:
            return None
        if await self.pipeline.store.get_stream(stream) is None:
            try:
                await self.pipeline.put_stream(stream, StreamConfigIn(
                    channels=len(channel_names), channel_names=channel_names))
            except (StoreRejection, RequestValidationError, HTTPException) as exc:
                return _reason(exc)
        self._known.add(stream)
        return None

    async def score(self, stream: str, timestamps: np.ndarray, values: np.ndarray
                    ) -> Outcome:
        """Score (N,) time stamps (epoch s) and (N, C) values on ``stream`` as POST /score
        would, in batches of at most TSAD_MAX_BATCH_POINTS. A batch the policy refuses (a
        4xx of /score: a stamp too far back, a channel count that differs, the stream
        cap) is counted as rejected with its reason; StoreUnavailable (a 503) propagates:
        it is transient, and the sender retries."""
        out = Outcome(stream)
        size = self.pipeline.settings.max_batch_points
        for start in range(0, len(timestamps), size):
            ts, vs = timestamps[start:start + size], values[start:start + size]
            out.sent += len(ts)
            try:
                await self._batch(stream, ts, vs, out)
            except (StoreRejection, RequestValidationError, HTTPException) as exc:
                # Points already stored, sent again with new ones after them (a watch
                # evaluating again after a crash, a sender replaying its log after a
                # restart), are a 422 as one /score batch: sent as two, the stored ones
                # are answered as retries and the new ones stored.
                last = await self.last_timestamp(stream)
                cut = 0 if last is None else int(np.searchsorted(ts, last, side="right"))
                if not 0 < cut < len(ts):
                    out.rejected += len(ts)
                    out.reason = _reason(exc)
                    continue
                for part in (slice(0, cut), slice(cut, None)):
                    try:
                        await self._batch(stream, ts[part], vs[part], out)
                    except (StoreRejection, RequestValidationError, HTTPException) as exc:
                        out.rejected += len(ts[part])
                        out.reason = _reason(exc)
        return out

    async def _batch(self, stream: str, ts: np.ndarray, vs: np.ndarray, out: Outcome
                     ) -> None:
        # constructed, not validated: the values are finite floats already, and the
        # pipeline checks what /score checks beyond the schema
        request = ScoreRequest.model_construct(
            stream=stream, points=None, timestamps=ts.tolist(), values=vs.tolist())
        response = await self.pipeline.score(request)
        for r in response["results"]:
            status = r["status"]
            if status in ("duplicate", "dropped"):
                setattr(out, status, getattr(out, status) + 1)
            else:
                out.stored += 1
            if status == "scored" and r["score"] is not None:
                out.scored.append((r["stored_timestamp"], r["score"], r["likelihood"],
                                   bool(r["anomaly"])))


def _reason(exc: Exception) -> str:
    """A refusal of /score in a few words, for logs (the message names the setting)."""
    if isinstance(exc, StoreRejection):
        return exc.message
    if isinstance(exc, RequestValidationError):
        return "; ".join(str(e.get("msg")) for e in exc.errors()[:2])
    return str(getattr(exc, "detail", exc))
