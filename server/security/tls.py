"""TLS for both surfaces from ``--tls-cert`` / ``--tls-key`` (and ``--tls-client-ca`` for
mTLS: clients must present a certificate signed by that CA), reloaded when the files change.

gRPC: ``grpc.dynamic_ssl_server_credentials`` asks ``_fetch`` at every new handshake whether
the certificate changed; a reload leaves the new configuration there for it. HTTP: uvicorn
serves with one ``ssl.SSLContext``; a reload loads the new chain into that context, which
new connections use. Open connections keep the certificate they were made with. Either way
a new certificate is checked (key matches, CA parses) on a scratch context first, so a bad
file never replaces a good one. Adding a CA to the client CA file takes effect on reload;
removing one needs a restart (OpenSSL adds trust anchors but cannot drop them).
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# Where the HTTP surface finds the verified client certificate's names in a request's scope.
TLS_EXTENSION = "tls"
CLIENT_NAMES = "client_cert_names"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path  # PEM certificate chain, the server's certificate first
    key: Path  # PEM private key
    client_ca: Path | None = None  # PEM CA certificates; set: clients must present one (mTLS)

    @property
    def paths(self) -> list[Path]:
        return [self.cert, self.key, *([self.client_ca] if self.client_ca else [])]


@dataclass(frozen=True, slots=True)
class _Pem:
    cert: bytes
    key: bytes
    client_ca: bytes | None


class ServerTls:
    """The server's TLS material for gRPC and HTTP. ``reload`` runs on a worker thread."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._pem = _read_checked(files)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._http: ssl.SSLContext | None = None

    @property
    def mutual(self) -> bool:
        return self.files.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _grpc_config(self._pem), self._fetch, require_client_authentication=self.mutual
        )

    def http_context(self) -> ssl.SSLContext:
        """The HTTP server's context (one, made on first call, updated by reloads)."""
        with self._lock:
            if self._http is None:
                self._http = _server_context(self.files)
            return self._http

    def reload(self) -> None:
        """Reads and checks the files, then hands them to both surfaces (ValueError or
        ssl.SSLError, with nothing changed, if they are not a valid certificate and key)."""
        pem = _read_checked(self.files)
        with self._lock:
            self._pem = pem
            self._pending = _grpc_config(pem)
            if self._http is not None:
                self._http.load_cert_chain(self.files.cert, self.files.key)
                if self.files.client_ca is not None:
                    self._http.load_verify_locations(self.files.client_ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC core, at each handshake: a new configuration once after a reload, else None."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


def _read_checked(files: TlsFiles) -> _Pem:
    _server_context(files)  # raises on a key that does not match, or an unreadable CA
    pem = _Pem(files.cert.read_bytes(), files.key.read_bytes(),
               None if files.client_ca is None else files.client_ca.read_bytes())
    if b"PRIVATE KEY" not in pem.key:
        raise ValueError(f"{files.key}: no PEM private key")
    return pem


def _server_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    if files.client_ca is not None:
        ctx.load_verify_locations(files.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _grpc_config(pem: _Pem) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)],
                                                     root_certificates=pem.client_ca)


# ---- client certificate names ------------------------------------------------------------------


def grpc_client_names(auth_context: dict[str, list[bytes]]) -> list[str]:
    """The names on a gRPC peer's verified certificate: its common name, then its subject
    alternative names (empty without mTLS)."""
    names = [*auth_context.get("x509_common_name", ()),
             *auth_context.get("x509_subject_alternative_name", ())]
    return [n.decode("utf-8", "replace") for n in names]


def certificate_names(cert: dict[str, Any]) -> list[str]:
    """The same from ``ssl.SSLSocket.getpeercert()``: common name, then alternative names."""
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    names += [value for _, value in cert.get("subjectAltName", ())]
    return names


def scope_client_names(scope: Mapping[str, Any]) -> Iterator[str]:
    tls = scope.get("extensions", {}).get(TLS_EXTENSION) or {}
    yield from tls.get(CLIENT_NAMES, ())
