"""A stream's shadows inside its scorer: what the score transaction does for them.

Shadows are scored off the request path (``service/shadows/queue.py``), so a shadow
never adds its detector's cost to a live request. In the transaction, a stream with
shadows only records the live detector's results of the points the store holds (the
stream's ``shadows`` section, committed with the live state in the same transaction:
whatever a shadow still has to score, the live results to compare it with survive a
crash with the points themselves) and hands each shadow the batch (``offers``), for the
queue once the commit is done.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from service import stream_state
from service.alerts.model import Alert
from service.settings import Settings
from service.shadows.config import REGISTRY, ShadowConfig, encode_json, split
from service.shadows.log import LIVE, Columns, LiveResults, alerted
from service.stores.base import StreamMeta, retained


@dataclass
class Offer:
    """A batch for a shadow: the stream's points from index ``first`` (the context the
    windows need, then the batch's points from ``new``) and the live results of all of
    them that are known."""

    stream: str
    config: ShadowConfig
    window: int
    points: np.ndarray
    first: int
    new: int
    live: LiveResults


class StreamShadows:
    def __init__(self, meta: StreamMeta, settings: Settings,
                 configs: dict[str, ShadowConfig], recent: LiveResults,
                 stored: bytes | None = None) -> None:
        self.meta = meta
        self.settings = settings
        self.configs = configs  # every shadow, by name
        self.recent = recent  # the live results of the points the store holds
        self.stored = stored  # the registry section as the store holds it
        self.offers: list[Offer] = []

    @classmethod
    def none(cls, meta: StreamMeta, settings: Settings) -> StreamShadows:
        return cls(meta, settings, {}, LiveResults(meta.points_seen, Columns.empty(LIVE)))

    @classmethod
    def load(cls, meta: StreamMeta, settings: Settings,
             sections: dict[str, bytes]) -> StreamShadows:
        """From the stream's sections: each shadow's binding, the recent live results."""
        _, parts = split(sections)
        configs: dict[str, ShadowConfig] = {}
        for name, own in sorted(parts.items()):
            if "cfg" in own:  # else a section left by a shadow deleted meanwhile
                configs[name] = ShadowConfig.decode(
                    stream_state.decode({"cfg": own["cfg"]})["cfg"])
        blob = sections.get(REGISTRY)
        arrays = stream_state.decode({REGISTRY: blob})[REGISTRY] if blob else {}
        return cls(meta, settings, configs, LiveResults.decode(arrays, meta.points_seen),
                   blob)

    @staticmethod
    def owns(section_name: str) -> bool:
        return section_name == REGISTRY or section_name.startswith("shadow.")

    def __bool__(self) -> bool:
        return bool(self.configs)

    # --- scoring -------------------------------------------------------------------------
    def advance(self, points: np.ndarray, n_new: int, first: int, scores: np.ndarray,
                scored: np.ndarray, anomalous: np.ndarray, live_alerts: Iterable[Alert],
                seconds: float) -> None:
        """The live detector scored the last ``n_new`` of ``points`` (stream indices from
        ``first``) in ``seconds``: keep its results, offer the batch to each shadow."""
        if not self.configs or not n_new:
            return
        ts = points[-n_new:, 0]
        batch = LiveResults(first, Columns.of(
            LIVE, ts=ts, wall=np.full(n_new, time.time()), score=scores, scored=scored,
            anomaly=anomalous, alerted=alerted(ts, live_alerts),
            cost=np.full(n_new, seconds / n_new)))
        end = first + n_new
        held = self.recent.extend(batch)
        live = held.since(end - len(points))  # read only from here on: shared
        self.offers += [Offer(self.meta.stream, config, self.meta.window, points,
                              end - len(points), first, live)
                        for config in self.configs.values()]
        # what the store holds after this batch: the batch, and a chunk and a window more
        self.recent = held.since(first - retained(self.meta.window) + 1)

    def drain(self) -> list[Offer]:
        """The batches for the queue (after the commit)."""
        out, self.offers = self.offers, []
        return out

    # --- state ---------------------------------------------------------------------------
    def registry(self) -> dict[str, np.ndarray]:
        ids = {name: c.id for name, c in self.configs.items()}
        return encode_json(ids) | self.recent.encode()

    def to_commit(self) -> tuple[dict[str, bytes], tuple[str, ...], int]:
        """(changed sections, sections to drop, bytes): the registry section."""
        if not self.configs:
            return {}, (), 0
        blob = stream_state.encode(self.registry())
        changed = {} if blob == self.stored else {REGISTRY: blob}
        self.stored = blob
        return changed, (), len(blob)
