from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Annotated

import orjson
from fastapi import APIRouter, Header, HTTPException, Request, Response
from fastapi.routing import APIRoute

from service.auth.gate import principal as authenticated
from service.auth.guard import Principal
from service.deps import AUTH_RESPONSES, Ingest, ScoreDep
from service.errors import InvalidInput
from service.schemas import ErrorOut, ScoreRequest, ScoreResponse
from service.transaction import Idempotency, ScoreTransaction
from service.validation import columnar, score_points


class ScoreRoute(APIRoute):
    """POST /score's route: FastAPI's handler, behind a shorter way for the request that
    needs none of its work. A JSON body that parses and validates, a key the auth gate
    already authenticated (``service/auth/gate.py``) and no Idempotency-Key header: the
    endpoint is called with the same values FastAPI would have resolved, without its
    dependency resolution (about a sixth of a batch-1 request's CPU,
    ``benchmarks/results/request_cost_lean.md``). Anything else (an error to word, a
    header to validate, a request the gate did not see) goes through FastAPI's handler,
    which reads the body this one kept: every answer but the fast one is FastAPI's own."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        full = super().get_route_handler()

        async def handler(request: Request) -> Response:
            who = authenticated(request.scope)
            if who is None or not _plain(request.scope["headers"]):
                return await full(request)
            try:  # orjson reads less than json (NaN, huge integers): those go the long way
                body = ScoreRequest.model_validate(orjson.loads(await request.body()))
            except HTTPException:  # the body limits' 413 and 408 (service/limits.py)
                raise
            except Exception:  # noqa: BLE001 - its errors, worded as FastAPI words them
                return await full(request)
            services = request.app.state.services
            # the `Ingest` dependency's check, on the principal it would have found
            return await _score(body, services.score, services.auth.require(who, "ingest"),
                                None)

        return handler


def _plain(headers: list[tuple[bytes, bytes]]) -> bool:
    """A JSON body (exactly as clients send it) and no Idempotency-Key to validate. The
    first Content-Type counts, as for FastAPI (``request.headers.get``)."""
    json = None
    for name, value in headers:
        if name == b"content-type" and json is None:
            json = value == b"application/json"
        elif name == b"idempotency-key":
            return False
    return bool(json)


router = APIRouter(tags=["scoring"], responses=AUTH_RESPONSES, route_class=ScoreRoute)

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
    description="Any unique string per batch (a UUID): a retry with the same key and "
    "body gets the first response again, for TSAD_IDEMPOTENCY_TTL_SECONDS (a day); the "
    "same key with another body is a 422, e.g. 3f0c9a52-5b7e-4d0e-9a51-0c1d2e3f4a5b (no "
    "example value here: one key sent with each body example would be refused)")]


@router.post(
    "/score",
    response_model=ScoreResponse,
    responses={422: {"model": ErrorOut}, 503: {"model": ErrorOut}, 429: {
        "model": ErrorOut, "description": "A new stream beyond TSAD_MAX_STREAMS or the "
        "key's tenant's TSAD_MAX_STREAMS_PER_TENANT"}},
    summary="Append points to a stream and score them",
)
async def score(body: ScoreRequest, transaction: ScoreDep, who: Ingest,
                idempotency_key: IdempotencyKey = None) -> Response:
    """Points are stored atomically (all or none), then scored: one result per point.
    Send them as a list of points or, faster to parse, as columns (timestamps, values)."""
    return await _score(body, transaction, who, idempotency_key)


async def _score(body: ScoreRequest, transaction: ScoreTransaction, who: Principal,
                 idempotency_key: str | None) -> Response:
    who.check_stream(body.stream)
    sent = body.sent_timestamps()
    idempotency = None if idempotency_key is None else Idempotency(
        idempotency_key, hashlib.sha256(body.model_dump_json().encode()).hexdigest(), sent)
    try:
        points = score_points(body, transaction.settings)
        outcome = await transaction(body.stream, points[:, 0], points[:, 1:],
                                    idempotency=idempotency, tenant=who.tenant)
    except InvalidInput as exc:
        if body.columnar:  # errors name points.i: name the columns sent
            raise columnar(exc) from None
        raise
    # ScoreResponse's JSON written from the scorer's columns (service/responses.py): no
    # model object, nor dict, per point
    return Response(outcome.json(sent), media_type="application/json")
