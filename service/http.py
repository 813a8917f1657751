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
import sys
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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
    TooLarge,
    Unauthenticated,
    Undecodable,
    UnsupportedMedia,
    describe,
)
from service.metrics import ServiceMetrics
from service.redaction import redact
from service.settings import Settings

log = logging.getLogger("tsad.service")
STATUS: dict[type[ServiceError], int] = {
    InvalidInput: 422, Conflict: 409, LimitReached: 429, NotFound: 404,
    Unauthenticated: 401, Forbidden: 403, StoreUnavailable: 503, Undecodable: 400,
    TooLarge: 413, UnsupportedMedia: 415}
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


def error_response(exc: ServiceError, retry_after_seconds: int) -> JSONResponse:
    """A domain error as answered, by the app's handler or by ASGI middleware in front of
    the app (the auth gate). A store outage is logged here, where its 503 is built, and
    its message redacted (a store's URL may carry its password)."""
    status = next(STATUS[k] for k in type(exc).__mro__ if k in STATUS)
    if isinstance(exc, StoreUnavailable):
        log.warning("store unavailable", extra={"error": str(exc)})
        return _error(f"window store unavailable, retry later: {redact(str(exc))}", status,
                      headers={"Retry-After": str(retry_after_seconds)})
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
    return _error(exc.message, status, exc.loc, headers=headers)


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(ServiceError)
    async def domain(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc, settings.retry_after_seconds)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")}
                  for e in exc.errors()]
        return JSONResponse({"message": describe(errors), "detail": errors}, status_code=422)

    # Starlette's own (404 for an unknown path, 405) as well as FastAPI's: one error shape
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and (why := _unparsable_body(exc.__cause__)):
            # FastAPI answers a body it cannot parse (not UTF-8, nested deeper than the
            # parser's recursion limit) with a bare 400; bad JSON is a 422 naming the body
            return _error(why, 422, ("body",), kind="json_invalid")
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


def _unparsable_body(cause: BaseException | None) -> str | None:
    """Why FastAPI could not parse a JSON body (its 400s), or None for another 400."""
    if isinstance(cause, UnicodeDecodeError):
        return f"JSON body is not valid UTF-8: {cause.reason}"
    if isinstance(cause, RecursionError):
        return (f"JSON nested too deeply: more than about {sys.getrecursionlimit()} levels "
                "of arrays or objects")
    return None


def path_pattern(template: str) -> re.Pattern[str]:
    """The paths an OpenAPI path template matches.

    >>> bool(path_pattern("/streams/{stream}/window").fullmatch("/streams/web-01/window"))
    True
    >>> bool(path_pattern("/streams/{stream}").fullmatch("/streams/a/b"))
    False
    """
    return re.compile(re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(template)))


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
    app.add_middleware(RequestObserver, metrics=metrics)


class RequestObserver:
    """Plain ASGI middleware (outermost of the app's own): a request id on every request
    (the caller's ``X-Request-Id`` when it is one, else a new one; in ``request.state``
    and on the answer), the request metrics and the access log line. Starlette's
    ``BaseHTTPMiddleware`` did the same at about twice the server's CPU for a cheap
    request (a task, a stream and a response object per request: 442 against 218 us per
    /healthz, benchmarks/results/edge_cost.md)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.access = logging.getLogger("tsad.access")
        self._bound: dict[tuple[str, str, int], tuple] = {}  # the labels' series, once found

    def _series(self, route: str, method: str, status: int) -> tuple:
        """The request counter's and latency histogram's series of a route, method and
        status: looked up by label once, not per request (as many as the metrics' own)."""
        key = (route, method, status)
        if (series := self._bound.get(key)) is None:
            m = self.metrics
            series = self._bound[key] = (
                m.http_requests_total.labels(route, method, str(status)),
                m.http_request_duration_seconds.labels(route, method))
        return series

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope["headers"]
                      if k == b"x-request-id"), "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id
        status = 500  # unless an answer starts: an error escaped (ServerErrorMiddleware)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()),
                                      (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            count, duration = self._series(route, method, status)
            count.inc()
            duration.observe(elapsed)
            if self.access.isEnabledFor(logging.INFO):  # else no record is built at all
                self.access.info("request", extra={
                    "method": method, "route": route, "status": status, "request_id": rid,
                    "duration_ms": round(elapsed * 1000, 2)})
