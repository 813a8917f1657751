"""The Prometheus-native HTTP doors: remote-write in, OTLP/HTTP metrics in, watches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response
from fastapi.responses import JSONResponse

from service.deps import AUTH_RESPONSES, Admin, Ingest, Reader
from service.ingest.engine import Report
from service.ingest.mapping import NAME_PATTERN
from service.ingest.runtime import IngestRuntime
from service.ingest.watch import WatchIn, WatchList, WatchOut
from service.ingest.wire import (
    Malformed,
    decode_otlp,
    decode_remote_write,
    gunzip,
    otlp_response,
    otlp_series,
)
from service.schemas import ErrorOut

router = APIRouter(responses=AUTH_RESPONSES)


def _runtime(request: Request) -> IngestRuntime:
    return request.app.state.ingest


Runtime = Annotated[IngestRuntime, Depends(_runtime)]
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


async def _body(request: Request, runtime: IngestRuntime) -> bytes:
    body = await request.body()
    if request.headers.get("content-encoding", "").lower() == "gzip":
        body = gunzip(body, runtime.settings.max_body_bytes)
    return body


def _unavailable(report: Report, runtime: IngestRuntime) -> JSONResponse:
    return JSONResponse(
        {"message": f"window store unavailable, retry later: {report.unavailable}",
         "detail": None}, status_code=503,
        headers={"Retry-After": str(runtime.settings.retry_after_seconds)})


@router.post(
    "/api/v1/write", tags=["prometheus"], status_code=204, response_class=Response,
    responses={204: {"description": "Stored, or dropped by a policy (counted in "
                     "tsad_ingest_samples_total)"}, **_ERRORS},
    openapi_extra=_body_schema(),
    summary="Prometheus remote-write 1.0 receiver (snappy-compressed protobuf)")
async def remote_write(request: Request, runtime: Runtime, who: Ingest) -> Response:
    """Point Prometheus' `remote_write` here with an `ingest` key as its Bearer
    credentials. Each series feeds a stream (README: "Point Prometheus at tsad"),
    scored as POST /score scores. 2xx: stored, or dropped by a stream's policy
    (retried samples, a stamp too old: counted, never retried forever); 400: not a
    snappy WriteRequest; 503: retry."""
    version = request.headers.get("x-prometheus-remote-write-version", "0.1.0")
    if not version.startswith("0.1."):
        raise HTTPException(415, f"remote-write version {version!r}: this receiver speaks "
                            "1.0 (X-Prometheus-Remote-Write-Version 0.1.0)")
    encoding = request.headers.get("content-encoding", "snappy").lower()
    if encoding != "snappy":
        raise HTTPException(415, f"Content-Encoding {encoding!r}: remote-write bodies are "
                            "snappy-compressed")
    try:
        decoded = decode_remote_write(await request.body(), runtime.settings.max_body_bytes)
    except Malformed as exc:
        raise HTTPException(exc.status, str(exc)) from None
    report = await runtime.ingestor.ingest(decoded.series, "remote_write", tenant=who.tenant)
    _count_undecodable(runtime, "remote_write", decoded.invalid, decoded.unsupported)
    if report.unavailable:
        return _unavailable(report, runtime)
    return Response(status_code=204)


@router.post(
    "/v1/metrics", tags=["prometheus"], response_class=Response,
    responses={200: {"description": "ExportMetricsServiceResponse in the request's "
                     "encoding; partial_success counts the points not accepted",
                     "content": {"application/x-protobuf": {}, "application/json": {}}},
               **_ERRORS},
    openapi_extra=_body_schema(json_body=True),
    summary="OTLP/HTTP metrics (protobuf or JSON): gauges and sums")
async def otlp_metrics(request: Request, runtime: Runtime, who: Ingest) -> Response:
    """An OpenTelemetry SDK or Collector exporting OTLP/HTTP metrics to
    `http://tsad:8000/v1/metrics`. Gauges and sums become Prometheus-named series
    (dots to underscores, `_total` on monotonic cumulative sums; service.name is `job`,
    service.instance.id `instance`), then streams by the same rules as remote-write.
    Histograms and summaries are counted in partial_success."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("application/x-protobuf", "application/json"):
        raise HTTPException(415, f"Content-Type {media!r}: OTLP/HTTP is "
                            "application/x-protobuf or application/json")
    json_body = media == "application/json"
    try:
        decoded = otlp_series(decode_otlp(await _body(request, runtime), json_body))
    except Malformed as exc:
        raise HTTPException(exc.status, str(exc)) from None
    report = await runtime.ingestor.ingest(decoded.series, "otlp", tenant=who.tenant)
    _count_undecodable(runtime, "otlp", decoded.invalid, decoded.unsupported)
    if report.unavailable:
        return _unavailable(report, runtime)
    rejected = decoded.invalid + decoded.unsupported + report.rejected
    problems = decoded.problems + report.problems
    if decoded.unsupported:
        problems.append(f"{decoded.unsupported} histogram or summary points: tsad scores "
                        "gauges and sums")
    for reason, n in report.dropped.items():
        problems.append(f"{n} points dropped: {reason}")
    body, media_type = otlp_response(rejected, "; ".join(problems[:5]), json_body)
    return Response(body, media_type=media_type)


