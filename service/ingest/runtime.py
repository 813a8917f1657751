"""The ingest doors' parts, built and started with the app (its lifespan) and stopped
with it: the ingestor, the score writer (TSAD_WRITEBACK_URL) and the watch runner
(TSAD_PROMETHEUS_URL)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI

from service.ingest.config import load_config
from service.ingest.engine import Ingestor
from service.ingest.promapi import PrometheusAPI
from service.ingest.state import IngestState, build_ingest_state
from service.ingest.transaction import ScoringTransaction
from service.ingest.watch import WatchRunner
from service.ingest.writeback import ScoreWriter
from service.settings import Settings


@dataclass
class IngestRuntime:
    settings: Settings
    ingestor: Ingestor
    state: IngestState
    writer: ScoreWriter | None
    watches: WatchRunner

    async def stop(self) -> None:
        await self.watches.stop()
        if self.writer is not None:
            await self.writer.stop()


async def start_ingest(app: FastAPI) -> IngestRuntime:
    settings, metrics = app.state.settings, app.state.metrics
    config = load_config(settings.ingest_config)
    transaction = ScoringTransaction(app.state.pipeline)
    state = build_ingest_state(transaction.raw_store)
    writer = ScoreWriter(settings, metrics) if settings.writeback_url else None
    ingestor = Ingestor(transaction, state, writer, settings, metrics, config.rules)
    api = PrometheusAPI(settings) if settings.prometheus_url else None
    runner = WatchRunner(ingestor, state, api, settings, metrics, config.watch_specs())
    if writer is not None:
        await writer.start()
    await runner.start()
    return IngestRuntime(settings, ingestor, state, writer, runner)
