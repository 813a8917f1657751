"""Request and response bodies of /keys."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.auth.keys import TENANT_PATTERN, Scope


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="Who or what uses the key",
                      examples=["ingest from web-01"])
    scopes: list[Scope] = Field(min_length=1, description="ingest: POST /score; read: GET "
                                "streams and alerts; admin: everything (implies the others)",
                                examples=[["ingest", "read"]])
    tenant: str | None = Field(None, pattern=TENANT_PATTERN,
                               description="Only streams whose id starts with '<tenant>.'",
                               examples=["acme"])


class KeyOut(BaseModel):
    id: str = Field(description="Public id: the key's second part", examples=["3f9a1c0b7e2d"])
    name: str = Field(examples=["ingest from web-01"])
    scopes: list[str] = Field(examples=[["ingest", "read"]])
    tenant: str | None = Field(examples=["acme"])
    created_at: float = Field(description="Epoch seconds", examples=[1700000000.0])


class KeyCreated(KeyOut):
    key: str = Field(description="The key; shown only in this response (the service keeps "
                     "its SHA-256 hash)", examples=["tsad_3f9a1c0b7e2d_" + "x" * 43])


class KeyList(BaseModel):
    keys: list[KeyOut]
