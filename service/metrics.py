"""Every Prometheus metric of the service, defined once. Units are in the names.

The service builds one ``ServiceMetrics`` on its own registry; tests build a fresh one.
The embedding path's metrics are defined in ``models/lm/metrics.py`` (the ML core is
importable without the server) and registered here on the same registry.

With ``tsad serve --workers N`` every worker writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory per start, made by the CLI) and
``exposition`` merges them, so ``/metrics`` is the whole service whichever worker answers.
A gauge says how its workers' values combine (``multiprocess_mode``); a single process
ignores it.

Per-stream series (``tsad_stream_*{stream}``) exist only for streams admitted by
``StreamSeries``: an allow-list of globs (``TSAD_METRICS_STREAMS``) with a cap
(``TSAD_METRICS_MAX_STREAMS``), so label cardinality stays bounded however many streams
the service sees.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import threading
from collections.abc import Iterable, Sequence
from typing import get_args

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from models.lm.metrics import EmbeddingMetrics
from service.feedback.schemas import FeedbackLabel

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
ADAPTATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
THRESHOLD_BUCKETS = (0.5, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100, 1000)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
MAX_CHANNEL_SERIES = 16  # channels per stream in tsad_stream_top_channel_total, then "other"


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.http_requests_total = Counter(
            "tsad_http_requests_total", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=r)
        self.http_request_duration_seconds = Histogram(
            "tsad_http_request_duration_seconds", "HTTP request latency",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.points_ingested_total = Counter(
            "tsad_points_ingested_total", "Points accepted into stream windows", registry=r)
        self.points_rejected_total = Counter(
            "tsad_points_rejected_total", "Points in requests rejected with a 4xx", registry=r)
        self.points_duplicate_total = Counter(
            "tsad_points_duplicate_total", "Retried points (duplicates of stored ones) "
            "answered, not stored again",
            registry=r)
        self.points_reordered_total = Counter(
            "tsad_points_reordered_total", "Points whose timestamp was not after the "
            "previous point's, by what the timestamp policy did (nudged: stored 1 ms after "
            "it; dropped: not stored)", ["action"], registry=r)
        for action in ("nudged", "dropped"):  # exported from the start, at 0
            self.points_reordered_total.labels(action=action)
        self.points_recovered_total = Counter(
            "tsad_points_recovered_total", "Points a crash left stored but unscored, scored "
            "by a later request or the start-up recovery", registry=r)
        self.points_unscored_total = Counter(
            "tsad_points_unscored_total", "Points a crash left stored but unscored that "
            "were no longer held to score (beyond TSAD_UNSCORED_MAX_POINTS): skipped",
            registry=r)
        self.scorer_cache_total = Counter(
            "tsad_scorer_cache_total", "Scored requests by whether the stream's decoded "
            "scorer was in the process (hit) or read and decoded from the store (miss)",
            ["result"], registry=r)
        for result in ("hit", "miss"):
            self.scorer_cache_total.labels(result=result)
        self.idempotent_replays_total = Counter(
            "tsad_idempotent_replays_total", "POST /score retries answered with the kept "
            "response of their Idempotency-Key", registry=r)
        self.points_scored_total = Counter(
            "tsad_points_scored_total", "Points that received a score", ["detector"], registry=r)
        self.anomalies_total = Counter(
            "tsad_anomalies_total", "Points flagged anomalous", ["detector"], registry=r)
        self.scoring_duration_seconds = Histogram(
            "tsad_scoring_duration_seconds", "Detector time per scored batch", ["detector"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.store_operation_duration_seconds = Histogram(
            "tsad_window_store_operation_duration_seconds", "Window store latency",
            ["backend", "operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.store_errors_total = Counter(
            "tsad_window_store_errors_total", "Window store failures (unreachable, timeouts)",
            ["backend", "operation"], registry=r)
        self.store_up = Gauge(
            "tsad_window_store_up", "1 when the last window store call succeeded (of every "
            "worker process: the lowest)", ["backend"], multiprocess_mode="livemin", registry=r)
        self.streams_created_total = Counter(
            "tsad_streams_created_total", "Streams created", registry=r)
        # --- thresholds: a histogram over all streams (bounded), a gauge for allow-listed
        self.stream_state_bytes = Histogram(
            "tsad_stream_state_bytes", "Size of a stream's saved detector/threshold/alert state "
            "(embedding memories dominate; bounded by their memory_size)", ["detector"],
            buckets=(1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6), registry=r)
        self.threshold_value = Histogram(
            "tsad_threshold_value", "Stream thresholds in force, observed once per scored "
            "batch (score units)", buckets=THRESHOLD_BUCKETS, registry=r)
        # --- per stream: only streams admitted by StreamSeries (allow-list with a cap)
        self.stream_threshold = Gauge(
            "tsad_stream_threshold", "Current threshold of an allow-listed stream "
            "(TSAD_METRICS_STREAMS, at most TSAD_METRICS_MAX_STREAMS streams)",
            ["stream"], multiprocess_mode="mostrecent", registry=r)
        self.stream_score = Gauge(
            "tsad_stream_score", "Score of the last scored point of an allow-listed stream",
            ["stream"], multiprocess_mode="mostrecent", registry=r)
        self.stream_points_scored_total = Counter(
            "tsad_stream_points_scored_total", "Points scored, per allow-listed stream",
            ["stream"], registry=r)
        self.stream_anomalies_total = Counter(
            "tsad_stream_anomalies_total", "Points flagged anomalous, per allow-listed stream",
            ["stream"], registry=r)
        self.stream_alerts_opened_total = Counter(
            "tsad_stream_alerts_opened_total", "Alerts opened, per allow-listed stream",
            ["stream"], registry=r)
        self.stream_top_channel_total = Counter(
            "tsad_stream_top_channel_total", "Anomalous points whose score was led by this "
            f"channel (per allow-listed stream; at most {MAX_CHANNEL_SERIES} channels, the "
            "rest counted as \"other\")", ["stream", "channel"], registry=r)
        self.stream_likelihood = Gauge(
            "tsad_stream_likelihood", "Likelihood (calibrated score, [0, 1]) of the last "
            "scored point of an allow-listed stream", ["stream"],
            multiprocess_mode="mostrecent", registry=r)
        self.stream_anomaly = Gauge(
            "tsad_stream_anomaly", "1 when the last scored point of an allow-listed stream "
            "was anomalous, else 0", ["stream"], multiprocess_mode="mostrecent", registry=r)
        # --- Prometheus-native ingest, write-back and watches (service/ingest/, issue 26)
        self.ingest_samples_total = Counter(
            "tsad_ingest_samples_total", "Samples received by remote-write, OTLP and "
            "watches, by what became of them (accepted: handed to their stream, where the "
            "usual point counters go on; the rest were dropped, by reason)",
            ["door", "outcome"], registry=r)
        self.writeback_points_sent_total = Counter(
            "tsad_writeback_points_sent_total", "Scored points written back (3 samples "
            "each: score, likelihood, anomaly) and acknowledged by the target", registry=r)
        self.writeback_points_dropped_total = Counter(
            "tsad_writeback_points_dropped_total", "Scored points not written back, by "
            "reason (queue_full: the target was down too long; rejected: the target "
            "refused them with a 4xx; out_of_order: older than a point already written)",
            ["reason"], registry=r)
        for reason in ("queue_full", "rejected", "out_of_order"):
            self.writeback_points_dropped_total.labels(reason=reason)
        self.writeback_requests_total = Counter(
            "tsad_writeback_requests_total", "Write-back requests by outcome (ok, retry, "
            "rejected)", ["outcome"], registry=r)
        self.writeback_request_duration_seconds = Histogram(
            "tsad_writeback_request_duration_seconds", "HTTP time of one write-back "
            "request", buckets=LATENCY_BUCKETS, registry=r)
        self.writeback_queue_points = Gauge(
            "tsad_writeback_queue_points", "Scored points waiting to be written back",
            multiprocess_mode="livesum", registry=r)
        self.watch_evaluations_total = Counter(
            "tsad_watch_evaluations_total", "Watch queries run, by watch and outcome (ok, "
            "error)", ["watch", "outcome"], registry=r)
        self.watch_lag_seconds = Gauge(
            "tsad_watch_lag_seconds", "How far a watch's last evaluated time is behind the "
            "clock", ["watch"], multiprocess_mode="livemax", registry=r)
        # --- alerts
        self.alerts_opened_total = Counter(
            "tsad_alerts_opened_total", "Alerts opened", ["severity"], registry=r)
        self.alerts_resolved_total = Counter(
            "tsad_alerts_resolved_total", "Alerts resolved", registry=r)
        self.alerts_open = Gauge(
            "tsad_alerts_open", "Open alerts in the alert store, counted at scrape time (the "
            "same on every replica sharing a Redis: aggregate with max)",
            multiprocess_mode="livemostrecent", registry=r)
        self.alert_events_total = Counter(
            "tsad_alert_events_total", "Alert events queued for webhooks", ["type"],
            registry=r)
        # --- operator feedback and per-stream adaptation (POST /streams/{id}/feedback)
        self.feedback_ranges_total = Counter(
            "tsad_feedback_ranges_total", "Labelled time ranges stored as feedback, by "
            "label (false_positive, missed_anomaly, normal, anomaly)", ["label"], registry=r)
        for label in get_args(FeedbackLabel):  # every label exported from the start, at 0
            self.feedback_ranges_total.labels(label=label)
        self.feedback_adaptation_seconds = Histogram(
            "tsad_feedback_adaptation_seconds", "Time to tune one stream's soft prompts on "
            "its feedback (bounded by TSAD_FEEDBACK_MAX_SECONDS)",
            buckets=ADAPTATION_BUCKETS, registry=r)
        # --- shadow detectors (service/shadows): per stream for allow-listed streams only
        self.shadow_alerts_total = Counter(
            "tsad_shadow_alerts_total", "Alerts a shadow detector opened: recorded for its "
            "report, never delivered to webhooks (per allow-listed stream)",
            ["stream", "shadow"], registry=r)
        self.shadow_agreement_ratio = Gauge(
            "tsad_shadow_agreement_ratio", "Agreement of a shadow with the live detector "
            "since it started: the Jaccard index of their alerted time (per allow-listed "
            "stream; NaN while neither alerted)", ["stream", "shadow"],
            multiprocess_mode="mostrecent", registry=r)
        self.shadow_lag_points = Gauge(
            "tsad_shadow_lag_points", "Points the stream stored that a shadow has not "
            "scored yet (on the background queue, costly shadows catch up at each chunk end "
            "of 64 points, cheap ones once 512 points wait or 1 s; per allow-listed "
            "stream)", ["stream", "shadow"], multiprocess_mode="mostrecent", registry=r)
        self.shadow_lag_seconds = Histogram(
            "tsad_shadow_lag_seconds", "From a point's storing to its score by a shadow, per "
            "point, by the shadow's kind (cheap; costly: a language model or torch per "
            "window)", ["kind"], buckets=LAG_BUCKETS,
            registry=r)
        self.shadow_points_skipped_total = Counter(
            "tsad_shadow_points_skipped_total", "Points a shadow never scored: dropped from "
            "a full queue (TSAD_SHADOW_QUEUE_POINTS) or no longer held after a crash",
            registry=r)
        self.shadow_queue_points = Gauge(
            "tsad_shadow_queue_points", "Points waiting on this process's background queue "
            "for shadow detectors", multiprocess_mode="livesum", registry=r)
        # the shadows' child processes' embedding LRUs (their other language-model
        # metrics count in tsad_embedding_*, with the service's own)
        self.shadow_embedding_lru_bytes = Gauge(
            "tsad_shadow_embedding_lru_bytes", "Bytes of embeddings held by the LRUs of "
            "the shadow detectors' child processes (summed)", multiprocess_mode="livesum",
            registry=r)
        self.shadow_embedding_lru_entries = Gauge(
            "tsad_shadow_embedding_lru_entries", "Embeddings held by the LRUs of the shadow "
            "detectors' child processes (summed)", multiprocess_mode="livesum", registry=r)
        # --- webhooks
        self.webhook_deliveries_total = Counter(
            "tsad_webhook_deliveries_total", "Webhook delivery attempts by outcome "
            "(delivered, retry, dead_letter)", ["outcome"], registry=r)
        self.webhook_request_duration_seconds = Histogram(
            "tsad_webhook_request_duration_seconds", "HTTP time of one delivery attempt",
            buckets=LATENCY_BUCKETS, registry=r)
        self.webhook_delivery_latency_seconds = Histogram(
            "tsad_webhook_delivery_latency_seconds", "From the event's creation to its "
            "acknowledged delivery (retries included)", buckets=DELIVERY_BUCKETS, registry=r)
        self.webhook_dead_letters_total = Counter(
            "tsad_webhook_dead_letters_total", "Deliveries moved to the dead-letter list",
            registry=r)
        self.webhook_queue_depth = Gauge(
            "tsad_webhook_queue_depth", "Deliveries waiting (due or backing off), as last "
            "seen by a webhook worker", multiprocess_mode="livemostrecent", registry=r)
        # --- embedding cache and language model (defined in models/lm/metrics.py)
        self.embedding = EmbeddingMetrics(r)

    def exposition(self) -> bytes:
        """The text /metrics serves: this registry, or with worker processes
        (PROMETHEUS_MULTIPROC_DIR set) every worker's samples merged."""
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=path)
        return generate_latest(merged)


