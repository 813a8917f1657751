from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from service.deps import (
    AUTH_RESPONSES,
    Admin,
    AdminStream,
    FeedbackDep,
    Reader,
    ReadStream,
    StreamsDep,
)
from service.feedback.schemas import FeedbackOut, FeedbackRequest
from service.schemas import (
    STREAM_ID_PATTERN,
    ErrorOut,
    StreamConfigIn,
    StreamList,
    StreamOut,
    WindowOut,
)

router = APIRouter(prefix="/streams", tags=["streams"], responses=AUTH_RESPONSES)
_ERRORS = {404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 422: {"model": ErrorOut},
           503: {"model": ErrorOut}}


@router.get("", response_model=StreamList, responses=_ERRORS,
            summary="List streams, by id, a page at a time")
async def list_streams(
    admin: StreamsDep,
    who: Reader,
    limit: Annotated[int, Query(ge=1, le=1000, description="Streams per page")] = 500,
    cursor: Annotated[str | None, Query(pattern=STREAM_ID_PATTERN,
                                        description="next_cursor of the previous page")] = None,
) -> StreamList:
    """A key with a tenant sees that tenant's streams only (a page may then hold fewer
    than ``limit``; follow ``next_cursor`` until it is null)."""
    page = await admin.list(limit, cursor)
    page.streams = [s for s in page.streams if who.owns(s.stream)]
    return page


@router.put("/{stream}", response_model=StreamOut,
            responses={**_ERRORS, 201: {"model": StreamOut, "description": "Created"},
                       429: {"model": ErrorOut, "description": "A new stream beyond "
                             "TSAD_MAX_STREAMS or TSAD_MAX_STREAMS_PER_TENANT"}},
            summary="Create or configure a stream (channels are fixed once set)")
async def put_stream(stream: AdminStream, body: StreamConfigIn, admin: StreamsDep,
                     response: Response, who: Admin) -> StreamOut:
    """A new stream counts against the key's tenant's quota (TSAD_MAX_STREAMS_PER_TENANT)
    and the store's (TSAD_MAX_STREAMS): 429 when either is full."""
    out, created = await admin.put(stream, body, tenant=who.tenant)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return out


@router.get("/{stream}", response_model=StreamOut, responses=_ERRORS, summary="Describe a stream")
async def get_stream(stream: ReadStream, admin: StreamsDep) -> StreamOut:
    return await admin.get(stream)


@router.delete("/{stream}", status_code=204, responses=_ERRORS,
               summary="Delete a stream, its window and its state")
async def delete_stream(stream: AdminStream, admin: StreamsDep) -> Response:
    await admin.delete(stream)
    return Response(status_code=204)


@router.get("/{stream}/window", response_model=WindowOut, responses=_ERRORS,
            summary="The stream's stored window: the last `window` points, oldest first")
async def get_window(stream: ReadStream, admin: StreamsDep) -> WindowOut:
    return await admin.window(stream)


@router.post("/{stream}/feedback", response_model=FeedbackOut, responses=_ERRORS,
             summary="Label time ranges (false positive, missed anomaly); optionally adapt "
             "the stream's soft prompts (SPEAR artifacts) on them")
async def post_feedback(stream: AdminStream, body: FeedbackRequest,
                        feedback: FeedbackDep) -> FeedbackOut:
    """Each range becomes labelled windows (ending at its points) stored with the stream.
    With `adapt: true`, the stream's own copy of its SPEAR artifact's soft prompts and
    head is tuned on all its stored feedback (the language model stays frozen, other
    streams are unaffected) and its next scores use it. 409 when the stream's detector
    cannot adapt; then nothing is stored."""
    return await feedback.post(stream, body)


@router.get("/{stream}/feedback", response_model=FeedbackOut, responses=_ERRORS,
            summary="The stream's stored feedback ranges and the adaptation in force")
async def get_feedback(stream: ReadStream, feedback: FeedbackDep) -> FeedbackOut:
    return await feedback.get(stream)
