"""FastAPI dependencies: typed handles on what create_app put in app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth.gate import principal as authenticated
from service.auth.guard import Authenticator, Principal
from service.auth.keys import Scope
from service.metrics import ServiceMetrics
from service.pipeline import ScoringPipeline
from service.schemas import STREAM_ID_PATTERN, ErrorOut
from service.settings import Settings


def _pipeline(request: Request) -> ScoringPipeline:
    return request.app.state.pipeline


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


PipelineDep = Annotated[ScoringPipeline, Depends(_pipeline)]
SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]
StreamPath = Annotated[str, Path(pattern=STREAM_ID_PATTERN, description="Stream id",
                                 examples=["web-01.cpu"])]

# --- authentication (service/auth): one security scheme, a dependency per scope ---------
_bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey", bearerFormat="tsad_<id>_<secret>",
                     description="An API key (`tsad keys create`, POST /keys or "
                     "TSAD_ADMIN_KEY) as `Authorization: Bearer <key>`; scopes ingest, "
                     "read, admin. Not checked when the service runs with TSAD_AUTH=open.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
AUTH_RESPONSES = {401: {"model": ErrorOut, "description": "Missing, unknown or revoked key"},
                  403: {"model": ErrorOut, "description": "Scope or tenant does not allow"}}


def _require(scope: Scope):  # noqa: ANN202 - a FastAPI dependency
    async def principal(request: Request, credentials: Credentials) -> Principal:
        auth: Authenticator = request.app.state.auth
        # authenticated from the headers by the gate (service/auth/gate.py), before the
        # body was read; looked up here only for a request the gate did not see
        who = authenticated(request.scope) or await auth.authenticate(
            credentials.credentials if credentials else None)
        return auth.require(who, scope)
    return principal


def _stream_access(scope: Scope):  # noqa: ANN202 - a FastAPI dependency
    # a default, not Annotated: string annotations cannot see this closure's `scope`
    async def stream_id(stream: StreamPath,
                        who: Principal = Depends(_require(scope))) -> str:  # noqa: B008
        who.check_stream(stream)
        return stream
    return stream_id


Ingest = Annotated[Principal, Depends(_require("ingest"))]
Reader = Annotated[Principal, Depends(_require("read"))]
Admin = Annotated[Principal, Depends(_require("admin"))]
# a stream id from the path that the caller's key may use (scope and tenant checked)
ReadStream = Annotated[str, Depends(_stream_access("read"))]
AdminStream = Annotated[str, Depends(_stream_access("admin"))]


async def global_admin(who: Admin) -> Principal:
    """Admin scope and no tenant: for what spans tenants (webhooks, keys)."""
    who.check_global("webhooks and API keys")
    return who


async def metrics_reader(who: Reader) -> None:
    """/metrics with TSAD_METRICS_AUTH: a 'read' key without tenant (the series span
    every tenant's streams)."""
    who.check_global("metrics")
