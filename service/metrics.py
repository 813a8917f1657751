"""Every Prometheus metric of the service, defined once. Units are in the names.

The service builds one ``ServiceMetrics`` on its own registry; tests build a fresh one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from models.lm.metrics import EmbeddingMetrics

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
THRESHOLD_BUCKETS = (0.5, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100, 1000)


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
            "tsad_points_duplicate_total", "Exact duplicate points dropped (policy drop)",
            registry=r)
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
            "tsad_window_store_up", "1 when the last window store call succeeded",
            ["backend"], registry=r)
        self.streams_created_total = Counter(
            "tsad_streams_created_total", "Streams created", registry=r)
        # language-model prompt embeddings (cache hits, misses, encode time): defined once
        # in models/lm/metrics.py, registered here
        self.embedding = EmbeddingMetrics(r)
        # --- thresholds: a histogram over all streams (bounded), a gauge for allow-listed
        self.stream_state_bytes = Histogram(
            "tsad_stream_state_bytes", "Size of a stream's saved detector/threshold/alert state "
            "(embedding memories dominate; bounded by TSAD_MEMORY_SIZE)", ["detector"],
            buckets=(1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6), registry=r)
        self.threshold_value = Histogram(
            "tsad_threshold_value", "Stream thresholds in force, observed once per scored "
            "batch (score units)", buckets=THRESHOLD_BUCKETS, registry=r)
        self.stream_threshold = Gauge(
            "tsad_stream_threshold", "Current threshold of streams matching "
            "TSAD_THRESHOLD_METRIC_STREAMS (at most TSAD_THRESHOLD_METRIC_MAX_STREAMS)",
            ["stream"], registry=r)
        # --- alerts
        self.alerts_opened_total = Counter(
            "tsad_alerts_opened_total", "Alerts opened", ["severity"], registry=r)
        self.alerts_resolved_total = Counter(
            "tsad_alerts_resolved_total", "Alerts resolved", registry=r)
        self.alert_events_total = Counter(
            "tsad_alert_events_total", "Alert events queued for webhooks", ["type"],
            registry=r)
        # --- webhooks
        self.webhook_deliveries_total = Counter(
            "tsad_webhook_deliveries_total", "Webhook delivery attempts by outcome "
            "(delivered, retry, dead_letter, dropped)", ["outcome"], registry=r)
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
            "seen by this process's worker", registry=r)
