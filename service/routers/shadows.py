from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Response, status

from service.deps import AUTH_RESPONSES, AdminStream, ReadStream, ShadowsDep
from service.schemas import ErrorOut
from service.shadows.config import NAME_PATTERN
from service.shadows.schemas import (
    PromotedOut,
    PromoteIn,
    ScoresOut,
    ShadowIn,
    ShadowList,
    ShadowOut,
    ShadowReport,
)

router = APIRouter(prefix="/streams/{stream}/shadows", tags=["shadows"],
                   responses=AUTH_RESPONSES)
_ERRORS = {404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 422: {"model": ErrorOut},
           429: {"model": ErrorOut}, 503: {"model": ErrorOut}}
Name = Annotated[str, Path(pattern=NAME_PATTERN, description="Shadow name: 1-32 of A-Z a-z "
                           "0-9 _ -", examples=["candidate"])]


@router.get("", response_model=ShadowList, responses=_ERRORS,
            summary="The stream's shadow detectors")
async def list_shadows(stream: ReadStream, shadows: ShadowsDep) -> ShadowList:
    return await shadows.list(stream)


@router.put("/{name}", response_model=ShadowOut,
            responses={**_ERRORS, 201: {"model": ShadowOut, "description": "Created"}},
            summary="Run a detector beside the live one, on the same points, without "
            "paging anyone")
async def put_shadow(stream: AdminStream, name: Name, body: ShadowIn, shadows: ShadowsDep,
                     response: Response) -> ShadowOut:
    """The detector spec is what PUT /streams/{id} takes. The shadow warms up on the
    points the stream holds, then scores every point the live detector scores, with its
    own state, threshold, likelihood and alerts; its alerts are recorded for its report
    and never reach a webhook. The same spec again changes nothing (200); another spec
    restarts the shadow. At most TSAD_SHADOWS_MAX_PER_STREAM per stream (429); costly
    detectors (a language model, torch) need TSAD_SHADOWS_ALLOW_COSTLY (422)."""
    out, created = await shadows.put(stream, name, body)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return out


@router.get("/{name}", response_model=ShadowOut, responses=_ERRORS, summary="Describe a shadow")
async def get_shadow(stream: ReadStream, name: Name, shadows: ShadowsDep) -> ShadowOut:
    return await shadows.get(stream, name)


@router.delete("/{name}", status_code=204, responses=_ERRORS, summary="Stop a shadow")
async def delete_shadow(stream: AdminStream, name: Name, shadows: ShadowsDep) -> Response:
    await shadows.delete(stream, name)
    return Response(status_code=204)


@router.get("/{name}/report", response_model=ShadowReport, responses=_ERRORS,
            summary="Compare the shadow with the live detector on the same points")
async def get_report(stream: ReadStream, name: Name, shadows: ShadowsDep) -> ShadowReport:
    """Points, anomalies, alerts (ids and times) of both; their agreement (Jaccard index
    of alerted time) and score rank correlation; mean scoring cost per point. With
    ranges labelled through POST /streams/{id}/feedback: precision, recall, NAB-style
    early detection, and time to detect each labelled incident."""
    return await shadows.report(stream, name)


@router.get("/{name}/scores", response_model=ScoresOut, responses=_ERRORS,
            summary="The per-point comparison: both scores and verdicts, newest last")
async def get_scores(
    stream: ReadStream, name: Name, shadows: ShadowsDep,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Newest points")] = 1000,
) -> ScoresOut:
    return await shadows.scores(stream, name, limit)


@router.post("/{name}/promote", response_model=PromotedOut, responses=_ERRORS,
             summary="Make the shadow the live detector; the live one becomes a shadow")
async def promote(stream: AdminStream, name: Name, shadows: ShadowsDep,
                  body: Annotated[PromoteIn | None, Body()] = None) -> PromotedOut:
    """One atomic switch: the stream's detector binding, the shadow's state, threshold,
    likelihood and alert tracker become live. An alert the live detector has open goes
    on (same id, no event); else one the shadow has open is opened to webhooks now. No
    event is lost or sent twice. The former live detector goes on as the shadow
    `demote_as` (default "previous"; null drops it)."""
    return await shadows.promote(stream, name, (body or PromoteIn()).demote_as)
