"""Who is calling: bearer tokens mapped to tenants, and the server's TLS credentials.

Tokens are never stored, only their SHA-256 digests, in a file of `TENANT sha256:HEX` lines
(`trainer token TENANT` makes one). The file may also be a folder, such as a mounted Kubernetes
Secret, whose every file holds such lines. A tenant sees and controls only its own jobs.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
from pathlib import Path

import grpc

from stepstream_service.errors import TrainerError

log = logging.getLogger(__name__)


class Unauthenticated(TrainerError):
    reason = "unauthenticated"


class AuthConfigError(TrainerError):
    reason = "auth_config"


def new_token() -> str:
    return "trn_" + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    def __init__(self, digests: dict[str, str]):
        self.digests = digests  # digest -> tenant

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        digests: dict[str, str] = {}
        for file in files:
            for n, raw in enumerate(file.read_text().splitlines(), 1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2 or not parts[1].startswith("sha256:") or len(parts[1]) != 71:
                    raise AuthConfigError(
                        f"{file}:{n}: expected 'TENANT sha256:<64 hex digits>' "
                        "(make one with `trainer token TENANT`)"
                    )
                tenant, hashed = parts
                if not tenant.replace("-", "").replace("_", "").isalnum() or len(tenant) > 64:
                    raise AuthConfigError(f"{file}:{n}: tenant {tenant!r}: letters, digits, -, _")
                digests[hashed] = tenant
        if not digests:
            raise AuthConfigError(f"{path}: no tokens")
        return cls(digests)

    def tenant(self, token: str) -> str | None:
        hashed = digest(token)
        found = None
        # Compare against every digest so the time taken says nothing about near misses.
        for known, tenant in self.digests.items():
            if hmac.compare_digest(known, hashed):
                found = tenant
        return found


class Auth:
    """The caller's tenant from its `authorization: Bearer TOKEN` metadata. Without a token
    table every caller is the one anonymous tenant (None: no filtering)."""

    def __init__(self, table: TokenTable | None):
        self.table = table

    @property
    def enabled(self) -> bool:
        return self.table is not None

    def tenant_of(self, context: grpc.ServicerContext) -> str | None:
        if self.table is None:
            return None
        header = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("a bearer token is required (authorization: Bearer TOKEN)")
        tenant = self.table.tenant(token.strip())
        if tenant is None:
            raise Unauthenticated("the token is not valid")
        return tenant


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """TLS when a certificate is given; mutual TLS (client certificates required) with a CA."""
    if cert is None and key is None:
        if client_ca is not None:
            raise AuthConfigError("tls_client_ca needs tls_cert and tls_key as well")
        return None
    if cert is None or key is None:
        raise AuthConfigError("TLS needs both tls_cert and tls_key")
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
