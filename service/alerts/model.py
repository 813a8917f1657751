"""An alert and the events its lifecycle emits, as plain JSON-ready data.

Times named ``*_at`` are the stream's own timestamps (epoch seconds of the points), so a
replay of history gives the same alerts (ids are per life of a stream: ``alert_id``);
``created`` on events is the wall clock when the service emitted them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

Severity = Literal["warning", "critical"]
SEVERITIES: tuple[str, ...] = ("warning", "critical")
EVENT_TYPES = ("alert.opened", "alert.updated", "alert.resolved")


def alert_id(stream: str, opened_at: float, incarnation: str = "") -> str:
    """Stable: the same stream life and opening timestamp give the same id on any replica
    (a batch scored again after a crash included). A stream deleted and created again
    (`tsad replay --reset`) is a new life: replaying the same history there gives new
    ids, so the first life's alerts, kept for their retention, are not overwritten.

    >>> alert_id("web-01.cpu", 1700000000.0)
    'al_4b1deffe08c3cd9c0e68'
    >>> alert_id("web-01.cpu", 1700000000.0, "b7c2e3ef") != alert_id("web-01.cpu", 1700000000.0)
    True
    """
    life = f"\0{incarnation}" if incarnation else ""  # "": ids as before incarnations
    digest = hashlib.sha256(f"{stream}\0{opened_at!r}{life}".encode()).hexdigest()
    return f"al_{digest[:20]}"


def incarnation(stream: str, created_at: float) -> str:
    """Tells apart the lives of a stream id: a stream deleted and created again (a replay
    of the same history included) opens alerts with new ids and its events get new ids,
    so receivers that deduplicate on event ids drop none of them.

    >>> incarnation("web-01.cpu", 1700000000.0)
    'b7c2e3ef'
    """
    return hashlib.sha256(f"life\0{stream}\0{created_at!r}".encode()).hexdigest()[:8]


def severity_of(ratio: float, critical_ratio: float) -> Severity:
    """warning above the threshold, critical at ``critical_ratio`` times it or more."""
    return "critical" if ratio >= critical_ratio else "warning"


@dataclass
class Alert:
    id: str
    stream: str
    state: Literal["open", "resolved"]
    severity: Severity
    opened_at: float
    updated_at: float
    last_anomaly_at: float
    peak_score: float
    peak_at: float
    threshold: float  # the threshold in force at the peak
    peak_ratio: float  # peak score / threshold
    resolved_at: float | None = None
    anomalous_points: int = 0
    points: int = 0  # points scored while open
    channels: list[str] = field(default_factory=list)  # every channel that led a point
    reopened: int = 0  # times an incident within the cooldown reopened it
    version: int = 0  # bumped by every event; events are <id>-<version>-<incarnation>
    evidence: dict = field(default_factory=dict)
    incarnation: str = ""  # of the stream that opened it ("" before incarnations existed)

    @property
    def duration_seconds(self) -> float:
        return (self.resolved_at or self.last_anomaly_at) - self.opened_at

    def to_dict(self) -> dict:
        return asdict(self) | {"duration_seconds": self.duration_seconds}

    @classmethod
    def from_dict(cls, d: dict) -> Alert:
        d = {k: v for k, v in d.items() if k != "duration_seconds"}
        return cls(**d)


def make_event(kind: str, alert: Alert, reason: str) -> dict:
    """One webhook event. Its id (alert id, version, stream incarnation) is the
    idempotency key; ``sequence`` (the alert's version: 1 for alert.opened, one more per
    event) orders the events of one alert."""
    suffix = f"-{alert.incarnation}" if alert.incarnation else ""
    return {"id": f"{alert.id}-{alert.version}{suffix}", "type": kind, "reason": reason,
            "sequence": alert.version, "created": time.time(), "alert": alert.to_dict()}
