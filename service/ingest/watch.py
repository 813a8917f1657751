"""Watch mode (pull): tsad polls a PromQL query and scores its results as streams.

A watch evaluates its query at times aligned to its step (multiples of ``step`` since
the epoch), each time ``delay`` after it has passed, so that samples scraped just before
it have arrived. A new watch starts ``backfill`` back with ``query_range``; then it
evaluates one step at a time with ``query``. Both give the same value for the same time,
so the stream does not care which one brought a point. After each evaluation is scored,
the watch's cursor (its last evaluated time) is stored with the streams: after a restart
it goes on from there, back-filling the gap (in ranges of at most 10,000 steps). An
evaluation scored but not yet marked is sent again after a crash, and the streams
recognise its points as retries (no point is scored twice).

When Prometheus does not answer, the watch backs off (1 s, doubling up to
TSAD_WATCH_BACKOFF_MAX_SECONDS, full jitter) and then resumes from its cursor. With
Redis, one replica runs each watch at a time (a lease renewed every evaluation, given up
when the service stops; a killed replica's lapses within max(30 s, 3 steps + delay)).
Cursors, leases and the API's watches are ``Backend.ingest``'s.

Streams are named after the watch: ``<watch>.<metric>.<labels>``, or with ``group_by``,
``channels_by`` and ``channels``, one multichannel stream per group, ``<watch>.<labels>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
import socket
import time
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from service.errors import StoreUnavailable
from service.ingest.engine import Ingestor
from service.ingest.mapping import NAME_PATTERN, GroupRule
from service.ingest.promapi import MAX_RANGE_POINTS, PrometheusAPI, QueryError, Unavailable
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.stores.base import IngestStore

log = logging.getLogger("tsad.watch")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def seconds(value: object) -> object:
    """A Prometheus duration ("30s", "1h30m", "500ms") or a number of seconds.

    >>> seconds("1h30m"), seconds("500ms"), seconds(15)
    (5400.0, 0.5, 15)
    """
    if isinstance(value, bool):  # JSON true is not a number of seconds
        raise ValueError("a number of seconds or a duration like 30s, 5m or 1h30m")
    if not isinstance(value, str):
        return value
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        raise ValueError(f"{value!r} is not a duration like 30s, 5m or 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in parts)


_DURATION = r"^(\d+(\.\d+)?(ms|s|m|h|d|w))+$"


def _duration(lo: float, hi: float) -> object:
    """Seconds, or a Prometheus duration string; bounded. The schema says both."""
    return Annotated[float, BeforeValidator(seconds), Field(ge=lo, le=hi), WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": lo, "maximum": hi},
                   {"type": "string", "pattern": _DURATION}]})]


Step = _duration(0.1, 86400)
Backfill = _duration(0, 90 * 86400)
Delay = _duration(0, 3600)


class WatchIn(BaseModel):
    """A watch as PUT /watches/{name} takes it (and a `watches` entry of the YAML file,
    with its `name`)."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=4096, description="PromQL; every series "
                       "of its result is a stream (or a channel of one, with group_by)",
                       examples=['rate(node_network_receive_bytes_total{device="eth0"}[1m])'])
    step: Step = Field(description="seconds (or a duration like "
                           "\"30s\") between evaluations", examples=[30])
    backfill: Backfill | None = Field(
        None, description="how far back a new watch starts (default "
        "TSAD_WATCH_BACKFILL_SECONDS)", examples=["6h"])
    delay: Delay | None = Field(
        None, description="time t is evaluated at t + delay (default "
        "TSAD_WATCH_DELAY_SECONDS)", examples=[5])
    group_by: list[str] | None = Field(
        None, min_length=1, description="labels whose values name a multichannel stream "
        "(needs channels), such as [\"instance\"]")  # no example: one without channels is refused
    channels_by: str = Field("__name__", description="with group_by: the label that tells "
                             "channels apart")
    channels: list[str] | None = Field(None, min_length=1, max_length=1024,
                                       description="with group_by: the channels, in order")

    @model_validator(mode="after")
    def _grouping(self) -> WatchIn:
        if (self.group_by is None) != (self.channels is None):
            raise ValueError("group_by and channels go together")
        return self


class WatchOut(WatchIn):
    name: str = Field(examples=["node-rx"])
    source: str = Field(description="file (TSAD_INGEST_CONFIG, read-only here) or api",
                        examples=["api"])
    evaluated_until: float | None = Field(None, description="the last evaluated time "
                                          "(epoch s); the next is one step after it")
    running_here: bool = Field(description="this replica runs it (with Redis, one does)")
    last_error: str | None = Field(None, description="why the last evaluation failed, "
                                   "while it does")


class WatchList(BaseModel):
    watches: list[WatchOut]


class NamedWatch(WatchIn):
    name: str = Field(pattern=NAME_PATTERN)


def grouping(name: str, spec: WatchIn) -> list[GroupRule]:
    if spec.group_by is None:
        return []
    return [GroupRule(name=name, group_by=spec.group_by, channels_by=spec.channels_by,
                      channels=spec.channels)]


