"""Who a request acts for: the one place each surface derives a request's tenant.

Until credentials map to tenants (API keys, client certificates), the tenant is what the
request names: gRPC's ``tenant`` field, HTTP's ``X-Backfill-Tenant`` header (OpenAI's clients
send custom headers with ``default_headers`` / ``extra_headers``). With authentication, these
functions are where the identity replaces the claim.
"""

from __future__ import annotations

from collections.abc import Mapping

from server.api.validation import check_label

TENANT_HEADER = "x-backfill-tenant"


def grpc_tenant(claimed: str, field: str = "tenant") -> str:
    """The tenant of a gRPC request that names ``claimed`` in ``field``."""
    check_label(claimed, field)
    return claimed


def http_tenant(headers: Mapping[str, str]) -> str:
    """The tenant of an HTTP request; "" (the default tenant) when it names none."""
    tenant = headers.get(TENANT_HEADER, "")
    check_label(tenant, f"header {TENANT_HEADER}")
    return tenant
