"""The HTTP edge around the routers: every error as a JSON answer, a request id on every
request, request metrics and the access log.

Domain errors (``service/errors.py``) map to their status in one table (``STATUS``); an
error naming a field answers ``{"message": "<loc>: <msg>", "detail": [{"type", "loc",
"msg"}]}``, any other ``{"message", "detail": null}``, the shape FastAPI's own validation
errors and Starlette's 404/405 get here too. An unexpected error is a JSON 500 naming the
request id that the log line of its traceback carries, never Starlette's plain text.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    LimitReached,
    NotFound,
    ServiceError,
    StoreUnavailable,
    Unauthenticated,
    describe,
)
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("tsad.service")
STATUS: dict[type[ServiceError], int] = {
    InvalidInput: 422, Conflict: 409, LimitReached: 429, NotFound: 404,
    Unauthenticated: 401, Forbidden: 403, StoreUnavailable: 503}
REQUEST_ID = "X-Request-Id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # a caller's own id, if it is one


def install(app: FastAPI, settings: Settings, metrics: ServiceMetrics) -> None:
    """The error handlers and the request middleware (outermost)."""
    _install_error_handlers(app, settings)
    _install_request_metrics(app, metrics)


def _error(message: str, status: int, loc: tuple | None = None, kind: str = "value_error",
           headers: dict[str, str] | None = None) -> JSONResponse:
    if loc is None:
        return JSONResponse({"message": message, "detail": None}, status_code=status,
                            headers=headers)
    detail = [{"type": kind, "loc": list(loc), "msg": message}]
    return JSONResponse({"message": describe(detail), "detail": detail}, status_code=status,
                        headers=headers)


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(ServiceError)
    async def domain(_: Request, exc: ServiceError) -> JSONResponse:
        status = next(STATUS[k] for k in type(exc).__mro__ if k in STATUS)
        headers = None
        if isinstance(exc, Unauthenticated):
            headers = {"WWW-Authenticate": "Bearer"}
        if isinstance(exc, StoreUnavailable):
            log.warning("store unavailable", extra={"error": str(exc)})
            return _error(f"window store unavailable, retry later: {exc}", status,
                          headers={"Retry-After": str(settings.retry_after_seconds)})
        return _error(exc.message, status, exc.loc, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")}
                  for e in exc.errors()]
        return JSONResponse({"message": describe(errors), "detail": errors}, status_code=422)

    # Starlette's own (404 for an unknown path, 405) as well as FastAPI's: one error shape
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI answers a body that is not UTF-8 with a bare 400; bad JSON is a 422
            return _error(f"JSON body is not valid UTF-8: {exc.__cause__.reason}", 422,
                          ("body",), kind="json_invalid")
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names the first route's methods only
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return _error(str(exc.detail), exc.status_code, headers=headers)

    @app.exception_handler(Exception)  # Starlette's ServerErrorMiddleware: the last resort
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", None) or uuid.uuid4().hex
        log.error("unhandled error", exc_info=exc, extra={
            "request_id": rid, "method": request.method, "path": request.url.path})
        return JSONResponse({"message": f"internal server error (request id {rid}: the "
                             "service's log has the details)", "detail": None,
                             "request_id": rid}, status_code=500, headers={REQUEST_ID: rid})


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    """The methods of the request's resource, for a 405's Allow header (RFC 9110: all of
    them; Starlette names the first route's only). The resource is the schema path that
    matches, a concrete path before a templated one (OpenAPI's rule: /webhooks/dead-letters
    is not /webhooks/{webhook_id}); outside the schema (/docs), what the router serves."""
    path = request.scope["path"]
    matches = [(template.count("{"), ops) for template, ops
               in request.app.openapi()["paths"].items()
               if re.fullmatch(re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(template)), path)]
    if matches:
        ops = min(matches, key=lambda m: m[0])[1]
        return [m for m in _METHODS if m.lower() in ops]
    routes = request.app.router.routes
    return [m for m in _METHODS
            if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)]


def _install_request_metrics(app: FastAPI, metrics: ServiceMetrics) -> None:
    app.add_middleware(RequestMetrics, metrics=metrics)


class RequestMetrics:
    """The request id, the request metrics and the access log, as plain ASGI middleware
    (Starlette's ``BaseHTTPMiddleware`` runs each request in a task of its own and streams
    the response through a queue: a fifth of a batch-1 request's cost, measured)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.access = logging.getLogger("tsad.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope["headers"]
                      if k == b"x-request-id"), "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID, rid)
            await send(message)

        try:
            await self.app(scope, receive, answer)
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            m = self.metrics
            m.http_requests_total.labels(route, method, str(status)).inc()
            m.http_request_duration_seconds.labels(route, method).observe(elapsed)
            if self.access.isEnabledFor(logging.INFO):
                self.access.info("request", extra={
                    "method": method, "route": route, "status": status, "request_id": rid,
                    "duration_ms": round(elapsed * 1000, 2)})
