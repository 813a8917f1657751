"""Alert events as the service reports them: counted in the metrics and logged, whether a
scored batch or a stream's deletion emitted them."""

from __future__ import annotations

import logging

from service.metrics import ServiceMetrics, StreamSeries

log = logging.getLogger("tsad.pipeline")


def record_events(events: list[dict], metrics: ServiceMetrics, series: StreamSeries) -> None:
    for e in events:
        metrics.alert_events_total.labels(e["type"]).inc()
        if e["type"] == "alert.opened":
            metrics.alerts_opened_total.labels(e["alert"]["severity"]).inc()
            series.alert_opened(e["alert"]["stream"])
        elif e["type"] == "alert.resolved":
            metrics.alerts_resolved_total.inc()
        log.info("alert event", extra={"event": e["type"], "alert": e["alert"]["id"],
                                       "stream": e["alert"]["stream"],
                                       "severity": e["alert"]["severity"]})
