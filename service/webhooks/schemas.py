"""Request and response bodies of /webhooks."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

_GLOB = re.compile(r"^[A-Za-z0-9_.:\-*?\[\]!]{1,128}$")


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="http(s) URL that receives POSTed events",
                         examples=["https://hooks.example.com/tsad"])
    streams: str = Field("*", description="Glob over stream ids (* ? [abc] [!abc])",
                         examples=["web-*.cpu"])
    min_severity: Literal["warning", "critical"] = Field(
        "warning", description="Only events of alerts at least this severe",
        examples=["critical"])
    secret: str | None = Field(None, min_length=16, max_length=256,
                               description="HMAC-SHA256 key for X-Tsad-Signature; "
                               "generated (and returned once) when omitted",
                               examples=["whsec_3f1c0b9e5a7d4c2b"])
    description: str | None = Field(None, max_length=256, examples=["on-call pager"])

    @field_validator("url")
    @classmethod
    def _short_url(cls, url: HttpUrl) -> HttpUrl:
        if len(str(url)) > 2048:
            raise ValueError("URL longer than 2048 characters")
        return url

    @field_validator("streams")
    @classmethod
    def _glob(cls, glob: str) -> str:
        return check_glob(glob)


def check_glob(glob: str) -> str:
    if not _GLOB.match(glob):
        raise ValueError("glob: 1-128 of A-Z a-z 0-9 _ . : - and * ? [ ] !")
    depth = 0
    for ch in glob:
        depth += (ch == "[") - (ch == "]")
        if depth not in (0, 1):
            raise ValueError("glob: unbalanced [ ]")
    if depth:
        raise ValueError("glob: unbalanced [ ]")
    return glob


def _no_default(schema: dict) -> None:
    schema.pop("default", None)


class WebhookPatch(BaseModel):
    """Fields to change; the URL is the subscription's identity and does not change."""

    model_config = ConfigDict(extra="forbid")

    # omitted = unchanged; the types say what a value must be, so the published schema
    # offers no null (and no null default) for fields that cannot be cleared
    streams: str = Field(None, description="Glob over stream ids", examples=["web-*.cpu"],
                         json_schema_extra=_no_default)
    min_severity: Literal["warning", "critical"] = Field(None, examples=["critical"],
                                                         json_schema_extra=_no_default)
    secret: str = Field(None, min_length=16, max_length=256,
                        description="New HMAC-SHA256 key; pending deliveries are signed "
                        "with it", examples=["whsec_3f1c0b9e5a7d4c2b"],
                        json_schema_extra=_no_default)
    description: str | None = Field(None, max_length=256, examples=["on-call pager"])

    @field_validator("streams", "min_severity", "secret", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:  # only an explicit null gets here: omitted fields keep theirs
            raise ValueError("may be omitted, not null")
        return value

    @field_validator("streams")
    @classmethod
    def _glob(cls, value: str) -> str:
        return check_glob(value)


class WebhookOut(BaseModel):
    id: str = Field(examples=["wh_5b1f0c2a9e"])
    url: str = Field(examples=["https://hooks.example.com/tsad"])
    streams: str = Field(examples=["web-*.cpu"])
    min_severity: str = Field(examples=["warning"])
    created_at: float = Field(description="Epoch seconds", examples=[1700000000.0])
    description: str | None = Field(None, examples=["on-call pager"])


class WebhookCreated(WebhookOut):
    secret: str = Field(description="The signing secret; shown only in this response",
                        examples=["whsec_3f1c0b9e5a7d4c2b"])


class WebhookList(BaseModel):
    webhooks: list[WebhookOut]


class DeadLetterOut(BaseModel):
    id: str = Field(description="Delivery id (replay with POST .../{id}/replay)",
                    examples=["dl_8c1d2e3f4a5b6c7d8e9f0a1b"])
    event_id: str = Field(description="Idempotency-Key of the event",
                          examples=["al_4b1deffe08c3cd9c0e68-1-b7c2e3ef"])
    event_type: str = Field(examples=["alert.opened"])
    subscription_id: str = Field(examples=["wh_5b1f0c2a9e"])
    attempts: int = Field(examples=[8])
    last_error: str | None = Field(examples=["HTTP 500"])
    last_status: int | None = Field(examples=[500])
    failed_at: float = Field(description="Epoch seconds", examples=[1700000900.0])
    event: dict = Field(description="The event as it was (and will be) delivered")


class DeadLetterList(BaseModel):
    dead_letters: list[DeadLetterOut]
