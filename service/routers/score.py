from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic_core import to_json

from service.deps import AUTH_RESPONSES, Ingest, PipelineDep
from service.schemas import ErrorOut, ScoreRequest, ScoreResponse, columnar_loc
from service.stores.base import StoreRejection

router = APIRouter(tags=["scoring"], responses=AUTH_RESPONSES)


@router.post(
    "/score",
    response_model=ScoreResponse,
    responses={422: {"model": ErrorOut}, 503: {"model": ErrorOut}},
    summary="Append points to a stream and score them",
)
async def score(body: ScoreRequest, pipeline: PipelineDep, who: Ingest) -> Response:
    """Points are stored atomically (all or none), then scored: one result per point.
    Send them as a list of points or, faster to parse, as columns (timestamps, values)."""
    who.check_stream(body.stream)
    try:
        out = await pipeline.score(body)
    except StoreRejection as exc:
        if body.columnar:  # the store names points.i: name the columns sent
            exc.loc = columnar_loc(exc.loc)
        raise
    # ScoreResponse's shape as plain dicts, serialised in one call (pydantic-core's JSON
    # encoder, in Rust): no model object per point
    return Response(to_json(out, fallback=_numpy_scalar), media_type="application/json")


def _numpy_scalar(value: object) -> object:
    """A numpy scalar a detector let through (np.bool_, np.float32) as its Python value."""
    return value.item()  # type: ignore[attr-defined]
