"""Response bodies of /alerts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class AlertOut(BaseModel):
    id: str = Field(description="Stable id: a hash of the stream, its incarnation and the "
                    "opening timestamp (the same on every replica; new after the stream is "
                    "deleted and created again)",
                    examples=["al_4b1deffe08c3cd9c0e68"])
    stream: str = Field(examples=["web-01.cpu"])
    state: Literal["open", "resolved"] = Field(examples=["open"])
    severity: Literal["warning", "critical"] = Field(
        description="critical once a point scored TSAD_ALERT_CRITICAL_RATIO x its "
        "threshold or more; never goes down", examples=["critical"])
    opened_at: float = Field(description="Stream time (epoch s) of the opening point",
                             examples=[1700000000.0])
    updated_at: float = Field(description="Stream time of the last point seen while open",
                              examples=[1700000300.0])
    last_anomaly_at: float = Field(description="Stream time of the last anomalous point",
                                   examples=[1700000240.0])
    resolved_at: float | None = Field(description="Stream time it resolved; null while open",
                                      examples=[None])
    duration_seconds: float = Field(description="Opening to resolution (or last anomaly)",
                                    examples=[240.0])
    peak_score: float = Field(description="Highest score while open", examples=[14.2])
    peak_at: float = Field(description="Stream time of the peak", examples=[1700000060.0])
    threshold: float = Field(description="Threshold in force at the peak", examples=[5.1])
    peak_ratio: float = Field(description="peak_score / threshold", examples=[2.78])
    anomalous_points: int = Field(description="Anomalous points in the incident",
                                  examples=[7])
    points: int = Field(description="Points scored while open", examples=[19])
    channels: list[str] = Field(description="Every channel that led an anomalous point",
                                examples=[["cpu", "memory"]])
    reopened: int = Field(description="Times an incident within the cooldown reopened it",
                          examples=[0])
    version: int = Field(description="Events emitted so far; event ids are "
                         "<id>-<version>-<incarnation>", examples=[2])
    incarnation: str = Field("", description="Which life of the stream opened it: a stream "
                             "deleted and created again gets a new one, so its alert ids "
                             "and event ids never repeat an earlier life's", examples=["b7c2e3ef"])
    evidence: dict = Field(
        description="At the peak: score, threshold and, per top channel, its share of the "
        "score, window statistics now (variance, trend, autocorr), the stream's recent "
        "normal (EWMA mean and std), the deviation in std units, and the prompt text; for "
        "memory detectors also `precedents`: the nearest normal windows (channel, start, "
        "end, distance)",
        examples=[{"at": 1700000060.0, "score": 14.2, "threshold": 5.1, "channels": [
            {"channel": "cpu", "share": 0.83, "now": {"variance": 4.1, "trend": 0.3,
                                                       "autocorr": 0.2},
             "normal": {"variance": 0.4, "trend": 0.0, "autocorr": 0.8},
             "prompt": "From t1 to t64, the values were ..."}]}])


class AlertList(BaseModel):
    alerts: list[AlertOut] = Field(description="Newest opening first")
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null "
                                    "on the last page", examples=[None])
