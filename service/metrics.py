"""Every Prometheus metric of the service, defined once. Units are in the names.

The service builds one ``ServiceMetrics`` on its own registry; tests build a fresh one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


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