class WatchRunner:
    """Runs every watch (the file's and the API's) in this process, each in its task,
    and follows changes made through the API (by any replica) within a few seconds."""

    SYNC_SECONDS = 3.0

    def __init__(self, ingestor: Ingestor, state: IngestStore, api: PrometheusAPI | None,
                 settings: Settings, metrics: ServiceMetrics,
                 file_watches: dict[str, WatchIn]) -> None:
        self.ingestor, self.state, self.api = ingestor, state, api
        self.settings, self.metrics = settings, metrics
        self.file_watches = file_watches
        # this process, as a lease holder
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"
        self._tasks: dict[str, tuple[WatchIn, asyncio.Task]] = {}
        self.errors: dict[str, str | None] = {}
        self.holding: set[str] = set()
        self._supervisor: asyncio.Task | None = None

    async def start(self) -> None:
        if self.api is not None:
            self._supervisor = asyncio.create_task(self._supervise())

    async def stop(self) -> None:
        tasks = [t for _, t in self._tasks.values()]
        if self._supervisor:
            tasks.append(self._supervisor)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for name in list(self.holding):  # another replica takes over now, not in 30 s
            with contextlib.suppress(StoreUnavailable):
                await self.state.release(name, self.owner)
        if self.api is not None:
            await self.api.close()

    async def specs(self) -> dict[str, tuple[WatchIn, str]]:
        """Every watch and where it is defined; the file's win over the API's."""
        stored = {n: (WatchIn(**s), "api") for n, s in (await self.state.watches()).items()}
        return stored | {n: (w, "file") for n, w in self.file_watches.items()}

    async def _supervise(self) -> None:
        while True:
            try:
                await self.sync()
            except StoreUnavailable as exc:
                log.warning("watch list unavailable", extra={"error": str(exc)})
            await asyncio.sleep(self.SYNC_SECONDS)

    async def sync(self) -> None:
        """Start the watches that are new or changed, stop the ones that went."""
        wanted = {n: spec for n, (spec, _) in (await self.specs()).items()}
        for name in list(self._tasks):
            spec, task = self._tasks[name]
            if wanted.get(name) != spec:
                task.cancel()
                del self._tasks[name]
                self.holding.discard(name)
        for name, spec in wanted.items():
            if name not in self._tasks:
                self._tasks[name] = (spec, asyncio.create_task(self._run(name, spec)))

    async def _run(self, name: str, spec: WatchIn) -> None:
        failures = 0
        while True:
            try:
                pause = await self.evaluate(name, spec)
                self.errors[name] = None
                failures = 0
            except (Unavailable, StoreUnavailable, QueryError) as exc:
                failures += 1
                self.errors[name] = f"{type(exc).__name__}: {exc}"
                self.metrics.watch_evaluations_total.labels(name, "error").inc()
                cap = self.settings.watch_backoff_max_seconds
                pause = cap if isinstance(exc, QueryError) else random.uniform(
                    0, min(cap, 2.0 ** (failures - 1)))
                if failures in (1, 5) or failures % 50 == 0:
                    log.warning("watch evaluation failed, backing off", extra={
                        "watch": name, "error": str(exc), "failures": failures,
                        "retry_in_seconds": round(pause, 2)})
            except Exception:  # a bug must not end the watch: log it, try again later
                log.exception("watch evaluation crashed", extra={"watch": name})
                pause = self.settings.watch_backoff_max_seconds
            await asyncio.sleep(pause)

    async def evaluate(self, name: str, spec: WatchIn) -> float:
        """Evaluate what is due, score it, move the cursor; returns how long to wait."""
        s = self.settings
        step = round(spec.step * 1000)  # integer ms: aligned times stay exact
        delay = s.watch_delay_seconds if spec.delay is None else spec.delay
        if not await self.state.lease(name, self.owner, max(30.0, 3 * spec.step + delay)):
            self.holding.discard(name)
            return spec.step  # another replica runs it
        self.holding.add(name)
        now = time.time()
        due = math.floor((now - delay) * 1000 / step) * step
        cursor = await self.state.cursor(name)
        if cursor is None:
            backfill = s.watch_backfill_seconds if spec.backfill is None else spec.backfill
            last = math.floor((now - delay - backfill) * 1000 / step) * step - step
        else:
            last = round(cursor * 1000)
        if due <= last:
            return (last + step) / 1000 + delay - now
        start = last + step
        end = min(due, start + (MAX_RANGE_POINTS - 1) * step)
        assert self.api is not None
        if end == start:
            series = await self.api.query(spec.query, start / 1000)
        else:
            series = await self.api.query_range(spec.query, start / 1000, end / 1000,
                                                step / 1000)
        report = await self.ingestor.ingest(series, "watch", head=name,
                                            rules=grouping(name, spec), final=True)
        if report.unavailable:
            raise StoreUnavailable(report.unavailable)
        await self.state.set_cursor(name, end / 1000)
        self.metrics.watch_evaluations_total.labels(name, "ok").inc()
        self.metrics.watch_lag_seconds.labels(name).set(time.time() - end / 1000)
        return 0.0 if end < due else (end + step) / 1000 + delay - time.time()

    def forget(self, name: str) -> None:
        """A deleted watch: its series of metrics go."""
        for gauge, labels in ((self.metrics.watch_lag_seconds, (name,)),
                              (self.metrics.watch_evaluations_total, (name, "ok")),
                              (self.metrics.watch_evaluations_total, (name, "error"))):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        self.errors.pop(name, None)
