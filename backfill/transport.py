"""The gRPC message size limit, shared by server and client so their defaults match.

A message is one request or response on the wire; the largest ones are batch-job submissions
(every request of the job in one message). gRPC's own default receive limit is 4 MiB; Backfill
raises it on both sides, and both sides take the same setting (server: ``--max-message-mb``;
SDK: ``max_message_mb=``; CLI: ``--max-message-mb``).

>>> message_options(2)
(('grpc.max_receive_message_length', 2097152), ('grpc.max_send_message_length', 2097152))
"""

from __future__ import annotations

import ipaddress

DEFAULT_MAX_MESSAGE_MB = 64
MAX_MESSAGE_MB_LIMIT = 2047  # gRPC's lengths are signed 32-bit byte counts


def check_max_message_mb(value: int, field: str = "max_message_mb") -> int:
    """The limit in bytes; ValueError naming ``field`` when out of range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be a whole number of MiB, got {value!r}")
    if not 1 <= value <= MAX_MESSAGE_MB_LIMIT:
        raise ValueError(f"{field} must be in [1, {MAX_MESSAGE_MB_LIMIT}] MiB, got {value}")
    return value * 1024 * 1024


def message_options(max_message_mb: int) -> tuple[tuple[str, int], ...]:
    """gRPC channel/server options: send and receive up to ``max_message_mb`` MiB."""
    limit = check_max_message_mb(max_message_mb)
    return (
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    )


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (what only local processes
    reach): ``localhost``, 127.0.0.0/8, ``::1``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
