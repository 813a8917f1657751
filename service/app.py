"""The application factory: settings in, a ready FastAPI app out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from threadpoolctl import threadpool_limits

from service import http
from service.auth.gate import AuthGate
from service.auth.guard import exposure_problem, warn_if_open
from service.errors import StoreUnavailable
from service.ingest import router as ingest
from service.limits import BodyLimitMiddleware
from service.metrics import ServiceMetrics, worker_exited
from service.recovery import recover_all
from service.redaction import register_secrets, settings_secrets
from service.routers import alerts, keys, ops, score, shadows, streams, webhooks
from service.scoring import stream_detector
from service.services import build_services
from service.settings import Settings
from service.shadows.worker import configure_lm
from service.webhooks.worker import WebhookWorker

log = logging.getLogger("tsad.service")


def create_app(settings: Settings | None = None,
               metrics: ServiceMetrics | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = metrics or ServiceMetrics()
    register_secrets(settings_secrets(settings))  # cut from every log line and answer
    if problem := exposure_problem(settings):  # an open service on a public address
        raise RuntimeError(problem)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Requests run in parallel threads on small matrices: one BLAS thread each. A
        # multi-threaded BLAS per request oversubscribes the cores and, measured under
        # load, made 55-channel scoring 3.6x slower. (torch keeps its own thread pool.)
        threadpool_limits(settings.blas_threads, user_api="blas")
        services = app.state.services = build_services(settings, metrics)
        backend = services.backend
        warn_if_open(settings)
        worker = WebhookWorker(backend.webhooks, settings, metrics)
        # detectors that embed prompts share one cached encoder per process: its Redis
        # level and its metrics (tsad_embedding_*) are the service's
        configure_lm(settings, metrics.embedding)
        stream_detector(settings, settings.default_detector, settings.default_window)
        app.state.detectors_ready = True
        try:
            await backend.ping()
            log.info("store ready", extra={"backend": backend.name})
        except StoreUnavailable as exc:  # start anyway; /readyz says 503 until it's back
            log.warning("store unavailable at start-up", extra={"error": str(exc)})
        await worker.start()  # deliveries run beside requests, never inside /score
        await services.shadow_queue.start()  # costly shadows, off the request path
        await services.ingest.start()  # watches, score write-back (service/ingest/)
        # what a crash left stored but unscored, scored without waiting for traffic
        recovery = (asyncio.create_task(recover_all(backend, services.score))
                    if settings.recover_on_start else None)
        # scorers of streams deleted or written elsewhere leave this process's cache
        checks = asyncio.create_task(services.scorers.run_checks(
            backend.streams, settings.scorer_cache_check_seconds))
        yield
        for task in (recovery, checks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await services.ingest.stop()
        await services.shadow_queue.stop()  # after the ingest doors: nothing queues more
        await worker.stop()
        await backend.close()
        worker_exited()

    # /docs and /redoc with Swagger UI's and ReDoc's assets served by the app itself
    # (/static-offline-docs, from the fastapi-offline package): FastAPI's default pages load
    # them from a CDN and are blank offline.
    app = FastAPIOffline(
        title="tsad",
        version="0.1.0",
        description="Online streaming time-series anomaly detection with language-model "
        "features. POST points to /score; every point gets a score, a verdict and, when "
        "anomalous, the channels that explain it. Anomalies open alerts (/alerts) that are "
        "delivered to subscribed webhooks (/webhooks), signed and retried.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.detectors_ready = False
    for module in (score, streams, shadows, alerts, webhooks, keys, ops, ingest):
        app.include_router(module.router)
    # /metrics declares (and needs) a key only with TSAD_METRICS_AUTH: schema = behaviour
    app.include_router(ops.metrics_router(keyed=settings.metrics_auth))
    # inside the request middleware (added after it is outer), so 413s and 408s are counted
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       timeout_seconds=settings.body_timeout_seconds)
    # outside the body limits: a request without a known key is a 401 before a byte of
    # its body is read (service/auth/gate.py)
    app.add_middleware(AuthGate, retry_after_seconds=settings.retry_after_seconds)
    http.install(app, settings, metrics)
    return app
