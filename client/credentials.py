"""Credentials for ``AsyncClient`` / ``Client`` and the CLI: TLS (and a client certificate for
mTLS) from PEM files, and an API key sent as ``authorization: Bearer <key>``.

>>> creds = tls_credentials()  # the system's root CAs; pass ca= for a private CA
>>> api_key_metadata("bfk_example")
(('authorization', 'Bearer bfk_example'),)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import grpc

from backfill.transport import is_loopback_host

PathLike = str | os.PathLike[str]


def tls_credentials(
    ca: PathLike | None = None, cert: PathLike | None = None, key: PathLike | None = None
) -> grpc.ChannelCredentials:
    """TLS trusting ``ca`` (PEM; the system's root CAs when None), presenting the client
    certificate ``cert`` with its private ``key`` when given (servers started with
    ``--tls-client-ca`` require one)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else Path(ca).read_bytes(),
        private_key=None if key is None else Path(key).read_bytes(),
        certificate_chain=None if cert is None else Path(cert).read_bytes(),
    )


def cli_credentials(tls: bool, ca: PathLike | None, cert: PathLike | None,
                    key: PathLike | None) -> grpc.ChannelCredentials | None:
    """The CLI's ``--tls`` / ``--tls-ca`` / ``--tls-cert`` / ``--tls-key``: None (plaintext)
    unless one of them is given."""
    if not (tls or ca or cert):
        return None
    return tls_credentials(ca, cert, key)


def api_key_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    """The metadata that carries an API key."""
    return (("authorization", f"Bearer {api_key}"),)


def warn_if_plaintext_key(target: str, secure: bool) -> None:
    """An API key sent without TLS to another machine can be read on the way: warn."""
    if secure or is_loopback(target):
        return
    warnings.warn(f"sending an API key to {target} without TLS: anyone on the path can read "
                  "it (pass credentials=tls_credentials(...), CLI --tls)", stacklevel=3)


def is_loopback(target: str) -> bool:
    """Whether a channel target (``host:port``, ``[::1]:port``, ``dns:///host:port``) is
    this machine."""
    host = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:  # host:port (a bare IPv6 address has more colons)
        host = host.split(":", 1)[0]
    return is_loopback_host(host)
