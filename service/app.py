"""The application factory: settings in, a ready FastAPI app out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from threadpoolctl import threadpool_limits

from models.detectors import build_detector
from models.lm import runtime as lm_runtime
from models.lm.cache import CacheConfig
from service.alerts.store import build_alert_store
from service.auth.gate import AuthGate, path_pattern
from service.auth.guard import Authenticator, exposure_problem, warn_if_open
from service.auth.keys import build_key_store
from service.errors import describe, unavailable_response
from service.limits import BodyLimitMiddleware
from service.metrics import ServiceMetrics, worker_exited
from service.pipeline import ScoringPipeline
from service.redaction import register_secrets, settings_secrets
from service.routers import alerts, keys, ops, score, streams, webhooks
from service.settings import Settings
from service.stores.base import StoreRejection, StoreUnavailable, WindowStore
from service.stores.instrumented import InstrumentedStore
from service.stores.memory import MemoryWindowStore
from service.webhooks.store import build_webhook_store
from service.webhooks.worker import WebhookWorker

log = logging.getLogger("tsad.service")


def build_store(settings: Settings) -> WindowStore:
    if settings.redis_url:
        from service.stores.redis import RedisWindowStore

        return RedisWindowStore(
            settings.redis_url, prefix=settings.redis_prefix,
            ttl_seconds=settings.stream_ttl_seconds,
            timeout_seconds=settings.redis_timeout_seconds,
            lock_wait_seconds=settings.lock_wait_seconds,
            lock_lease_seconds=settings.lock_lease_seconds,
            unscored_max_points=settings.unscored_max_points,
            receipt_ttl_seconds=settings.idempotency_ttl_seconds,
            cluster=settings.redis_cluster)
    return MemoryWindowStore(ttl_seconds=settings.stream_ttl_seconds,
                             unscored_max_points=settings.unscored_max_points,
                             receipt_ttl_seconds=settings.idempotency_ttl_seconds)


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
        raw = build_store(settings)
        store = InstrumentedStore(raw, metrics)
        alert_store = build_alert_store(raw, settings.alert_retention_seconds)
        app.state.pipeline = ScoringPipeline(store, settings, metrics, alert_store)
        app.state.webhooks = build_webhook_store(
            alert_store, settings.webhook_dead_letter_retention_seconds)
        app.state.auth = Authenticator(settings, build_key_store(raw))
        warn_if_open(settings)
        worker = WebhookWorker(app.state.webhooks, settings, metrics)
        # detectors that embed prompts share one cached encoder per process: its Redis
        # level and its metrics (tsad_embedding_*) are the service's
        lm_runtime.configure(CacheConfig(redis_url=settings.redis_url,
                                         redis_cluster=settings.redis_cluster,
                                         key_prefix=f"{settings.redis_prefix}:emb:v1"),
                             metrics.embedding, settings.lm_batch_window_ms / 1000)
        build_detector(settings.default_detector, window=settings.default_window)
        app.state.detectors_ready = True
        try:
            await store.ping()
            log.info("store ready", extra={"backend": store.backend})
        except StoreUnavailable as exc:  # start anyway; /readyz says 503 until it's back
            log.warning("store unavailable at start-up", extra={"error": str(exc)})
        await worker.start()  # deliveries run beside requests, never inside /score
        # what a crash left stored but unscored, scored without waiting for traffic
        recovery = (asyncio.create_task(app.state.pipeline.recover_all())
                    if settings.recover_on_start else None)
        yield
        if recovery is not None:
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery
        await worker.stop()
        await store.close()
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
    for module in (score, streams, alerts, webhooks, keys, ops):
        app.include_router(module.router)
    # /metrics declares (and needs) a key only with TSAD_METRICS_AUTH: schema = behaviour
    app.include_router(ops.metrics_router(keyed=settings.metrics_auth))
    _install_error_handlers(app, settings, metrics)
    # inside the request metrics (added after it is outer), so 413s and 408s are counted
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       timeout_seconds=settings.body_timeout_seconds)
    # outside the body limits: a request without a known key is a 401 before a byte of
    # its body is read (service/auth/gate.py)
    app.add_middleware(AuthGate, retry_after_seconds=settings.retry_after_seconds)
    _install_request_metrics(app, metrics)
    return app


def _install_error_handlers(app: FastAPI, settings: Settings, metrics: ServiceMetrics) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")}
                  for e in exc.errors()]
        return JSONResponse({"message": describe(errors), "detail": errors}, status_code=422)

    @app.exception_handler(StoreRejection)
    async def rejected(_: Request, exc: StoreRejection) -> JSONResponse:
        detail = [{"type": "value_error", "loc": list(exc.loc), "msg": exc.message}]
        return JSONResponse({"message": describe(detail), "detail": detail},
                            status_code=exc.status)

    @app.exception_handler(StoreUnavailable)
    async def unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        return unavailable_response(exc, settings.retry_after_seconds)

    # Starlette's own (404 for an unknown path, 405) as well as FastAPI's: one error shape
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and (why := _unparsable_body(exc.__cause__)):
            # FastAPI answers a body it cannot parse (not UTF-8, nested deeper than the
            # parser's recursion limit) with a bare 400; bad JSON is a 422 naming the body
            detail = [{"type": "json_invalid", "loc": ["body"], "msg": why}]
            return JSONResponse({"message": describe(detail), "detail": detail},
                                status_code=422)
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names the first route's methods only
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return JSONResponse({"message": str(exc.detail), "detail": None},
                            status_code=exc.status_code, headers=headers)


def _unparsable_body(cause: BaseException | None) -> str | None:
    """Why FastAPI could not parse a JSON body (its 400s), or None for another 400."""
    if isinstance(cause, UnicodeDecodeError):
        return f"JSON body is not valid UTF-8: {cause.reason}"
    if isinstance(cause, RecursionError):
        return (f"JSON nested too deeply: more than about {sys.getrecursionlimit()} levels "
                "of arrays or objects")
    return None


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    """The methods of the request's resource, for a 405's Allow header (RFC 9110: all of
    them; Starlette names the first route's only). The resource is the schema path that
    matches, a concrete path before a templated one (OpenAPI's rule: /webhooks/dead-letters
    is not /webhooks/{webhook_id}); outside the schema (/docs), what the router serves."""
    path = request.scope["path"]
    matches = [(template.count("{"), ops) for template, ops
               in request.app.openapi()["paths"].items()
               if path_pattern(template).fullmatch(path)]
    if matches:
        ops = min(matches, key=lambda m: m[0])[1]
        return [m for m in _METHODS if m.lower() in ops]
    routes = request.app.router.routes
    return [m for m in _METHODS
            if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)]


def _install_request_metrics(app: FastAPI, metrics: ServiceMetrics) -> None:
    access = logging.getLogger("tsad.access")

    @app.middleware("http")
    async def observe(request: Request, call_next):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.http_requests_total.labels(route, request.method, str(status)).inc()
            metrics.http_request_duration_seconds.labels(route, request.method).observe(elapsed)
            access.info("request", extra={"method": request.method, "route": route,
                                          "status": status,
                                          "duration_ms": round(elapsed * 1000, 2)})
