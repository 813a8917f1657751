"""The Prometheus-native HTTP doors: remote-write in, OTLP/HTTP metrics in, watches.
Thin: the headers and body go to ``IngestDoors`` and ``WatchAdmin``
(``service/deps.py``), whose errors ``service/http.py`` answers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse

from service.deps import AUTH_RESPONSES, DoorsDep, Ingest, Reader, WatchesDep, global_admin
from service.ingest.mapping import NAME_PATTERN
from service.ingest.watch import WatchIn, WatchList, WatchOut
from service.schemas import ErrorOut

router = APIRouter(responses=AUTH_RESPONSES, tags=["prometheus"])

WatchName = Annotated[str, Path(pattern=NAME_PATTERN, description="Watch name",
                                examples=["node-rx"])]
_ERRORS = {code: {"model": ErrorOut, "description": why} for code, why in (
    (400, "Malformed body: not decodable, nothing stored"),
    (413, "Body, or what it decompresses to, over TSAD_MAX_BODY_BYTES"),
    (415, "Content type, encoding or protocol version not supported"),
    (503, "Store unavailable: retry (points already stored are recognised as retries)"))}


def _body_schema(json_body: bool = False) -> dict:
    content = {"application/x-protobuf": {"schema": {"type": "string", "format": "binary"}}}
    if json_body:  # OTLP/JSON: an ExportMetricsServiceRequest (its schema: opentelemetry-proto)
        content["application/json"] = {"schema": {"type": "object"}}
    return {"requestBody": {"required": True, "content": content}}


@router.post(
    "/api/v1/write", status_code=204, response_class=Response,
    responses={204: {"description": "Stored, or dropped by a policy (counted in "
                     "tsad_ingest_samples_total)"}, **_ERRORS},
    openapi_extra=_body_schema(),
    summary="Prometheus remote-write 1.0 receiver (snappy-compressed protobuf)")
async def remote_write(request: Request, doors: DoorsDep, who: Ingest) -> Response:
    """Point Prometheus' `remote_write` here with an `ingest` key as its Bearer
    credentials. Each series feeds a stream (README: "Point Prometheus at tsad"),
    scored as POST /score scores. 2xx: stored, or dropped by a stream's policy
    (retried samples, a stamp too old: counted, never retried forever); 400: not a
    snappy WriteRequest; 503: retry."""
    await doors.remote_write(
        await request.body(), tenant=who.tenant,
        version=request.headers.get("x-prometheus-remote-write-version"),
        encoding=request.headers.get("content-encoding"))
    return Response(status_code=204)


@router.post(
    "/v1/metrics", response_class=Response,
    responses={200: {"description": "ExportMetricsServiceResponse in the request's "
                     "encoding; partial_success counts the points not accepted",
                     "content": {"application/x-protobuf": {}, "application/json": {}}},
               **_ERRORS},
    openapi_extra=_body_schema(json_body=True),
    summary="OTLP/HTTP metrics (protobuf or JSON): gauges and sums")
async def otlp_metrics(request: Request, doors: DoorsDep, who: Ingest) -> Response:
    """An OpenTelemetry SDK or Collector exporting OTLP/HTTP metrics to
    `http://tsad:8000/v1/metrics`. Gauges and sums become Prometheus-named series
    (dots to underscores, `_total` on monotonic cumulative sums; service.name is `job`,
    service.instance.id `instance`), then streams by the same rules as remote-write.
    Histograms and summaries are counted in partial_success."""
    body, media_type = await doors.otlp(
        await request.body(), tenant=who.tenant,
        media=request.headers.get("content-type"),
        encoding=request.headers.get("content-encoding"))
    return Response(body, media_type=media_type)


# --- watches -------------------------------------------------------------------------------
async def _global_reader(who: Reader) -> None:
    who.check_global("watches")


@router.get("/watches", response_model=WatchList, dependencies=[Depends(_global_reader)],
            summary="Watches and where they are")
async def list_watches(watches: WatchesDep) -> WatchList:
    return await watches.list()


@router.get("/watches/{name}", response_model=WatchOut,
            responses={404: {"model": ErrorOut}}, dependencies=[Depends(_global_reader)],
            summary="One watch, how far it has evaluated, its last error")
async def get_watch(name: WatchName, watches: WatchesDep) -> WatchOut:
    return await watches.get(name)


@router.put("/watches/{name}", response_model=WatchOut,
            responses={201: {"model": WatchOut}, 409: {"model": ErrorOut},
                       422: {"model": ErrorOut}, 429: {"model": ErrorOut}},
            dependencies=[Depends(global_admin)],
            summary="Create or change a watch (a PromQL query tsad polls and scores)")
async def put_watch(name: WatchName, body: WatchIn, watches: WatchesDep) -> JSONResponse:
    """A changed query or step goes on from the watch's last evaluated time; DELETE and
    PUT again to start over (from `backfill` back)."""
    out, created = await watches.put(name, body)
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if created else 200)


@router.delete("/watches/{name}", status_code=204, response_class=Response,
               dependencies=[Depends(global_admin)],
               responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
               summary="Stop and forget a watch (its streams stay)")
async def delete_watch(name: WatchName, watches: WatchesDep) -> Response:
    await watches.delete(name)
    return Response(status_code=204)
