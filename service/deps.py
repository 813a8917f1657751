"""FastAPI dependencies: typed handles on the service's parts (``service/services.py``),
which the routers take as arguments instead of reaching into app.state or the stores."""

from __future__ import annotations

import functools
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth.gate import principal as authenticated
from service.auth.guard import Principal
from service.auth.keys import Scope
from service.feedback.service import FeedbackService
from service.ingest.admin import WatchAdmin
from service.ingest.doors import IngestDoors
from service.metrics import ServiceMetrics
from service.schemas import STREAM_ID_PATTERN, ErrorOut
from service.services import Services
from service.settings import Settings
from service.shadows.service import ShadowService
from service.stores.base import AlertStore, Backend, KeyStore, WebhookStore
from service.streams import StreamAdmin
from service.transaction import ScoreTransaction


async def _services(request: Request) -> Services:
    # async, as every dependency here: FastAPI runs a plain def in a worker thread
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(_services)]


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]


async def _score(services: ServicesDep) -> ScoreTransaction:
    return services.score


async def _streams(services: ServicesDep) -> StreamAdmin:
    return services.streams


async def _feedback(services: ServicesDep) -> FeedbackService:
    return services.feedback


async def _shadows(services: ServicesDep) -> ShadowService:
    return services.shadows


async def _backend(services: ServicesDep) -> Backend:
    return services.backend


async def _alerts(services: ServicesDep) -> AlertStore:
    return services.backend.alerts


async def _webhooks(services: ServicesDep) -> WebhookStore:
    return services.backend.webhooks


async def _keys(services: ServicesDep) -> KeyStore:
    return services.backend.keys


async def _doors(services: ServicesDep) -> IngestDoors:
    return services.ingest.doors


async def _watches(services: ServicesDep) -> WatchAdmin:
    return services.ingest.watches


ScoreDep = Annotated[ScoreTransaction, Depends(_score)]  # POST /score
StreamsDep = Annotated[StreamAdmin, Depends(_streams)]  # /streams administration
FeedbackDep = Annotated[FeedbackService, Depends(_feedback)]  # /streams/{id}/feedback
ShadowsDep = Annotated[ShadowService, Depends(_shadows)]  # /streams/{id}/shadows
BackendDep = Annotated[Backend, Depends(_backend)]  # readiness
AlertsDep = Annotated[AlertStore, Depends(_alerts)]
WebhooksDep = Annotated[WebhookStore, Depends(_webhooks)]
KeysDep = Annotated[KeyStore, Depends(_keys)]
DoorsDep = Annotated[IngestDoors, Depends(_doors)]  # POST /api/v1/write, /v1/metrics
WatchesDep = Annotated[WatchAdmin, Depends(_watches)]  # /watches
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


@functools.cache  # one callable per scope: FastAPI resolves it once per request
def _require(scope: Scope):  # noqa: ANN202 - a FastAPI dependency
    async def principal(request: Request, credentials: Credentials) -> Principal:
        auth = request.app.state.services.auth
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
