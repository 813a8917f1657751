"""The shadow API's request and response bodies (/streams/{id}/shadows). Every field is
documented with an example."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import PARAMS_HELP, StreamOut, ThresholdConfigIn
from service.shadows.config import NAME_PATTERN


class ShadowIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        # whole examples: the fields' own examples combined would ask for a SPOT q and an
        # alert budget at once, which is refused
        json_schema_extra={"examples": [{"detector": "residual_linear"},
                                        {"detector": "ensemble", "params": {"warmup": 128},
                                         "threshold": {"kind": "spot", "q": 0.0005}},
                                        {"detector": "residual_linear",
                                         "alert_budget_per_day": 2.0}]})

    detector: str = Field(description="A registered detector that learns online, or "
                          "\"artifact:<name>\" (a fitted artifact in TSAD_ARTIFACTS_DIR, of "
                          "the stream's window and channels), as PUT /streams/{id} takes. "
                          "Detectors that run a language model or torch per window need "
                          "TSAD_SHADOWS_ALLOW_COSTLY", examples=["residual_linear"])
    params: dict[str, Any] | None = Field(None, description=PARAMS_HELP,
                                          examples=[{"warmup": 128}])
    threshold: ThresholdConfigIn | None = Field(
        None, description="The shadow's own threshold (default: the service's, as for a "
        "stream)")
    alert_budget_per_day: float | None = Field(
        None, gt=0, le=1e6, description="The shadow's own alert budget (SPOT risk = budget "
        "/ points per day); instead of threshold.q, not with it (see the model's third "
        "example)")


class ShadowOut(BaseModel):
    stream: str = Field(description="Stream id", examples=["nyc_taxi"])
    name: str = Field(description="Shadow name", examples=["candidate"])
    detector: str = Field(description="Its detector", examples=["embedding_memory"])
    params: dict[str, Any] | None = Field(None, description="Its detector's own tunables",
                                          examples=[None])
    threshold: dict | None = Field(None, description="Its threshold overrides",
                                   examples=[{"kind": "spot", "q": 0.001}])
    alert_budget_per_day: float | None = Field(None, description="Its alert budget",
                                               examples=[None])
    costly: bool = Field(description="Its detector runs a language model or torch per "
                         "window (allowed by TSAD_SHADOWS_ALLOW_COSTLY)", examples=[True])
    created_at: float = Field(description="Epoch seconds", examples=[1700000000.0])
    start: int = Field(description="Stream index of the first point it scored (it warmed "
                       "up on the points held before)", examples=[320])
    points: int = Field(description="Points it has scored beside the live detector",
                        examples=[10000])
    lag_points: int = Field(description="Points the stream has stored that it has not "
                            "scored yet (it catches up at each chunk end, 64 points, off the "
                            "request path)", examples=[0])
    skipped_points: int = Field(description="Points it never scored (dropped from a full "
                                "queue, or no longer held after a crash)", examples=[0])


class ShadowList(BaseModel):
    stream: str = Field(description="Stream id", examples=["nyc_taxi"])
    shadows: list[ShadowOut] = Field(description="By name")


class AlertBrief(BaseModel):
    id: str = Field(description="Alert id (a shadow's: never in /alerts)",
                    examples=["al_4b1deffe08c3cd9c0e68"])
    state: Literal["open", "resolved"] = Field(examples=["resolved"])
    severity: Literal["warning", "critical"] = Field(examples=["critical"])
    opened_at: float = Field(description="Stream time (epoch seconds)",
                             examples=[1414890000.0])
    resolved_at: float | None = Field(None, description="Stream time; null while open",
                                      examples=[1414926000.0])
    peak_score: float = Field(description="Highest score", examples=[2.4])
    peak_at: float = Field(description="Stream time of the peak", examples=[1414890000.0])
    anomalous_points: int = Field(description="Anomalous points while open", examples=[3])


class SideReport(BaseModel):
    detector: str = Field(description="The detector (for live: the stream's now)",
                          examples=["ensemble"])
    points_scored: int = Field(description="Of the compared points, those it scored (not "
                               "warming up)", examples=[10000])
    anomalies: int = Field(description="Points it flagged", examples=[12])
    alerts_opened: int = Field(description="Alerts it opened over the compared points",
                               examples=[4])
    alerts: list[AlertBrief] = Field(description="Its alerts overlapping the compared "
                                     "points (at most 200, newest)")
    cost_ms_per_point: float | None = Field(
        description="Mean scoring time per point (its detector, threshold and alerts), "
        "milliseconds", examples=[0.09])
    precision: float | None = Field(
        None, description="Of its flagged points in labelled ranges, the share labelled "
        "anomalous (null: no labels, or none flagged)", examples=[0.5])
    recall: float | None = Field(None, description="Of the points labelled anomalous, the "
                                 "share it flagged (null: none labelled)", examples=[0.25])
    true_positives: int = Field(0, description="Flagged points labelled anomalous",
                                examples=[2])
    false_positives: int = Field(0, description="Flagged points labelled normal",
                                 examples=[2])
    false_negatives: int = Field(0, description="Points labelled anomalous it did not flag",
                                 examples=[6])
    nab_score: float | None = Field(
        None, description="NAB-style early detection on the labelled ranges (standard "
        "profile): 0 never fires, 100 each incident caught at its first point with no "
        "normal point flagged (null: no incident labelled)", examples=[61.2])


class IncidentSide(BaseModel):
    detected_at: float | None = Field(description="Stream time of its first flagged point "
                                      "in the range (null: missed)", examples=[1414890000.0])
    time_to_detect_seconds: float | None = Field(
        description="From the range's start to that point", examples=[1800.0])
    nab_reward: float = Field(description="NAB's reward for the earliest detection: 1 at "
                              "the range's first point, less further in, -1 missed",
                              examples=[0.93])
    alert: str | None = Field(description="Its first alert overlapping the range",
                              examples=["al_4b1deffe08c3cd9c0e68"])


class Incident(BaseModel):
    start: float = Field(description="Labelled range start (epoch seconds)",
                         examples=[1414850000.0])
    end: float = Field(description="Labelled range end", examples=[1414930000.0])
    label: str = Field(description="anomaly or missed_anomaly", examples=["anomaly"])
    live: IncidentSide
    shadow: IncidentSide


class ShadowReport(BaseModel):
    stream: str = Field(description="Stream id", examples=["nyc_taxi"])
    config: ShadowOut = Field(description="The shadow: its detector and progress")
    since: float | None = Field(description="Stamp of the first compared point in the log "
                                "(the log keeps TSAD_SHADOW_LOG_POINTS)",
                                examples=[1404165600.0])
    until: float | None = Field(description="Stamp of the last compared point",
                                examples=[1422237600.0])
    points: int = Field(description="Points both saw since the shadow started",
                        examples=[10320])
    logged_points: int = Field(description="Of which still in the comparison log",
                               examples=[10320])
    agreement: float | None = Field(
        description="Jaccard index of the two sides' alerted time since the shadow started "
        "(null: neither alerted)", examples=[0.42])
    score_rank_correlation: float | None = Field(
        description="Spearman's rank correlation of their scores over the logged points "
        "both scored", examples=[0.61])
    labelled_ranges: int = Field(description="Feedback ranges of the stream (POST "
                                 "/streams/{id}/feedback) the log covers", examples=[5])
    live: SideReport = Field(description="The live detector over the compared points")
    shadow: SideReport = Field(description="The shadow over the same points")
    incidents: list[Incident] = Field(description="Each range labelled anomalous, per side")


class ScoresOut(BaseModel):
    stream: str = Field(description="Stream id", examples=["nyc_taxi"])
    shadow: str = Field(description="Shadow name", examples=["candidate"])
    timestamps: list[float] = Field(description="Epoch seconds, oldest first",
                                    examples=[[1700000000.0, 1700000060.0]])
    live_scores: list[float | None] = Field(description="null: not scored",
                                            examples=[[1.0, 1.2]])
    shadow_scores: list[float | None] = Field(description="null: not scored",
                                              examples=[[0.31, 0.35]])
    live_anomalies: list[bool] = Field(examples=[[False, True]])
    shadow_anomalies: list[bool] = Field(examples=[[False, False]])
    live_alerted: list[bool] = Field(description="Under an open alert",
                                     examples=[[False, True]])
    shadow_alerted: list[bool] = Field(examples=[[False, False]])


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    demote_as: str | None = Field(
        "previous", pattern=NAME_PATTERN, description="The name the live detector goes on "
        "under, as a shadow (so promoting it back is one call too); null: drop it",
        examples=["previous"])


class PromotedOut(BaseModel):
    stream: StreamOut = Field(description="The stream, now bound to the promoted detector")
    demoted: ShadowOut | None = Field(description="The former live detector, now a shadow")
    open_alert: str | None = Field(description="The stream's open alert after the switch: "
                                   "the live one goes on (same id, no event), or the "
                                   "shadow's, opened to webhooks now", examples=[None])
    events: list[str] = Field(description="Ids of the alert events the switch emitted",
                              examples=[[]])
