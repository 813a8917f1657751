"""Scores back as series: every point an ingested stream scores becomes three samples,
``tsad_anomaly_score``, ``tsad_anomaly_likelihood`` (once calibrated) and ``tsad_anomaly``
(0 or 1), labelled like the stream's source series plus ``stream`` and ``for``, remote-
written to TSAD_WRITEBACK_URL (Prometheus run with --web.enable-remote-write-receiver,
VictoriaMetrics, Mimir).

Batched (TSAD_WRITEBACK_BATCH_POINTS, or what TSAD_WRITEBACK_FLUSH_SECONDS gathered),
sent one batch at a time so a series' samples arrive in time order, retried with backoff
(full jitter) on a connection error, a 429 or a 5xx. A 4xx refuses the batch: Prometheus
refuses a whole request for one out-of-order or too-old sample, so the batch is halved
until the refused points are alone, and only they are dropped. The points held are
bounded (TSAD_WRITEBACK_MAX_POINTS, the batch in flight included): while the target is
down the oldest queued points are dropped first, counted in
tsad_writeback_points_dropped_total{reason="queue_full"}.

At most once, best effort: the queue lives in the process, and a crash loses what it held
unsent (a flush interval of points and the batch in flight while the target is up). The
scores are derived output: the points, alerts and webhook events they led to are
committed, and retried samples are not scored again, so a loss is a gap in the score
series, never a wrong or doubled value (service/README.md, "Scores back as series").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Mapping, Sequence

import httpx

from service.ingest.wire import REMOTE_WRITE_HEADERS, encode_remote_write
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("tsad.writeback")
SCORE, LIKELIHOOD, ANOMALY = "tsad_anomaly_score", "tsad_anomaly_likelihood", "tsad_anomaly"
Labels = tuple[tuple[str, str], ...]
# (labels, stored time stamp in ms, score, likelihood or None, anomaly)
Point = tuple[Labels, int, float, float | None, bool]


class ScoreWriter:
    def __init__(self, settings: Settings, metrics: ServiceMetrics,
                 client: httpx.AsyncClient | None = None) -> None:
        assert settings.writeback_url, "ScoreWriter needs TSAD_WRITEBACK_URL"
        self.url = settings.writeback_url
        self.settings = settings
        self.metrics = metrics
        headers = {**REMOTE_WRITE_HEADERS, "User-Agent": "tsad-writeback"}
        if token := settings.writeback_bearer_token:
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        self.client = client or httpx.AsyncClient(
            timeout=settings.writeback_timeout_seconds, headers=headers)
        self.queue: deque[Point] = deque()
        self.inflight = 0
        self._labels: dict[Labels, Labels] = {}  # one tuple per label set, shared
        self._last_sent: dict[Labels, int] = {}  # per score series: its newest stamp sent
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # --- producers ---------------------------------------------------------------------
    def enqueue(self, labels: Mapping[str, str],
                points: Sequence[tuple[float, float, float | None, bool]]) -> None:
        """Queue scored points (stored stamp in s, score, likelihood, anomaly) of one
        stream, whose score series carry ``labels``."""
        key = tuple(sorted(labels.items()))
        key = self._labels.setdefault(key, key)
        for stamp, score, likelihood, anomaly in points:
            self.queue.append((key, round(stamp * 1000), score, likelihood, anomaly))
        # the batch in flight counts: the bound is every point this writer holds
        over = len(self.queue) + self.inflight - self.settings.writeback_max_points
        if over > 0:
            for _ in range(over):  # the oldest go first: the newest matter most
                self.queue.popleft()
            self.metrics.writeback_points_dropped_total.labels("queue_full").inc(over)
        self._gauge()
        self._wake.set()

    # --- the sender --------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self, flush_seconds: float = 2.0) -> None:
        """Send what is queued for up to ``flush_seconds``, then stop."""
        if self._task is None:
            return
        deadline = time.monotonic() + flush_seconds
        while (self.queue or self.inflight) and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.05)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.client.aclose()

    async def _run(self) -> None:
        s = self.settings
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            if len(self.queue) < s.writeback_batch_points:  # gather a batch, or time out
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full(), s.writeback_flush_seconds)
            n = min(len(self.queue), s.writeback_batch_points)
            batch = [self.queue.popleft() for _ in range(n)]
            self.inflight = n
            try:
                await self._send(self._in_order(batch))
            except Exception:  # a bug here must not stop write-back for good
                log.exception("write-back batch failed", extra={"points": n})
            finally:
                self.inflight = 0
                self._gauge()

    async def _full(self) -> None:
        while len(self.queue) < self.settings.writeback_batch_points:
            self._wake.clear()
            await self._wake.wait()

    def _in_order(self, batch: list[Point]) -> list[Point]:
        """The batch sorted by series and time, without points at or before what a series
        already got (two requests of a stream may finish in either order)."""
        batch.sort(key=lambda p: (id(p[0]), p[1]))
        out, late = [], 0
        previous: dict[Labels, int] = {}
        for p in batch:
            newest = previous.get(p[0], self._last_sent.get(p[0], -1))
            if p[1] <= newest:
                late += 1
                continue
            previous[p[0]] = p[1]
            out.append(p)
        if late:
            self.metrics.writeback_points_dropped_total.labels("out_of_order").inc(late)
        return out

    async def _send(self, batch: list[Point]) -> None:
        """Deliver ``batch``: retried while the target is unavailable, halved when it
        refuses it, until every point is written or refused on its own."""
        if not batch:
            return
        body = encode_remote_write(_series(batch))
        attempt = 0
        while True:
            status, detail = await self._post(body)
            if status is not None and 200 <= status < 300:
                self.metrics.writeback_requests_total.labels("ok").inc()
                self.metrics.writeback_points_sent_total.inc(len(batch))
                for p in batch:
                    self._last_sent[p[0]] = max(p[1], self._last_sent.get(p[0], -1))
                return
            if status is None or status == 429 or status >= 500:
                self.metrics.writeback_requests_total.labels("retry").inc()
                cap = min(self.settings.writeback_backoff_max_seconds,
                          self.settings.writeback_backoff_seconds * 2 ** attempt)
                if attempt in (0, 5) or attempt % 20 == 0:  # logged, not flooded
                    log.warning("write-back target unavailable, retrying", extra={
                        "url": self.url, "status": status, "error": detail,
                        "attempt": attempt + 1, "queued": len(self.queue)})
                attempt += 1
                await asyncio.sleep(random.uniform(0, cap))
                continue
            self.metrics.writeback_requests_total.labels("rejected").inc()
            if len(batch) > 1:  # find the refused points: halve, oldest half first
                half = len(batch) // 2
                await self._send(batch[:half])
                await self._send(batch[half:])
                return
            self.metrics.writeback_points_dropped_total.labels("rejected").inc()
            log.warning("write-back point refused", extra={
                "url": self.url, "status": status, "error": detail,
                "labels": dict(batch[0][0]), "timestamp_ms": batch[0][1]})
            return

    async def _post(self, body: bytes) -> tuple[int | None, str]:
        start = time.perf_counter()
        try:
            response = await self.client.post(self.url, content=body)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        finally:
            self.metrics.writeback_request_duration_seconds.observe(
                time.perf_counter() - start)
        return response.status_code, response.text[:200]

    def _gauge(self) -> None:
        self.metrics.writeback_queue_points.set(len(self.queue) + self.inflight)


def _series(batch: list[Point]) -> list[tuple[list[tuple[str, str]], list[tuple[int, float]]]]:
    """The batch's points as remote-write series: three per label set (likelihood only
    where one was reported), labels sorted by name as the protocol requires."""
    out: dict[tuple[Labels, str], list[tuple[int, float]]] = {}
    for labels, stamp, score, likelihood, anomaly in batch:
        out.setdefault((labels, SCORE), []).append((stamp, score))
        if likelihood is not None:
            out.setdefault((labels, LIKELIHOOD), []).append((stamp, likelihood))
        out.setdefault((labels, ANOMALY), []).append((stamp, 1.0 if anomaly else 0.0))
    return [(sorted([("__name__", name), *labels]), samples)
            for (labels, name), samples in out.items()]
