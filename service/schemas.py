"""The HTTP API's request and response bodies. Every field is documented with an example."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

STREAM_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"

StreamId = Annotated[str, Field(
    pattern=STREAM_ID_PATTERN, description="Stream id: 1-128 of A-Z a-z 0-9 _ . : -",
    examples=["web-01.cpu"])]
# strict: true/false and numeric strings are not numbers (lax pydantic reads false as 0)
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# a date-time, its offset optional (none means UTC), as the JSON schema's format says
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:\d{2})?")


def _strict_timestamp(value: object) -> object:
    """A string must be an RFC 3339 date-time: pydantic's datetime alone also reads
    "1700000000" (epoch seconds in a string) and "2023-11-14" (a date)."""
    if isinstance(value, str) and not _RFC3339.fullmatch(value):
        raise ValueError("a timestamp is epoch seconds as a JSON number, or an RFC 3339 "
                         "date-time string such as 2023-11-14T22:13:20Z")
    return value


Timestamp = Annotated[FiniteFloat | datetime, BeforeValidator(_strict_timestamp), Field(
    description="Epoch seconds (a number), or an RFC 3339 date-time string (no offset "
    "means UTC)", examples=[1700000000.0, "2023-11-14T22:13:20Z"])]


class Point(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timestamp: Timestamp = Field(
        description="Epoch seconds, or an RFC 3339 date-time (no offset means UTC); at most "
        "TSAD_TIMESTAMP_MAX_LEAD_SECONDS (1 day) ahead of the server clock and not before "
        "TSAD_TIMESTAMP_MIN (1970), else 422", examples=[1700000000.0, "2023-11-14T22:13:20Z"])
    values: list[FiniteFloat] = Field(
        min_length=1, description="One finite number per channel (not a boolean), of "
        "magnitude at most TSAD_VALUE_MAX_ABS (1e15), else 422", examples=[[0.42, 17.0]])

    def epoch(self) -> float:
        return epoch(self.timestamp)


def epoch(ts: float | datetime) -> float:
    """Epoch seconds of a Timestamp (a date-time without offset is UTC)."""
    if isinstance(ts, datetime):
        return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()
    return float(ts)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"stream": "web-01.cpu", "points": [
                {"timestamp": 1700000000, "values": [0.42]},
                {"timestamp": "2023-11-14T22:13:21Z", "values": [0.44]}]},
            {"stream": "web-01.cpu", "timestamps": [1700000000, 1700000001],
             "values": [[0.42], [0.44]]}],
            # one form or the other, as the service judges it: points, or timestamps
            # with values (an absent field and a null one are the same)
            "oneOf": [
                {"required": ["points"], "properties": {
                    "points": {"type": "array"}, "timestamps": {"type": "null"},
                    "values": {"type": "null"}}},
                {"required": ["timestamps", "values"], "properties": {
                    "points": {"type": "null"}, "timestamps": {"type": "array"},
                    "values": {"type": "array"}}}]},
    )

    stream: StreamId
    points: list[Point] | None = Field(
        None, min_length=1, description="Points, oldest first; at most "
        "TSAD_MAX_BATCH_POINTS. Give either points or the columnar form (timestamps and "
        "values), which scores the same and parses faster. A "
        "point whose timestamp is not after the previous point's (the previous point of "
        "the batch that is stored, or the stream's last stored point) follows the "
        "stream's timestamp policy (see StreamConfigIn.timestamps): nudge (default) "
        "stores it 1 ms after that point, drop skips it, reject refuses the batch (422). "
        "Retries come first: while no point of the batch has been stored yet, a point "
        "equal to a point of the stream's stored window (the same timestamp and values; "
        "for a point stored nudged, the timestamp it was sent with and its values) is a "
        "duplicate, never stored twice: a batch of duplicates only (a retry) is answered, "
        "each point with its result if this request scored it, else status duplicate; "
        "with new points after them, TSAD_DUPLICATES=reject refuses the batch (422), drop "
        "answers them status duplicate. The last batch is held whole, so a retry of it is "
        "recognised however long; a point older than what is held cannot be told from a "
        "new point with a backward timestamp: the timestamp policy applies (send an "
        "Idempotency-Key to be safe)")
    timestamps: list[Timestamp] | None = Field(
        None, min_length=1, description="Columnar form, instead of points: the points' "
        "timestamps, oldest first (epoch seconds or RFC 3339, as in Point.timestamp); "
        "with values", examples=[[1700000000, 1700000001]])
    values: list[Annotated[list[FiniteFloat], Field(min_length=1)]] | None = Field(
        None, min_length=1, description="Columnar form: one row per timestamp, the "
        "point's channel values (values[i] is the point at timestamps[i]; a univariate "
        "stream sends [[x0], [x1], ...]), the same rules as Point.values. Errors name "
        "timestamps.i or values.i.j", examples=[[[0.42], [0.44]]])

    @property
    def columnar(self) -> bool:
        return self.points is None

    def sent_timestamps(self) -> list[float | datetime]:
        """Each point's timestamp as sent, in order (results echo it)."""
        if self.points is not None:
            return [p.timestamp for p in self.points]
        return self.timestamps or []


