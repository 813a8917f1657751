"""The feedback API's request and response bodies (POST/GET /streams/{id}/feedback)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import Point, Timestamp

FeedbackLabel = Literal["false_positive", "missed_anomaly", "normal", "anomaly"]
_LABEL_HELP = ("false_positive or normal: the detector should call these points normal; "
               "missed_anomaly or anomaly: it should flag them")


class FeedbackRangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: Timestamp = Field(description="First labelled point's time (inclusive): epoch "
                             "seconds or RFC 3339", examples=[1700000100.0])
    end: Timestamp = Field(description="Last labelled point's time (inclusive), not before "
                           "start", examples=[1700000160.0])
    label: FeedbackLabel = Field(description=_LABEL_HELP, examples=["false_positive"])
    points: list[Point] | None = Field(
        None, min_length=1, description="The range's points and the window - 1 points "
        "before them, when the service no longer holds them (it keeps only the stream's "
        "last `window` points); omitted: the stream's stored window is used",
        examples=[[{"timestamp": 1700000099, "values": [0.4]},
                   {"timestamp": 1700000100, "values": [0.9]}]])


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"ranges": [
            {"start": 1700000100, "end": 1700000160, "label": "false_positive"}],
            "adapt": True}]},
    )

    ranges: list[FeedbackRangeIn] = Field(
        min_length=1, description="Labelled time ranges of the stream; at most "
        "TSAD_FEEDBACK_MAX_RANGES per request")
    adapt: bool = Field(False, description="Then tune this stream's own copy of its SPEAR "
                        "artifact's soft prompts and head on all its stored feedback (409 "
                        "for other detectors); the next scores use them", examples=[True])
    steps: int | None = Field(None, ge=1, description="Optimiser steps of the adaptation "
                              "(default TSAD_FEEDBACK_STEPS, at most "
                              "TSAD_FEEDBACK_MAX_STEPS)", examples=[20])


class FeedbackRangeOut(BaseModel):
    start: float = Field(description="Epoch seconds", examples=[1700000100.0])
    end: float = Field(description="Epoch seconds", examples=[1700000160.0])
    label: FeedbackLabel = Field(description=_LABEL_HELP, examples=["false_positive"])
    received_at: float = Field(description="When the feedback arrived (epoch seconds)",
                               examples=[1700000200.0])
    windows: int = Field(description="Labelled windows kept for this range (each ends at "
                         "a point of the range)", examples=[8])


class AdaptationOut(BaseModel):
    steps: int = Field(description="Optimiser steps run (fewer when the time limit, "
                       "TSAD_FEEDBACK_MAX_SECONDS, came first)", examples=[20])
    seconds: float = Field(description="Wall time of the tuning", examples=[3.2])
    windows: int = Field(description="Windows tuned on: labelled ones plus recent windows "
                         "judged normal", examples=[17])
    positives: int = Field(description="Of which labelled anomalous", examples=[8])
    loss_before: float = Field(description="Class-balanced cross-entropy on those windows "
                               "with the artifact's prompts", examples=[1.9])
    loss_after: float = Field(description="The same with the adapted prompts",
                              examples=[0.3])
    anomalous_probability_before: float | None = Field(
        description="Mean anomaly probability of the windows labelled anomalous, before "
        "(null: none)", examples=[0.12])
    anomalous_probability_after: float | None = Field(
        description="The same after adapting", examples=[0.81])
    normal_probability_before: float | None = Field(
        description="Mean anomaly probability of the windows labelled or judged normal, "
        "before (null: none)", examples=[0.64])
    normal_probability_after: float | None = Field(
        description="The same after adapting", examples=[0.08])
    bytes: int = Field(description="Size of the stream's own prompts and head, stored "
                       "with its state", examples=[32260])
    created_at: float = Field(description="Epoch seconds", examples=[1700000200.0])


class FeedbackOut(BaseModel):
    stream: str = Field(description="Stream id", examples=["web-01.cpu"])
    stored: int = Field(description="Ranges this request stored", examples=[1])
    windows: int = Field(description="Labelled windows this request stored", examples=[8])
    negatives: int = Field(description="Recent windows judged normal, stored as "
                           "negatives with this request", examples=[1])
    ranges: list[FeedbackRangeOut] = Field(
        description="Every range the stream keeps (the last TSAD_FEEDBACK_MAX_RANGES), "
        "oldest first")
    adapted: bool = Field(description="The stream now scores with adapted prompts "
                          "(this request's or an earlier one's)", examples=[True])
    adaptation: AdaptationOut | None = Field(
        None, description="The adaptation in force (null: the artifact's own prompts)")
