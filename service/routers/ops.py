"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import (
    AUTH_RESPONSES,
    AlertsDep,
    BackendDep,
    MetricsDep,
    SettingsDep,
    metrics_reader,
)
from service.errors import StoreUnavailable
from service.redaction import redact

router = APIRouter(tags=["operations"])
# /metrics answers text, its 401 and 403 JSON: a `model` would be documented as text/plain
_JSON_AUTH_ERRORS = {code: {"description": r["description"], "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ErrorOut"}}}} for code, r in AUTH_RESPONSES.items()}


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: store reachable and detectors loaded (503 if not)",
            responses={503: {"description": "Not ready: the checks say why"}})
async def readyz(backend: BackendDep, settings: SettingsDep, request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        await backend.ping()
        checks["store"] = f"ok ({backend.name})"
    except StoreUnavailable as exc:
        checks["store"] = f"unavailable: {redact(str(exc))}"  # a URL may hold a password
    checks["detectors"] = "ok" if request.app.state.detectors_ready else "not loaded"
    ready = all(v.startswith("ok") for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503,
                        headers=None if ready else {"Retry-After":
                                                    str(settings.retry_after_seconds)})


async def metrics(m: MetricsDep, alerts: AlertsDep) -> PlainTextResponse:
    # a gauge of state held in the store, read when Prometheus asks; on an outage it keeps
    # its last value (tsad_window_store_up says the store is down)
    with contextlib.suppress(StoreUnavailable):
        m.alerts_open.set(await alerts.count_open())
    # label values are client data (channel names): no URL credentials in them either
    return PlainTextResponse(redact(m.exposition().decode()), media_type=CONTENT_TYPE_LATEST)


def metrics_router(keyed: bool) -> APIRouter:
    """GET /metrics, open, or (TSAD_METRICS_AUTH) needing a 'read' key without tenant
    (the series span every tenant's streams): the schema declares the key only then."""
    router = APIRouter(tags=["operations"])
    router.add_api_route(
        "/metrics", metrics, methods=["GET"], response_class=PlainTextResponse,
        summary="Prometheus metrics" + (" (a 'read' key without tenant)" if keyed else
                                        " (open; TSAD_METRICS_AUTH=true requires a key)"),
        dependencies=[Depends(metrics_reader)] if keyed else [],
        responses=_JSON_AUTH_ERRORS if keyed else None)
    return router
