from __future__ import annotations

from fastapi import APIRouter

from service.deps import AUTH_RESPONSES, Ingest, PipelineDep
from service.schemas import ErrorOut, ScoreRequest, ScoreResponse

router = APIRouter(tags=["scoring"], responses=AUTH_RESPONSES)


@router.post(
    "/score",
    response_model=ScoreResponse,
    responses={422: {"model": ErrorOut}, 503: {"model": ErrorOut}},
    summary="Append points to a stream and score them",
)
async def score(body: ScoreRequest, pipeline: PipelineDep, who: Ingest) -> ScoreResponse:
    """Points are stored atomically (all or none), then scored: one result per point."""
    who.check_stream(body.stream)
    return await pipeline.score(body)