def columnar_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Where a check of the list form points, in the columnar form.

    >>> columnar_loc(("body", "points", 3, "timestamp"))
    ('body', 'timestamps', 3)
    >>> columnar_loc(("body", "points", 0, "values", 2))
    ('body', 'values', 0, 2)
    """
    if len(loc) >= 4 and loc[:2] == ("body", "points"):
        if loc[3] == "timestamp":
            return ("body", "timestamps", loc[2])
        return ("body", "values", loc[2], *loc[4:])
    return loc


class ChannelShareOut(BaseModel):
    channel: str = Field(description="Channel name (or index)", examples=["cpu"])
    share: float = Field(description="Share of the point's score from this channel",
                         examples=[0.81])


class PrecedentOut(BaseModel):
    channel: str = Field(description="Channel whose memory holds this normal window",
                         examples=["cpu"])
    start: float = Field(description="First timestamp of the normal window (for a fitted "
                         "artifact: its position in the training series)",
                         examples=[1699990000.0])
    end: float = Field(description="Last timestamp of the normal window",
                       examples=[1699990630.0])
    distance: float = Field(description="Cosine distance to the scored window (0 = "
                            "identical)", examples=[0.042])


class PointResultOut(BaseModel):
    timestamp: float | datetime = Field(description="The point's timestamp, as sent",
                                        examples=[1700000000.0])
    score: float | None = Field(description="Anomaly score, higher is more anomalous; "
                                "null while warming up", examples=[3.7])
    likelihood: float | None = Field(
        None, ge=0.0, le=1.0, description="Anomaly likelihood in [0, 1], one scale for "
        "every stream and detector: a normal point reads 0.99 x (1 - p), p the share of the "
        "stream's recent scores (TSAD_LIKELIHOOD_HISTORY) above it, so normal points are "
        "uniform below 0.99 (median about 0.5); an anomaly reads 0.99 and above, higher the "
        "further its score breaks the threshold. Null while warming up", examples=[0.42])
    anomaly: bool = Field(description="Score above the stream's threshold", examples=[False])
    threshold: float | None = Field(description="The stream's threshold when scored; null "
                                    "until enough scores are seen", examples=[5.2])
    status: Literal["warming_up", "scored", "duplicate", "dropped"] = Field(
        description="warming_up: the detector is still learning this stream; scored; "
        "duplicate: a retry of a stored point, not stored again; "
        "dropped: not stored nor scored, its timestamp not after the previous point's "
        "(timestamp policy 'drop')", examples=["scored"])
    top_channels: list[ChannelShareOut] | None = Field(
        None, description="For anomalous points: the channels that contribute most")
    precedents: list[PrecedentOut] | None = Field(
        None, description="For anomalous points scored by a memory detector: the nearest "
        "normal windows of each top channel, nearest first (what normal looked like)")
    timestamp_action: Literal["nudged", "dropped"] | None = Field(
        None, description="Set when the point's timestamp was not after the previous "
        "point's: nudged = stored and scored at stored_timestamp (the previous point's "
        "+ 1 ms), dropped = not stored nor scored; null = stored as sent (or a duplicate)",
        examples=["nudged"])
    stored_timestamp: float | None = Field(
        None, description="Epoch seconds the point is stored under: its own timestamp, or "
        "the nudged one; for a duplicate, its stored twin's; null when dropped",
        examples=[1700000000.001])


class ScoreResponse(BaseModel):
    stream: str = Field(examples=["web-01.cpu"])
    results: list[PointResultOut] = Field(description="One result per point, in order")
    points_until_scored: int | None = Field(
        None, ge=0, description="How many more points the stream needs for its first "
        "score: 1 while the next point is the first scored, 0 once the stream scores (the "
        "stream's window must fill, then an online detector learns its warm-up, 256 "
        "windows by default (TSAD_DETECTOR_PARAMS), in chunks of 64: the first scored point "
        "is the 321st). A batch that stored nothing (a retry) answers it too. Null when the "
        "detector cannot say.", examples=[0])


class ThresholdConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["spot", "dspot", "quantile", "fixed"] | None = Field(
        None, description="spot: streaming peaks-over-threshold (extreme value theory); "
        "dspot: the same on the drift-corrected score; quantile: a quantile of recent "
        "scores; fixed: flag scores >= value (default TSAD_THRESHOLD_KIND; for an "
        "artifact detector with a calibrated cut: fixed at that cut)", examples=["spot"])
    q: float | None = Field(None, gt=0, lt=0.5, description="SPOT/DSPOT risk: probability "
                            "that a normal score exceeds the threshold (default "
                            "TSAD_THRESHOLD_Q)", examples=[0.001])
    depth: int | None = Field(None, ge=2, le=10_000, description="DSPOT moving-average "
                              "depth in points (default TSAD_THRESHOLD_DEPTH)", examples=[50])
    value: FiniteFloat | None = Field(None, description="kind fixed: the threshold (default "
                                      "for an artifact: its calibrated cut)", examples=[0.7])


PARAMS_HELP = ("The detector's own tunables for this stream (fields of its Config, "
               "models/README.md), over the service's TSAD_DETECTOR_PARAMS; not the window "
               "(the stream's), not for an artifact (its config is fixed)")


class StreamConfigIn(BaseModel):
    # whole examples: the fields' own examples combined would ask for a SPOT q and an
    # alert budget at once, which is refused
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"channels": 2, "channel_names": ["cpu", "memory"], "window": 64,
         "detector": "residual_linear", "threshold": {"kind": "spot", "q": 0.001},
         "timestamps": "nudge"},
        {"channels": 2, "detector": "ensemble", "alert_budget_per_day": 2.0}]})

    channels: int = Field(ge=1, description="Values per point; fixed for the stream's life "
                          "(at most TSAD_MAX_CHANNELS)",
                          examples=[2])
    channel_names: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None, description="One name per channel, used in explanations",
        examples=[["cpu", "memory"]])
    window: int | None = Field(None, ge=4, le=65_536,
                               description="Points per window (default TSAD_DEFAULT_WINDOW, "
                               "at most TSAD_MAX_WINDOW)",
                               examples=[64])
    detector: str | None = Field(None, description="Detector name (default "
                                 "TSAD_DEFAULT_DETECTOR), or \"artifact:<name>\": a fitted "
                                 "artifact in TSAD_ARTIFACTS_DIR, such as the shipped "
                                 "\"artifact:cma-msl\" (its window and calibrated "
                                 "threshold become the stream's defaults)",
                                 examples=["residual_linear", "ensemble"])
    params: dict[str, Any] | None = Field(
        None, description=PARAMS_HELP + ". A change restarts the detector, like a change of "
        "detector", examples=[{"warmup": 128}])
    threshold: ThresholdConfigIn | None = Field(
        None, description="Threshold overrides; a change restarts the threshold's "
        "calibration (the detector keeps its state)")
    alert_budget_per_day: float | None = Field(
        None, gt=0, le=1e6, description="At most this many alerts a day: converted to the "
        "SPOT risk q = budget / points per day (measured over calibration); instead of "
        "threshold.q, not with it (see the model's second example)")
    timestamps: Literal["nudge", "drop", "reject"] | None = Field(
        None, description="What to do with a point whose timestamp is not after the "
        "previous point's (a repeated or backward stamp, e.g. a daylight-saving hour): "
        "nudge = store and score it 1 ms after the previous point (result "
        "timestamp_action nudged), drop = skip it (status dropped), reject = 422 for the "
        "whole batch (default TSAD_TIMESTAMPS, nudge)", examples=["nudge"])


class StreamOut(BaseModel):
    stream: str = Field(examples=["web-01.cpu"])
    channels: int = Field(examples=[2])
    channel_names: list[str] | None = Field(examples=[["cpu", "memory"]])
    window: int = Field(examples=[64])
    detector: str = Field(examples=["residual_linear"])
    params: dict[str, Any] | None = Field(None, description="The detector's own tunables "
                                          "for this stream; null = the service's",
                                          examples=[{"warmup": 128}])
    points_seen: int = Field(description="Points accepted since creation", examples=[1024])
    last_timestamp: float | None = Field(description="Epoch seconds of the newest point",
                                         examples=[1700000000.0])
    created_at: float = Field(description="Epoch seconds", examples=[1699990000.0])
    threshold: dict | None = Field(None, description="Threshold overrides (kind, q, depth); "
                                   "null = server defaults", examples=[{"kind": "spot",
                                                                       "q": 0.001}])
    alert_budget_per_day: float | None = Field(None, description="Alert budget, if set",
                                               examples=[2.0])
    timestamps: Literal["nudge", "drop", "reject"] | None = Field(
        None, description="Timestamp policy; null = the server default TSAD_TIMESTAMPS",
        examples=["nudge"])


class WindowOut(BaseModel):
    stream: str = Field(examples=["web-01.cpu"])
    timestamps: list[float] = Field(description="Epoch seconds, oldest first",
                                    examples=[[1700000000.0, 1700000001.0]])
    values: list[list[float]] = Field(description="One row of channel values per timestamp",
                                      examples=[[[0.42], [0.44]]])


class StreamList(BaseModel):
    streams: list[StreamOut] = Field(description="By stream id, ascending")
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; "
                                    "null on the last page", examples=[None])


class ErrorOut(BaseModel):
    message: str = Field(description="What went wrong, naming the field",
                         examples=["body.points.3.timestamp: timestamps must strictly increase"])
    detail: list[dict] | None = None
