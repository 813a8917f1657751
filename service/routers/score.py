from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Header, Response

from service.deps import AUTH_RESPONSES, Ingest, ScoreDep
from service.errors import InvalidInput
from service.schemas import ErrorOut, ScoreRequest, ScoreResponse
from service.transaction import Idempotency
from service.validation import columnar, score_points

router = APIRouter(tags=["scoring"], responses=AUTH_RESPONSES)

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
