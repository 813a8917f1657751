"""`tsad keys create|list|revoke`: API keys, written straight into the service's Redis.

Keys live where the service reads them (REDIS_URL, TSAD_REDIS_PREFIX), so a key created
here works at once on every replica. Without Redis the service keeps keys in its process:
then use TSAD_ADMIN_KEY and POST /keys instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    create = verbs.add_parser("create", help="create a key; prints it once, on stdout")
    create.add_argument("--name", required=True, help="who or what uses the key")
    create.add_argument("--scope", dest="scopes", action="append",
                        choices=["ingest", "read", "admin"], required=True,
                        help="repeat for several; admin implies the others")
    create.add_argument("--tenant", help="only streams whose id starts with '<tenant>.'")
    verbs.add_parser("list", help="list keys (ids, names, scopes, tenants; never the keys)")
    revoke = verbs.add_parser("revoke", help="revoke a key by id (effective at once)")
    revoke.add_argument("key_id")
    p.set_defaults(func=run)


async def _run(args: argparse.Namespace) -> int:
    from service.auth.keys import new_key
    from service.settings import Settings
    from service.stores import build_backend

    settings = Settings()
    if not settings.redis_url:
        raise SystemExit("tsad keys needs REDIS_URL (the service's Redis): without Redis the "
                         "service keeps keys in memory; use TSAD_ADMIN_KEY and POST /keys")
    backend = build_backend(settings)  # the service's own: the same keys, prefix, cluster
    keys = backend.keys
    try:
        if args.verb == "create":
            try:
                raw, record = new_key(args.name, args.scopes, args.tenant)
            except ValueError as exc:
                raise SystemExit(str(exc)) from None
            await keys.add(record)
            print(f"created key {record.id} ({', '.join(record.scopes)}"
                  f"{f', tenant {record.tenant}' if record.tenant else ''}); it is shown "
                  "only now:", file=sys.stderr)
            print(raw)
        elif args.verb == "list":
            print(f"{'id':<13} {'scopes':<20} {'tenant':<12} {'created (UTC)':<20} name")
            for k in await keys.list():
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.created_at))
                print(f"{k.id:<13} {','.join(k.scopes):<20} {k.tenant or '-':<12} "
                      f"{created:<20} {k.name}")
        elif not await keys.revoke(args.key_id):
            print(f"no key {args.key_id!r}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.key_id}", file=sys.stderr)
    finally:
        await backend.close()
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
