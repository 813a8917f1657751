"""API keys over HTTP (an admin key without tenant); `tsad keys` does the same on Redis."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from service.auth.keys import new_key
from service.auth.schemas import KeyCreated, KeyIn, KeyList, KeyOut
from service.deps import AUTH_RESPONSES, KeysDep, global_admin
from service.errors import NotFound
from service.schemas import ErrorOut

router = APIRouter(prefix="/keys", tags=["keys"], responses=AUTH_RESPONSES,
                   dependencies=[Depends(global_admin)])
_ERRORS = {404: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}}


@router.post("", response_model=KeyCreated, status_code=201, responses=_ERRORS,
             summary="Create an API key (the key is shown only here)")
async def create_key(body: KeyIn, keys: KeysDep) -> KeyCreated:
    raw, record = new_key(body.name, list(body.scopes), body.tenant)
    await keys.add(record)
    return KeyCreated(**record.public(), key=raw)


@router.get("", response_model=KeyList, responses=_ERRORS,
            summary="List API keys (ids, names, scopes; never the keys)")
async def list_keys(keys: KeysDep) -> KeyList:
    return KeyList(keys=[KeyOut(**k.public()) for k in await keys.list()])


@router.delete("/{key_id}", status_code=204, responses=_ERRORS,
               summary="Revoke an API key (effective at the next request)")
async def revoke_key(key_id: str, keys: KeysDep) -> Response:
    if not await keys.revoke(key_id):
        raise NotFound(f"key {key_id!r} not found")
    return Response(status_code=204)
