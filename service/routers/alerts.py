from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from service.alerts.query import AlertQuery, valid_cursor
from service.alerts.schemas import AlertList, AlertOut
from service.deps import AUTH_RESPONSES, AlertsDep, Reader
from service.errors import InvalidInput, NotFound
from service.schemas import STREAM_ID_PATTERN, ErrorOut, FiniteFloat, epoch

router = APIRouter(prefix="/alerts", tags=["alerts"], responses=AUTH_RESPONSES)
# `?stream=` (empty) lists every stream: the README's query template pasted as written
_STREAM_OR_EMPTY = rf"^$|{STREAM_ID_PATTERN}"
_ERRORS = {404: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}}


@router.get("", response_model=AlertList, responses=_ERRORS,
            summary="List alerts, newest opening first (filter by stream, state, time)")
async def list_alerts(
    store: AlertsDep,
    who: Reader,
    stream: Annotated[str | None, Query(
        pattern=_STREAM_OR_EMPTY, description="One stream's alerts; empty or absent: every "
        "stream (the caller's tenant's)", examples=["web-01.cpu"])] = None,
    state: Annotated[Literal["open", "resolved"] | None, Query()] = None,
    since: Annotated[FiniteFloat | datetime | None, Query(
        description="opened_at >= since: epoch seconds or RFC 3339 (no offset means UTC), "
        "like a point's timestamp", examples=["2023-11-14T22:13:20Z"])] = None,
    until: Annotated[FiniteFloat | datetime | None, Query(
        description="opened_at <= until: epoch seconds or RFC 3339 (no offset means UTC)",
        examples=[1700003600])] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=200, pattern=r"^[0-9eE.+\-]+:al_[0-9a-f]+$",
                                        description="next_cursor of the previous page")] = None,
) -> AlertList:
    """A key with a tenant sees that tenant's alerts only. Times in the answer are epoch
    seconds, like every time the API answers; since and until take either form."""
    stream = stream or None  # `?stream=` is no filter, as a user pasting it expects
    if stream is not None:
        who.check_stream(stream)
    if cursor is not None and not valid_cursor(cursor):
        raise InvalidInput(("query", "cursor"), "not a cursor this service wrote: pass "
                          "next_cursor of the previous page unchanged")
    query = AlertQuery(stream=stream, state=state,
                       since=None if since is None else epoch(since),
                       until=None if until is None else epoch(until), limit=limit,
                       cursor=cursor, stream_prefix=f"{who.tenant}." if who.tenant else None)
    alerts, next_cursor = await store.list(query)
    return AlertList(alerts=[AlertOut(**a) for a in alerts], next_cursor=next_cursor)


@router.get("/{alert_id}", response_model=AlertOut, responses=_ERRORS,
            summary="One alert with its evidence")
async def get_alert(alert_id: str, store: AlertsDep, who: Reader) -> AlertOut:
    alert = await store.get(alert_id)
    if alert is None or not who.owns(alert["stream"]):  # another tenant's: as if absent
        raise NotFound(f"alert {alert_id!r} not found")
    return AlertOut(**alert)
