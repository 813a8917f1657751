"""Promotion: a shadow becomes the stream's live detector (its state, threshold,
likelihood and alert tracker) and the live detector a shadow, in one commit.

Alerts belong to the live role, not to a detector, so they do not restart:

* an alert the live detector has open goes on (same id, no event): the promoted detector
  now updates it, and resolves it once it sees the stream quiet;
* else an alert the shadow has open goes live with its id and opening time, and
  webhooks get its ``alert.opened`` now (reason "promoted"): they never saw it;
* the demoted detector starts its shadow life with no open alert.

Either the whole switch is committed or nothing is (one atomic commit: the binding, the
sections, the alert record and its event), so no event is lost or sent twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.alerts.model import Alert, make_event
from service.scoring import StreamScorer
from service.settings import Settings
from service.shadows.config import REGISTRY, ShadowConfig
from service.shadows.engine import NOT_OWN, Run, ShadowEngine
from service.shadows.log import COMPARED, Columns
from service.stores.base import LEGACY_SECTION


@dataclass
class Switch:
    sections: dict[str, bytes]  # the new live sections and the demoted shadow's
    drop: tuple[str, ...]
    binding: dict  # the stream's new detector binding
    alerts: list[Alert]
    events: list[dict]
    open_alert: str | None
    demoted: ShadowEngine | None


def switch(live: StreamScorer, live_stored: set[str], promoted: ShadowEngine,
           promoted_stored: set[str], demoted: ShadowConfig | None,
           settings: Settings) -> Switch:
    """Both detectors have scored every stored point. ``live_stored``: the names of the
    live sections the store holds, ``promoted_stored``: the promoted shadow's."""
    old, new = live.tracker, promoted.scorer.tracker
    carried, shadows_own = old.open, new.open
    alerts: list[Alert] = []
    events: list[dict] = []
    if carried is None and shadows_own is not None:  # webhooks never saw it: open it now
        shadows_own.version += 1
        events.append(make_event("alert.opened", shadows_own, "promoted"))
        alerts.append(shadows_own)
    new.quiet = new.quiet if shadows_own is not None else old.quiet
    new.open = carried or shadows_own
    new.last_resolved = old.last_resolved  # a reopening reopens what webhooks saw
    old.open, old.last_resolved, old.quiet = None, None, 0
    sections = {k: v for k, v in promoted.scorer.sections().items() if k not in NOT_OWN}
    engine = None
    if demoted is not None:
        engine = ShadowEngine(demoted, live, Run.start(demoted.start), [],
                              Columns.empty(COMPARED), settings)
        sections |= engine.sections()
    keep = set(sections) | set(NOT_OWN) | {LEGACY_SECTION, REGISTRY}
    drop = tuple(sorted((live_stored | promoted_stored) - keep))
    return Switch(sections, drop, promoted.config.binding(), alerts, events,
                  new.open.id if new.open else None, engine)
