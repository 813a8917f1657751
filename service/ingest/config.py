"""TSAD_INGEST_CONFIG: the YAML file of grouping rules and watches, validated at start-up
(an error names the entry and stops the service, like a bad setting)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.ingest.mapping import GroupRule
from service.ingest.watch import NamedWatch, WatchIn


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[GroupRule] = Field(default_factory=list, description="series to "
                                   "multichannel streams, first match wins")
    watches: list[NamedWatch] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> IngestConfig:
        names = [r.name for r in self.rules] + [w.name for w in self.watches]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"rule and watch names must be unique: {dupes} repeat")
        return self

    def watch_specs(self) -> dict[str, WatchIn]:
        return {w.name: WatchIn(**w.model_dump(exclude={"name"})) for w in self.watches}


def load_config(path: Path | None) -> IngestConfig:
    if path is None:
        return IngestConfig()
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        return IngestConfig.model_validate(doc)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise RuntimeError(f"TSAD_INGEST_CONFIG {path}: {exc}") from None
