"""The HTTP API's request and response bodies. Every field is documented with an example."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

STREAM_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"

StreamId = Annotated[str, Field(
    pattern=STREAM_ID_PATTERN, description="Stream id: 1-128 of A-Z a-z 0-9 _ . : -",
    examples=["web-01.cpu"])]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Timestamp = Annotated[FiniteFloat | datetime, Field(
    description="Epoch seconds, or an RFC 3339 date-time (no offset means UTC)",
    examples=[1700000000.0, "2023-11-14T22:13:20Z"])]


class Point(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timestamp: Timestamp
    values: list[FiniteFloat] = Field(
        min_length=1, description="One finite value per channel", examples=[[0.42, 17.0]])

    def epoch(self) -> float:
        ts = self.timestamp
        if isinstance(ts, datetime):
            return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()
        return float(ts)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"stream": "web-01.cpu", "points": [
            {"timestamp": 1700000000, "values": [0.42]},
            {"timestamp": "2023-11-14T22:13:21Z", "values": [0.44]}]}]},
    )

    stream: StreamId
    points: list[Point] = Field(
        min_length=1, description="Points in strictly increasing timestamp order, all after "
        "the stream's last stored point; at most TSAD_MAX_BATCH_POINTS")


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
    anomaly: bool = Field(description="Score above the stream's threshold", examples=[False])
    threshold: float | None = Field(description="The stream's threshold when scored; null "
                                    "until enough scores are seen", examples=[5.2])
    status: Literal["warming_up", "scored", "duplicate"] = Field(
        description="warming_up: the detector is still learning this stream; scored; "
        "duplicate: an exact duplicate dropped (duplicate policy 'drop')", examples=["scored"])
    top_channels: list[ChannelShareOut] | None = Field(
        None, description="For anomalous points: the channels that contribute most")
    precedents: list[PrecedentOut] | None = Field(
        None, description="For anomalous points scored by a memory detector: the nearest "
        "normal windows of each top channel, nearest first (what normal looked like)")


class ScoreResponse(BaseModel):
    stream: str = Field(examples=["web-01.cpu"])
    results: list[PointResultOut] = Field(description="One result per point, in order")


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


class StreamConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channels: int = Field(ge=1, description="Values per point; fixed for the stream's life",
                          examples=[2])
    channel_names: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None, description="One name per channel, used in explanations",
        examples=[["cpu", "memory"]])
    window: int | None = Field(None, ge=4, le=4096,
                               description="Points per window (default TSAD_DEFAULT_WINDOW)",
                               examples=[64])
    detector: str | None = Field(None, description="Detector name (default "
                                 "TSAD_DEFAULT_DETECTOR), or \"artifact:<name>\": a fitted "
                                 "artifact in TSAD_ARTIFACTS_DIR (its window and calibrated "
                                 "threshold become the stream's defaults)",
                                 examples=["residual_linear", "artifact:spear-msl"])
    threshold: ThresholdConfigIn | None = Field(
        None, description="Threshold overrides; a change restarts the threshold's "
        "calibration (the detector keeps its state)")
    alert_budget_per_day: float | None = Field(
        None, gt=0, le=1e6, description="At most this many alerts a day: converted to the "
        "SPOT risk q = budget / points per day (measured over calibration); replaces q",
        examples=[2.0])


class StreamOut(BaseModel):
    stream: str = Field(examples=["web-01.cpu"])
    channels: int = Field(examples=[2])
    channel_names: list[str] | None = Field(examples=[["cpu", "memory"]])
    window: int = Field(examples=[64])
    detector: str = Field(examples=["residual_linear"])
    points_seen: int = Field(description="Points accepted since creation", examples=[1024])
    last_timestamp: float | None = Field(description="Epoch seconds of the newest point",
                                         examples=[1700000000.0])
    created_at: float = Field(description="Epoch seconds", examples=[1699990000.0])
    threshold: dict | None = Field(None, description="Threshold overrides (kind, q, depth); "
                                   "null = server defaults", examples=[{"kind": "spot",
                                                                       "q": 0.001}])
    alert_budget_per_day: float | None = Field(None, description="Alert budget, if set",
                                               examples=[2.0])


class WindowOut(BaseModel):
    stream: str = Field(examples=["web-01.cpu"])
    timestamps: list[float] = Field(description="Epoch seconds, oldest first",
                                    examples=[[1700000000.0, 1700000001.0]])
    values: list[list[float]] = Field(description="One row of channel values per timestamp",
                                      examples=[[[0.42], [0.44]]])


class StreamList(BaseModel):
    streams: list[StreamOut]


class ErrorOut(BaseModel):
    message: str = Field(description="What went wrong, naming the field",
                         examples=["body.points.3.timestamp: timestamps must strictly increase"])
    detail: list[dict] | None = None
