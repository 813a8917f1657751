"""FastAPI dependencies: typed handles on what create_app put in app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from service.metrics import ServiceMetrics
from service.pipeline import ScoringPipeline
from service.schemas import STREAM_ID_PATTERN
from service.settings import Settings


def _pipeline(request: Request) -> ScoringPipeline:
    return request.app.state.pipeline


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


PipelineDep = Annotated[ScoringPipeline, Depends(_pipeline)]
SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]
StreamPath = Annotated[str, Path(pattern=STREAM_ID_PATTERN, description="Stream id",
                                 examples=["web-01.cpu"])]
