"""The service's parts, built once from the settings: what the routers reach through the
typed dependencies of ``service/deps.py``, and what any other ingest path calls."""

from __future__ import annotations

from dataclasses import dataclass

from service.auth.guard import Authenticator
from service.feedback.service import FeedbackService
from service.ingest.runtime import IngestRuntime, build_ingest
from service.metrics import ServiceMetrics, StreamSeries
from service.scorers import ScorerCache
from service.settings import Settings
from service.shadows.queue import ShadowQueue
from service.shadows.service import ShadowService
from service.stores import build_backend
from service.stores.base import Backend
from service.stores.instrumented import InstrumentedBackend
from service.streams import StreamAdmin
from service.transaction import ScoreTransaction, crash_after_appends


@dataclass
class Services:
    settings: Settings
    metrics: ServiceMetrics
    backend: Backend  # instrumented: every stream call and commit is timed
    score: ScoreTransaction  # the /score transaction: (stream, timestamps, values)
    streams: StreamAdmin
    feedback: FeedbackService
    shadows: ShadowService  # /streams/{id}/shadows
    shadow_queue: ShadowQueue  # costly shadows' background work (started by the app)
    auth: Authenticator
    ingest: IngestRuntime  # remote-write, OTLP, watches, score write-back (service/ingest)
    scorers: ScorerCache  # this process's decoded scorers (checked in the lifespan)


def build_services(settings: Settings, metrics: ServiceMetrics,
                   backend: Backend | None = None) -> Services:
    backend = InstrumentedBackend(backend or build_backend(settings), metrics)
    series = StreamSeries(metrics, settings.metrics_streams, settings.metrics_max_streams)
    scorers = ScorerCache(settings.scorer_cache_mb * 2**20)
    crash = settings.fault_crash_after_append
    queue = ShadowQueue(backend, settings, metrics, series, scorers)
    score = ScoreTransaction(backend, settings, metrics, series, scorers,
                             crash_after_appends(crash) if crash else None, queue)
    streams = StreamAdmin(backend, settings, metrics, series, scorers, queue)
    return Services(
        settings=settings, metrics=metrics, backend=backend, score=score, streams=streams,
        feedback=FeedbackService(backend, settings, metrics),
        shadows=ShadowService(backend, settings, metrics, series, scorers, queue, score,
                              streams),
        shadow_queue=queue, auth=Authenticator(settings, backend.keys), scorers=scorers,
        ingest=build_ingest(settings, metrics, score, streams))
