"""The ingest doors' parts, built once with the service's other parts
(``service/services.py``), started and stopped with the app: the push doors, the watch
runner (TSAD_PROMETHEUS_URL) and its API, the score writer (TSAD_WRITEBACK_URL)."""

from __future__ import annotations

from dataclasses import dataclass

from service.ingest.admin import WatchAdmin
from service.ingest.config import load_config
from service.ingest.doors import IngestDoors
from service.ingest.engine import Ingestor
from service.ingest.feed import StreamFeed
from service.ingest.promapi import PrometheusAPI
from service.ingest.watch import WatchRunner
from service.ingest.writeback import ScoreWriter
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.streams import StreamAdmin
from service.transaction import ScoreTransaction


@dataclass
class IngestRuntime:
    doors: IngestDoors  # POST /api/v1/write, POST /v1/metrics
    watches: WatchAdmin  # /watches
    runner: WatchRunner
    writer: ScoreWriter | None

    async def start(self) -> None:
        if self.writer is not None:
            await self.writer.start()
        await self.runner.start()

    async def stop(self) -> None:
        await self.runner.stop()
        if self.writer is not None:
            await self.writer.stop()


def build_ingest(settings: Settings, metrics: ServiceMetrics, score: ScoreTransaction,
                 streams: StreamAdmin) -> IngestRuntime:
    """The doors over the service's score transaction and stream administration; the
    rules and watches of TSAD_INGEST_CONFIG (RuntimeError naming the entry if invalid)."""
    config = load_config(settings.ingest_config)
    state = score.backend.ingest
    writer = ScoreWriter(settings, metrics) if settings.writeback_url else None
    ingestor = Ingestor(StreamFeed(score, streams), state, writer, settings, metrics,
                        config.rules)
    api = PrometheusAPI(settings) if settings.prometheus_url else None
    runner = WatchRunner(ingestor, state, api, settings, metrics, config.watch_specs())
    return IngestRuntime(IngestDoors(ingestor), WatchAdmin(runner, state, settings),
                         runner, writer)
