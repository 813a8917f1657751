from __future__ import annotations

import json
import secrets
import time
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from service.deps import AUTH_RESPONSES, SettingsDep, WebhooksDep, global_admin
from service.errors import Conflict, InvalidInput, NotFound
from service.schemas import ErrorOut
from service.webhooks.destinations import AllowList, DestinationRefused, check_url
from service.webhooks.model import Subscription
from service.webhooks.schemas import (
    DeadLetterList,
    DeadLetterOut,
    WebhookCreated,
    WebhookIn,
    WebhookList,
    WebhookOut,
    WebhookPatch,
)

# webhooks see every tenant's alerts: an admin key without tenant
router = APIRouter(prefix="/webhooks", tags=["webhooks"], responses=AUTH_RESPONSES,
                   dependencies=[Depends(global_admin)])
_ERRORS = {404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 422: {"model": ErrorOut},
           503: {"model": ErrorOut}}


@router.post("", response_model=WebhookCreated, status_code=201, responses=_ERRORS,
             summary="Subscribe a URL to alert events (the secret is shown only here)")
async def create_webhook(body: WebhookIn, store: WebhooksDep, settings: SettingsDep,
                         request: Request) -> WebhookCreated:
    """The URL's host must resolve to public addresses only, unless
    TSAD_WEBHOOK_ALLOW_HOSTS names it (checked again on every delivery). An open service
    on loopback (make serve) also takes loopback receivers from loopback callers."""
    client = request.client.host if request.client else None
    try:
        await check_url(str(body.url), AllowList.for_settings(settings, client))
    except DestinationRefused as exc:
        raise InvalidInput(("body", "url"), str(exc)) from None
    sub = Subscription(id=f"wh_{secrets.token_hex(8)}", url=str(body.url),
                       streams=body.streams, min_severity=body.min_severity,
                       secret=body.secret or f"whsec_{secrets.token_hex(24)}",
                       created_at=time.time(), description=body.description)
    await store.add(sub)
    return WebhookCreated(**sub.public(), secret=sub.secret)


@router.get("", response_model=WebhookList, responses=_ERRORS, summary="List subscriptions")
async def list_webhooks(store: WebhooksDep) -> WebhookList:
    subs = sorted((await store.subscriptions()).values(), key=lambda s: s.created_at)
    return WebhookList(webhooks=[WebhookOut(**s.public()) for s in subs])


@router.get("/dead-letters", response_model=DeadLetterList, responses=_ERRORS,
            summary="Deliveries that failed every attempt, newest first")
async def dead_letters(store: WebhooksDep,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DeadLetterList:
    items = await store.dead_letters(limit)
    return DeadLetterList(dead_letters=[_dead(d) for d in items])


@router.post("/dead-letters/{delivery_id}/replay", status_code=202, responses=_ERRORS,
             summary="Queue a dead letter for delivery again (attempts start over)")
async def replay(delivery_id: str, store: WebhooksDep) -> dict:
    subs = await store.subscriptions()
    dead = await store.dead_letter(delivery_id)
    if dead is None:
        raise NotFound(f"dead letter {delivery_id!r} not found")
    if dead["subscription_id"] not in subs:
        raise Conflict(None, f"subscription {dead['subscription_id']!r} "
                            "was deleted; nothing to deliver to")
    d = await store.replay(delivery_id)
    if d is None:  # replayed by someone else in between
        raise NotFound(f"dead letter {delivery_id!r} not found")
    return {"id": d["id"], "status": "queued"}


@router.get("/{webhook_id}", response_model=WebhookOut, responses=_ERRORS,
            summary="One subscription")
async def get_webhook(webhook_id: str, store: WebhooksDep) -> WebhookOut:
    sub = (await store.subscriptions()).get(webhook_id)
    if sub is None:
        raise NotFound(f"webhook {webhook_id!r} not found")
    return WebhookOut(**sub.public())


@router.patch("/{webhook_id}", response_model=WebhookOut, responses=_ERRORS,
              summary="Change a subscription in place (secret, streams, severity, "
              "description); its pending deliveries stay queued and are signed with the "
              "new secret")
async def update_webhook(webhook_id: str, body: WebhookPatch, store: WebhooksDep) -> WebhookOut:
    sub = (await store.subscriptions()).get(webhook_id)
    if sub is None:
        raise NotFound(f"webhook {webhook_id!r} not found")
    sub = replace(sub, **body.model_dump(exclude_unset=True))
    await store.add(sub)
    return WebhookOut(**sub.public())


@router.delete("/{webhook_id}", status_code=204, responses=_ERRORS,
               summary="Unsubscribe; its pending deliveries become dead letters "
               "(last_error: subscription deleted)")
async def delete_webhook(webhook_id: str, store: WebhooksDep) -> Response:
    if not await store.remove(webhook_id):
        raise NotFound(f"webhook {webhook_id!r} not found")
    return Response(status_code=204)


def _dead(d: dict) -> DeadLetterOut:
    return DeadLetterOut(id=d["id"], event_id=d["event_id"], event_type=d["event_type"],
                         subscription_id=d["subscription_id"], attempts=d["attempts"],
                         last_error=d.get("last_error"), last_status=d.get("last_status"),
                         failed_at=d["failed_at"], event=json.loads(d["body"]))
