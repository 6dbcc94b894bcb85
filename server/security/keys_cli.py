"""``python -m server keys``: manage the keys file of ``--auth-keys``. A running server picks
up every change within ``--reload-s`` seconds; no restart.

    python -m server keys add --file keys.json --tenant team-a     # prints the new key, once
    python -m server keys list --file keys.json
    python -m server keys revoke --file keys.json key-1f2e3d4c
    python -m server keys tenant --file keys.json team-a --weight 2 --max-online-requests 64 \\
        --max-queued-offline 200000 --tokens-per-minute 1000000
    python -m server keys client --file keys.json svc-a.internal --tenant team-a   # mTLS name
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

from server.security.keys import (
    ApiKey,
    KeyRing,
    TenantLimits,
    key_digest,
    load_keys,
    new_key,
    save_keys,
)


def _ring(path: Path) -> KeyRing:
    return load_keys(path) if path.exists() else KeyRing.build({}, (), {})


def _add(args: argparse.Namespace) -> int:
    ring = _ring(args.file)
    text, key_id = new_key()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    key = ApiKey(key_id, args.tenant, key_digest(text), now)
    save_keys(args.file, KeyRing.build(ring.tenants, (*ring.keys, key), ring.clients))
    print(text)
    print(f"{key_id} for tenant {args.tenant!r} added to {args.file}; the key is shown only "
          "now (the file keeps its SHA-256 digest)", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    ring = _ring(args.file)
    for key in ring.keys:
        print(f"{key.id}\ttenant={key.tenant}\tcreated={key.created_at or '-'}")
    for name, tenant in sorted(ring.clients.items()):
        print(f"certificate {name}\ttenant={tenant}")
    for tenant, limits in sorted(ring.tenants.items()):
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(limits).items()
                           if v is not None)
        print(f"tenant {tenant}\t{fields}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    ring = _ring(args.file)
    kept = tuple(k for k in ring.keys if k.id != args.key_id)
    if len(kept) == len(ring.keys):
        print(f"error: no key {args.key_id!r} in {args.file}", file=sys.stderr)
        return 1
    save_keys(args.file, KeyRing.build(ring.tenants, kept, ring.clients))
    return 0


def _tenant(args: argparse.Namespace) -> int:
    ring = _ring(args.file)
    old = ring.tenants.get(args.name, TenantLimits())
    changes = {k: getattr(args, k) for k in ("weight", "max_online_requests",
                                              "max_queued_offline", "tokens_per_minute")
               if getattr(args, k) is not None}
    limits = TenantLimits() if args.unlimited else dataclasses.replace(old, **changes)
    save_keys(args.file, KeyRing.build({**ring.tenants, args.name: limits}, ring.keys,
                                       ring.clients))
    return 0


def _client(args: argparse.Namespace) -> int:
    ring = _ring(args.file)
    clients = dict(ring.clients)
    if args.remove:
        clients.pop(args.name, None)
    elif args.tenant:
        clients[args.name] = args.tenant
    else:
        print("error: give --tenant or --remove", file=sys.stderr)
        return 2
    save_keys(args.file, KeyRing.build(ring.tenants, ring.keys, clients))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server keys",
                                     description="manage the keys file of --auth-keys")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="a new API key for a tenant, printed once")
    add.add_argument("--tenant", required=True)
    add.set_defaults(run=_add)
    sub.add_parser("list", help="keys (ids, not keys), client names and tenants").set_defaults(
        run=_list)
    revoke = sub.add_parser("revoke", help="remove a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=_revoke)
    tenant = sub.add_parser("tenant", help="set a tenant's weight and quotas")
    tenant.add_argument("name")
    tenant.add_argument("--weight", type=float, help="share of the offline tier (default 1)")
    tenant.add_argument("--max-online-requests", type=int)
    tenant.add_argument("--max-queued-offline", type=int)
    tenant.add_argument("--tokens-per-minute", type=int)
    tenant.add_argument("--unlimited", action="store_true", help="remove every limit")
    tenant.set_defaults(run=_tenant)
    client = sub.add_parser("client", help="map a client certificate name (CN or SAN) to a "
                            "tenant (mTLS)")
    client.add_argument("name")
    client.add_argument("--tenant")
    client.add_argument("--remove", action="store_true")
    client.set_defaults(run=_client)
    for p in (add, revoke, tenant, client, *[sub.choices["list"]]):
        p.add_argument("--file", type=Path, required=True, help="the keys file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code
