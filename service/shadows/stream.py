"""A stream's shadows inside its scorer: they see every point the live detector scores and
commit with it.

A cheap shadow catches up inside the score transaction whenever the stream completes a
chunk of its index (64 points): between two chunk ends it only waits, so a request of
one point costs a shadow almost nothing, and a chunk is scored in one vectorised call.
The live results it has not caught up with wait in the stream's ``shadows`` section,
committed with the live state, so a crash never leaves a shadow out of step (the
points it still needs are within what the store holds: a chunk more than the window).
A costly shadow (a language model, torch) is scored on the background queue
(``service/shadows/queue.py``): here it only hands over each batch's points and live
results (``offers``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from models.streaming import CHUNK
from service import stream_state
from service.alerts.model import Alert
from service.settings import Settings
from service.shadows.config import REGISTRY, ShadowConfig, encode_json, split
from service.shadows.engine import Caught, ShadowEngine
from service.shadows.log import LIVE, Columns, LiveResults, alerted
from service.stores.base import StreamMeta


@dataclass
class Offer:
    """A batch for a costly shadow: the stream's points from index ``first`` on (the
    context its windows need, then the batch) and the live results of the batch."""

    stream: str
    config: ShadowConfig
    window: int
    points: np.ndarray
    first: int
    live: LiveResults


class StreamShadows:
    def __init__(self, meta: StreamMeta, settings: Settings,
                 configs: dict[str, ShadowConfig], engines: dict[str, ShadowEngine],
                 pending: LiveResults, stored: bytes | None = None) -> None:
        self.meta = meta
        self.settings = settings
        self.configs = configs  # every shadow, by name
        self.engines = engines  # the cheap ones (costly ones run on the queue)
        self.pending = pending  # live results the cheap shadows have not caught up with
        self.stored = stored  # the registry section as the store holds it
        self.caught: list[tuple[str, Caught]] = []  # since the last drain
        self.offers: list[Offer] = []

    @classmethod
    def none(cls, meta: StreamMeta, settings: Settings) -> StreamShadows:
        return cls(meta, settings, {}, {}, LiveResults(meta.points_seen, Columns.empty(LIVE)))

    @classmethod
    def load(cls, meta: StreamMeta, settings: Settings, sections: dict[str, bytes],
             costly_too: bool = False) -> StreamShadows:
        """From the stream's sections: every shadow's binding, and the engines of the
        cheap ones (all, with ``costly_too``: a promotion, a report)."""
        _, parts = split(sections)
        configs: dict[str, ShadowConfig] = {}
        engines: dict[str, ShadowEngine] = {}
        for name, own in sorted(parts.items()):
            if "cfg" not in own:
                continue  # a section left by a shadow deleted meanwhile: not a shadow
            config = ShadowConfig.decode(stream_state.decode({"cfg": own["cfg"]})["cfg"])
            configs[name] = config
            if costly_too or not config.costly:
                engines[name] = ShadowEngine.load(config, meta, settings, own)
        blob = sections.get(REGISTRY)
        arrays = stream_state.decode({REGISTRY: blob})[REGISTRY] if blob else {}
        pending = LiveResults.decode(arrays, meta.points_seen)
        return cls(meta, settings, configs, engines, pending, blob)

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
        ``first`` on) in ``seconds``: record its results, catch up the cheap shadows at a
        chunk end, hand the batch to the costly ones."""
        if not self.configs or not n_new:
            return
        ts = points[-n_new:, 0]
        batch = LiveResults(first, Columns.of(
            LIVE, ts=ts, wall=np.full(n_new, time.time()), score=scores, scored=scored,
            anomaly=anomalous, alerted=alerted(ts, live_alerts),
            cost=np.full(n_new, seconds / n_new)))
        self.pending = self.pending.extend(batch)
        end = first + n_new
        for name, engine in self.engines.items():
            if end // CHUNK > engine.run.mark // CHUNK:  # a chunk completed: catch up
                self._catch_up(name, engine, points, end)
        for config in self.configs.values():
            if config.costly:
                self.offers.append(Offer(self.meta.stream, config, self.meta.window,
                                         points.copy(), end - len(points), batch))
        marks = [e.run.mark for e in self.engines.values()]
        self.pending = self.pending.since(min(marks, default=end))

    def catch_up(self, points: np.ndarray) -> None:
        """Every engine to the stream's last point (``points``: the held points, the
        newest last): before a promotion or a report."""
        for name, engine in self.engines.items():
            self._catch_up(name, engine, points, self.meta.points_seen)

    def _catch_up(self, name: str, engine: ShadowEngine, points: np.ndarray,
                  end: int) -> None:
        caught = engine.catch_up(points, end - len(points), self.pending)
        if caught is not None:
            self.caught.append((name, caught))

    def drain(self) -> tuple[list[tuple[str, Caught]], list[Offer]]:
        """What happened since the last drain (after a commit: metrics, the queue)."""
        out = self.caught, self.offers
        self.caught, self.offers = [], []
        return out

    # --- state ---------------------------------------------------------------------------
    def registry(self) -> dict[str, np.ndarray]:
        ids = {name: c.id for name, c in self.configs.items()}
        return encode_json(ids) | self.pending.encode()

    def to_commit(self) -> tuple[dict[str, bytes], tuple[str, ...], int]:
        """(changed sections, sections to drop, bytes of the shadows' state)."""
        if not self.configs:
            return {}, (), 0
        changed: dict[str, bytes] = {}
        drop: tuple[str, ...] = ()
        blob = stream_state.encode(self.registry())
        if blob != self.stored:
            changed[REGISTRY] = self.stored = blob
        nbytes = len(blob)
        for engine in self.engines.values():
            c, d = engine.to_commit()
            changed |= c
            drop += d
            nbytes += engine.nbytes
        return changed, drop, nbytes
