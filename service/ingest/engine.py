"""Decoded series in, scored streams out: what remote-write, OTLP and watches share.

Each sample is checked first (a stale marker ends a series and is not a point; NaN,
infinities and values or time stamps beyond /score's bounds are dropped and counted: one
bad sample must not refuse its neighbours), then routed to its stream
(``service/ingest/mapping.py``). A series of its own is scored as it comes. A grouped
stream's samples wait as its held rows (``Backend.ingest``: in the store, so an
acknowledged sample survives a crash) until their row is complete: then that row, and
any older one still missing a channel (completed with that channel's last value, as
PromQL's look-back would), are scored. A row still incomplete
TSAD_INGEST_FLUSH_AFTER_SECONDS behind the stream's newest sample is scored as it is. A
sample for a row already stored is late: dropped.

Every stream is scored through ``StreamFeed`` (the /score transaction); streams of one
request run concurrently (TSAD_INGEST_CONCURRENCY). A refusal of /score's rules drops
that stream's points (counted, logged) and never fails the request: a 4xx would make the
sender drop every other series of the request with it, a 5xx retry it forever. A store
outage does fail it (503), and the sender's retry is recognised point by point.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.errors import StoreUnavailable
from service.ingest.feed import Outcome, StreamFeed
from service.ingest.mapping import GroupRule, Route, route
from service.ingest.wire import Series
from service.ingest.writeback import ScoreWriter
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.stores.base import HeldRows, IngestStore
from service.validation import bounds

log = logging.getLogger("tsad.ingest")


@dataclass
class Report:
    accepted: int = 0  # samples handed to their stream (stored, held, or a retry)
    dropped: Counter = field(default_factory=Counter)  # reason -> samples
    streams: int = 0
    scored: int = 0  # points scored by this request
    unavailable: str | None = None  # a store outage: the request must be retried (503)
    problems: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return sum(self.dropped.values())


@dataclass
class _Group:
    """The samples of one request for one stream."""

    route: Route
    stamps: list[np.ndarray] = field(default_factory=list)  # one series' own stream
    values: list[np.ndarray] = field(default_factory=list)
    cells: dict[int, dict[int, float]] = field(default_factory=dict)  # grouped: ms -> ch


class Ingestor:
    def __init__(self, feed: StreamFeed, state: IngestStore, writer: ScoreWriter | None,
                 settings: Settings, metrics: ServiceMetrics,
                 rules: Sequence[GroupRule] = ()) -> None:
        self.feed = feed
        self.state = state
        self.writer = writer
        self.settings = settings
        self.metrics = metrics
        self.rules = list(rules)

    async def ingest(self, series: Sequence[Series], door: str, *, tenant: str | None = None,
                     head: str | None = None, rules: Sequence[GroupRule] | None = None,
                     final: bool = False) -> Report:
        """Score ``series``. ``head`` and ``rules``: a watch's naming and grouping
        instead of the configured rules; ``final``: a grouped row is complete as sent
        (a watch's evaluation holds every channel it will ever have for its time)."""
        report = Report()
        groups: dict[str, _Group] = {}
        rules = self.rules if rules is None else rules
        for s in series:
            keep = self._check(s, report)
            if not keep.any():
                continue
            to = route(s.labels, rules, head=head, tenant=tenant)
            group = groups.setdefault(to.stream, _Group(to))
            report.accepted += int(keep.sum())
            if to.rule is None:
                group.stamps.append(s.timestamps[keep])
                group.values.append(s.values[keep])
            else:
                for t, v in zip(np.rint(s.timestamps[keep] * 1000).astype(np.int64).tolist(),
                                s.values[keep].tolist(), strict=True):
                    group.cells.setdefault(t, {})[to.channel] = v
        report.streams = len(groups)
        slots = asyncio.Semaphore(self.settings.ingest_concurrency)

        async def one(group: _Group) -> None:
            async with slots:
                try:
                    if group.route.rule is None:
                        outcome = await self._score_own(group)
                    else:
                        outcome = await self._score_grouped(group, report, final)
                except StoreUnavailable as exc:
                    report.unavailable = str(exc)
                    return
                except Exception:  # a bug, not a fault: a 5xx would be retried forever
                    log.exception("ingesting a stream failed", extra={
                        "stream": group.route.stream})
                    report.dropped["error"] += sum(map(len, group.stamps)) + sum(
                        len(c) for c in group.cells.values())
                    return
            self._settle(group.route, outcome, report)

        await asyncio.gather(*(one(g) for g in groups.values()))
        for outcome, n in [("accepted", report.accepted), *report.dropped.items()]:
            if n:
                self.metrics.ingest_samples_total.labels(door, outcome).inc(n)
        return report

    def _check(self, s: Series, report: Report) -> np.ndarray:
        """Which samples of a series are points: the others are counted by reason."""
        finite = np.isfinite(s.values)
        stale = s.stale & ~finite
        bad_value = ~finite & ~stale
        broken = bounds(np.column_stack([s.timestamps, s.values]), self.settings)
        out = finite & np.any([bad.reshape(len(bad), -1).any(axis=1)
                               for _, bad, _ in broken], axis=0)
        for reason, mask in (("stale", stale), ("non_finite", bad_value),
                             ("out_of_bounds", out)):
            if n := int(mask.sum()):
                report.dropped[reason] += n
        return finite & ~out

    async def _score_own(self, group: _Group) -> Outcome:
        stamps = np.concatenate(group.stamps)
        values = np.concatenate(group.values)
        if len(group.stamps) > 1:  # one series sent twice in a request: in time order
            order = np.argsort(stamps, kind="stable")
            stamps, values = stamps[order], values[order]
        return await self.feed.score(group.route.stream, stamps, values[:, None])

    async def _score_grouped(self, group: _Group, report: Report, final: bool) -> Outcome:
        rule, stream = group.route.rule, group.route.stream
        async with self.state.holding(stream):  # one request at a time per held rows
            meta, refused = await self.feed.grouped(stream, list(rule.channels))
            if meta is None:
                cells = sum(len(c) for c in group.cells.values())
                return Outcome(stream, sent=cells, rejected=cells, reason=refused)
            held = await self.state.held(stream)
            last = meta.last_timestamp
            for t, cells in group.cells.items():
                if last is not None and t / 1000 <= last:
                    report.dropped["late"] += len(cells)  # its row is stored already
                    report.accepted -= len(cells)
                    continue
                row = held.rows.setdefault(t, [None] * len(rule.channels))
                for channel, value in cells.items():
                    row[channel] = value
            stamps, rows, removed, incomplete = ready_rows(
                held, self.settings.ingest_flush_after_seconds * 1000, final,
                self.settings.max_batch_points)
            if incomplete:
                report.dropped["incomplete"] += incomplete
            outcome = Outcome(stream)
            if len(stamps):
                outcome = await self.feed.score(stream, stamps, rows)
            await self.state.hold(stream, held, removed)
        return outcome

    def _settle(self, to: Route, outcome: Outcome, report: Report) -> None:
        report.scored += len(outcome.scored)
        if outcome.rejected:
            report.dropped["rejected"] += outcome.rejected
            if len(report.problems) < 3:
                report.problems.append(f"{to.stream}: {outcome.reason}")
            log.warning("ingested points refused by the stream's policy", extra={
                "stream": to.stream, "points": outcome.rejected, "reason": outcome.reason})
        if self.writer is not None and outcome.scored:
            self.writer.enqueue(to.labels, outcome.scored)


def ready_rows(held: HeldRows, flush_after_ms: float, final: bool, cap: int
               ) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """Take the rows of ``held`` that are ready, oldest first: every row up to the
    newest complete one, rows ``flush_after_ms`` older than the newest, the oldest beyond
    ``cap``, and all of them when ``final``. A missing value is the channel's last one;
    a row with a channel never seen is dropped. Returns (stamps s, rows, removed stamps
    ms, dropped samples).

    >>> st = HeldRows({1000: [1.0, None], 2000: [2.0, 3.0], 3000: [4.0, None]})
    >>> ts, rows, removed, dropped = ready_rows(st, 1e9, False, 100)
    >>> ts.tolist(), rows.tolist(), removed, dropped, st.rows, st.last
    ([2.0], [[2.0, 3.0]], [1000, 2000], 1, {3000: [4.0, None]}, [2.0, 3.0])
    """
    times = sorted(held.rows)
    if not times:
        return np.empty(0), np.empty((0, 0)), [], 0
    complete = [t for t in times if None not in held.rows[t]]
    cut = times[-1] if final else max(
        complete[-1] if complete else -np.inf, times[-1] - flush_after_ms,
        times[len(times) - cap - 1] if len(times) > cap else -np.inf)
    stamps, rows, removed, dropped = [], [], [], 0
    for t in times:
        if t > cut:
            break
        row = held.rows.pop(t)
        removed.append(t)
        last = held.last or [None] * len(row)
        filled = [v if v is not None else p for v, p in zip(row, last, strict=True)]
        if None in filled:
            dropped += sum(v is not None for v in row)
            continue
        stamps.append(t / 1000)
        rows.append(filled)
        held.last = filled
    return np.asarray(stamps, dtype=np.float64), np.asarray(rows, dtype=np.float64), \
        removed, dropped