def _count_undecodable(runtime: IngestRuntime, door: str, invalid: int,
                       unsupported: int) -> None:
    samples = runtime.ingestor.metrics.ingest_samples_total
    if invalid:
        samples.labels(door, "invalid").inc(invalid)
    if unsupported:
        samples.labels(door, "unsupported").inc(unsupported)


# --- watches -------------------------------------------------------------------------------
async def _global_reader(who: Reader) -> None:
    who.check_global("watches")


async def _global_admin(who: Admin) -> None:
    who.check_global("watches")


async def _out(runtime: IngestRuntime, name: str, spec: WatchIn, source: str) -> WatchOut:
    runner = runtime.watches
    return WatchOut(**spec.model_dump(), name=name, source=source,
                    evaluated_until=await runtime.state.cursor(name),
                    running_here=name in runner.holding, last_error=runner.errors.get(name))


@router.get("/watches", tags=["prometheus"], response_model=WatchList,
            dependencies=[Depends(_global_reader)], summary="Watches and where they are")
async def list_watches(runtime: Runtime) -> WatchList:
    specs = await runtime.watches.specs()
    return WatchList(watches=[await _out(runtime, n, spec, source)
                              for n, (spec, source) in sorted(specs.items())])


@router.get("/watches/{name}", tags=["prometheus"], response_model=WatchOut,
            responses={404: {"model": ErrorOut}}, dependencies=[Depends(_global_reader)],
            summary="One watch, how far it has evaluated, its last error")
async def get_watch(name: WatchName, runtime: Runtime) -> WatchOut:
    specs = await runtime.watches.specs()
    if name not in specs:
        raise HTTPException(404, f"no watch {name!r}")
    return await _out(runtime, name, *specs[name])


@router.put("/watches/{name}", tags=["prometheus"], response_model=WatchOut,
            responses={201: {"model": WatchOut}, 409: {"model": ErrorOut},
                       422: {"model": ErrorOut}, 429: {"model": ErrorOut}},
            dependencies=[Depends(_global_admin)],
            summary="Create or change a watch (a PromQL query tsad polls and scores)")
async def put_watch(name: WatchName, body: WatchIn, runtime: Runtime) -> JSONResponse:
    """A changed query or step goes on from the watch's last evaluated time; DELETE and
    PUT again to start over (from `backfill` back)."""
    settings = runtime.settings
    if not settings.prometheus_url:
        raise HTTPException(409, "watches need TSAD_PROMETHEUS_URL (the Prometheus HTTP "
                            "API to query)")
    specs = await runtime.watches.specs()
    if specs.get(name, (None, ""))[1] == "file":
        raise HTTPException(409, f"watch {name!r} is defined in TSAD_INGEST_CONFIG "
                            f"({settings.ingest_config}): change it there")
    if name not in specs and len(specs) >= settings.watch_max:
        raise HTTPException(429, f"at most {settings.watch_max} watches (TSAD_WATCH_MAX)")
    created = await runtime.state.put_watch(name, body.model_dump())
    await runtime.watches.sync()
    out = await _out(runtime, name, body, "api")
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if created else 200)


@router.delete("/watches/{name}", tags=["prometheus"], status_code=204,
               response_class=Response, dependencies=[Depends(_global_admin)],
               responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
               summary="Stop and forget a watch (its streams stay)")
async def delete_watch(name: WatchName, runtime: Runtime) -> Response:
    specs = await runtime.watches.specs()
    if specs.get(name, (None, ""))[1] == "file":
        raise HTTPException(409, f"watch {name!r} is defined in TSAD_INGEST_CONFIG: "
                            "remove it there")
    if not await runtime.state.delete_watch(name):
        raise HTTPException(404, f"no watch {name!r}")
    await runtime.watches.sync()
    runtime.watches.forget(name)
    return Response(status_code=204)
