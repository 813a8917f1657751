"""One settings object, read from the environment (prefix TSAD_) and validated at start-up."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service. ``PORT`` and ``REDIS_URL`` are also read unprefixed."""

    model_config = SettingsConfigDict(env_prefix="TSAD_", extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535, validation_alias=AliasChoices("TSAD_PORT", "PORT"))
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("TSAD_REDIS_URL", "REDIS_URL"),
        description="redis://host:port/db; unset = embedded in-memory store (one process)",
    )
    redis_prefix: str = Field("tsad", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    redis_timeout_seconds: float = Field(2.0, gt=0)
    stream_ttl_seconds: int = Field(0, ge=0, description="expire idle streams; 0 = never")

    default_window: int = Field(64, ge=4, le=4096)
    default_detector: str = "residual_linear"
    max_batch_points: int = Field(10_000, ge=1)
    max_channels: int = Field(1024, ge=1)
    duplicates: Literal["reject", "drop"] = Field(
        "reject",
        description="points at or before a stream's last timestamp: reject the request "
        "(422) or drop exact duplicates (idempotent retries)",
    )
    warmup_points: int = Field(256, ge=8, description="points before an online detector scores")
    threshold_quantile: float = Field(0.995, gt=0.5, lt=1.0)
    threshold_history: int = Field(2000, ge=10)
    threshold_min_scores: int = Field(100, ge=1)
    top_channels: int = Field(3, ge=1, description="channels explained per anomalous point")

    lock_wait_seconds: float = Field(10.0, gt=0)
    retry_after_seconds: int = Field(5, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True

    @field_validator("default_detector")
    @classmethod
    def _known_detector(cls, name: str) -> str:
        from models.detectors import REGISTRY

        if name not in REGISTRY:
            raise ValueError(f"unknown detector {name!r}; known: {sorted(REGISTRY)}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.threshold_min_scores > self.threshold_history:
            raise ValueError("threshold_min_scores must not exceed threshold_history")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
