"""The server's security at start: the keys file and the certificates read (a server asked
for them does not start without them), the watchers that reload them, and the warning for a
server open to the network without authentication."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from backfill.transport import is_loopback_host
from server.config import ServerConfig
from server.security.auth import Authenticator
from server.security.keys import load_keys
from server.security.tls import ServerTls
from server.security.watch import FileWatcher
from server.tenant_metrics import TenantMetrics

log = logging.getLogger("server")


@dataclass(frozen=True, slots=True)
class Security:
    """Authentication and TLS, and the watchers that reload their files."""

    auth: Authenticator
    tls: ServerTls | None
    watchers: tuple[FileWatcher, ...]


def load_security(config: ServerConfig, tenants: TenantMetrics) -> Security:
    """Reads the keys file and the certificates (ValueError / OSError naming the file when
    one is missing or invalid: a server that was asked for them does not start without)."""
    watchers = []
    ring = None
    if config.auth_enabled:
        path = Path(config.auth_keys)
        ring = load_keys(path)
        tenants.register(ring.tenant_names())
    auth = Authenticator(ring)
    if ring is not None:
        def reload_keys() -> None:
            new = load_keys(path)
            auth.update(new)
            tenants.register(new.tenant_names())

        watchers.append(FileWatcher(f"keys file {path}", [path], reload_keys, config.reload_s))
    files = config.tls_files()
    tls = None if files is None else ServerTls(files)
    if tls is not None:
        watchers.append(FileWatcher("TLS certificate", tls.files.paths, tls.reload,
                                    config.reload_s))
    if not auth.enabled and not is_loopback_host(config.host):
        log.warning("authentication is off and the server listens on %s: anyone who can reach "
                    "it can use it as any tenant; give --auth-keys (and --tls-cert)",
                    config.host)
    return Security(auth, tls, tuple(watchers))