def multiprocess_dir() -> str | None:
    """Where worker processes write their samples; None in a single process."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def observe_all(histogram: Histogram, values: Sequence[float] | np.ndarray) -> None:
    """``histogram.observe`` of each value, counted per bucket: one increment a bucket
    rather than one call a value (a shadow's catch-up observes the lag of each point it
    scored: a hundred observe calls cost about a millisecond).

    >>> h = Histogram("demo_seconds", "demo", buckets=(1, 5), registry=None)
    >>> observe_all(h, [0.5, 1.0, 3.0, 9.0])
    >>> [(s.labels["le"], s.value) for s in h.collect()[0].samples if s.name.endswith("bucket")]
    [('1.0', 2.0), ('5.0', 3.0), ('+Inf', 4.0)]
    """
    values = np.asarray(values, np.float64)
    if not len(values):
        return
    bounds = np.asarray(histogram._upper_bounds)  # what observe() reads, in this form
    counts = np.bincount(np.searchsorted(bounds, values), minlength=len(bounds))
    histogram._sum.inc(float(values.sum()))
    for bucket, n in zip(histogram._buckets, counts[:len(bounds)].tolist(), strict=True):
        if n:
            bucket.inc(n)


def worker_exited() -> None:
    """A worker stops: its live gauges (``live*`` modes) leave the merged view."""
    if path := multiprocess_dir():
        mark_process_dead(os.getpid(), path)


class StreamSeries:
    """Which streams get per-stream series, and the series themselves.

    A stream is admitted the first time it is seen if it matches one of ``globs`` and
    fewer than ``max_streams`` streams are admitted; the decision then sticks for the life
    of the process (or until the stream is deleted), so a series never flaps in and out.

    >>> m = ServiceMetrics()
    >>> series = StreamSeries(m, "web-*, db-01", max_streams=2)
    >>> [series.admit(s) for s in ("web-1", "api", "db-01", "web-2")]
    [True, False, True, False]
    """

    def __init__(self, metrics: ServiceMetrics, globs: str | Sequence[str],
                 max_streams: int) -> None:
        self.metrics = metrics
        if isinstance(globs, str):
            globs = globs.split(",")
        self.globs = [g.strip() for g in globs if g.strip()]
        self.max_streams = max_streams
        self._admitted: set[str] = set()
        self._channels: dict[str, set[str]] = {}
        self._shadows: dict[str, set[str]] = {}  # of admitted streams
        self._lock = threading.Lock()  # scoring runs in worker threads

    def admit(self, stream: str) -> bool:
        if stream in self._admitted:
            return True
        with self._lock:
            if stream in self._admitted:
                return True
            if len(self._admitted) >= self.max_streams or not any(
                    fnmatch.fnmatchcase(stream, g) for g in self.globs):
                return False
            self._admitted.add(stream)
            self._channels[stream] = set()
            return True

    def observe(self, stream: str, scores: Iterable[float | None],
                anomalies: Iterable[bool], lead_channels: Iterable[str | None],
                threshold: float | None,
                likelihoods: Iterable[float | None] | None = None) -> None:
        """One scored batch: scores (None while warming up), verdicts, the channel that
        led each anomalous point (None for the others) and likelihoods."""
        if not self.admit(stream):
            return
        m = self.metrics
        last = last_likelihood = last_anomaly = None
        scored = flagged = 0
        scores = list(scores)
        likelihoods = [None] * len(scores) if likelihoods is None else likelihoods
        for score, anomaly, channel, likelihood in zip(scores, anomalies, lead_channels,
                                                       likelihoods, strict=True):
            if score is None:
                continue
            scored += 1
            last, last_likelihood, last_anomaly = score, likelihood, anomaly
            if anomaly:
                flagged += 1
                if channel is not None:
                    m.stream_top_channel_total.labels(stream, self._channel(stream, channel)
                                                      ).inc()
        if last is not None:
            m.stream_score.labels(stream).set(last)
            m.stream_anomaly.labels(stream).set(1 if last_anomaly else 0)
        if last_likelihood is not None:
            m.stream_likelihood.labels(stream).set(last_likelihood)
        if threshold is not None:
            m.stream_threshold.labels(stream).set(threshold)
        # created at zero so rate() and increase() work from the first batch
        m.stream_points_scored_total.labels(stream).inc(scored)
        m.stream_anomalies_total.labels(stream).inc(flagged)
        m.stream_alerts_opened_total.labels(stream)

    def alert_opened(self, stream: str) -> None:
        if self.admit(stream):
            self.metrics.stream_alerts_opened_total.labels(stream).inc()

    def shadow(self, stream: str, shadow: str, alerts_opened: int = 0,
               agreement: float | None = None, lag_points: int | None = None) -> None:
        """A shadow was offered points or scored them. Its series exist from the first
        call (alerts at 0, agreement NaN until either side alerted)."""
        if not self.admit(stream):
            return
        with self._lock:
            seen = self._shadows.setdefault(stream, set())
            new = shadow not in seen
            seen.add(shadow)
        m = self.metrics
        m.shadow_alerts_total.labels(stream, shadow).inc(alerts_opened)
        if agreement is not None or new:
            m.shadow_agreement_ratio.labels(stream, shadow).set(
                math.nan if agreement is None else agreement)
        if lag_points is not None:
            m.shadow_lag_points.labels(stream, shadow).set(lag_points)

    def forget_shadow(self, stream: str, shadow: str) -> None:
        """The shadow was deleted or promoted: drop its series."""
        with self._lock:
            self._shadows.get(stream, set()).discard(shadow)
        m = self.metrics
        for metric in (m.shadow_alerts_total, m.shadow_agreement_ratio, m.shadow_lag_points):
            with contextlib.suppress(KeyError):  # never labelled yet
                metric.remove(stream, shadow)

    def _channel(self, stream: str, channel: str) -> str:
        seen = self._channels[stream]
        if channel in seen:
            return channel
        with self._lock:
            if len(seen) >= MAX_CHANNEL_SERIES:
                return "other"
            seen.add(channel)
            return channel

    def forget(self, stream: str) -> None:
        """The stream was deleted: drop its series and free its place."""
        with self._lock:
            if stream not in self._admitted:
                return
            self._admitted.discard(stream)
            channels = self._channels.pop(stream, set()) | {"other"}
            shadows = self._shadows.pop(stream, set())
        for shadow in shadows:
            self.forget_shadow(stream, shadow)
        m = self.metrics
        for gauge in (m.stream_threshold, m.stream_score, m.stream_likelihood,
                      m.stream_anomaly, m.stream_points_scored_total,
                      m.stream_anomalies_total, m.stream_alerts_opened_total):
            with contextlib.suppress(KeyError):  # never labelled yet
                gauge.remove(stream)
        for channel in channels:
            with contextlib.suppress(KeyError):
                m.stream_top_channel_total.remove(stream, channel)
