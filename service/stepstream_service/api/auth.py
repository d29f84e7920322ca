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
import threading
import time
from pathlib import Path

import grpc

from stepstream_service.errors import TrainerError
from stepstream_service.tenants import tenant_problem

log = logging.getLogger(__name__)


class Unauthenticated(TrainerError):
    reason = "unauthenticated"


class AuthConfigError(TrainerError):
    reason = "auth_config"


def new_token() -> str:
    return "trn_" + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


# How often, at most, a call looks whether the tokens file changed: a revoked token stops
# working within about this long, and the file is not read on every call.
RECHECK_SECONDS = 1.0


class TokenTable:
    """The digests of a tokens file or folder, read again when it changes (a revoked token is
    refused within RECHECK_SECONDS); a change that cannot be read keeps the last good table."""

    def __init__(self, digests: dict[str, str], source: Path | None = None):
        self.digests = digests  # digest -> tenant
        self.source = source
        self._seen = _signature(source) if source is not None else None
        self._refused: object = None  # the signature of a change that failed to load
        self._checked = time.monotonic()
        self._checking = threading.Lock()

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        # Looked at before reading: a change made while it is read is seen at the next check.
        seen = _signature(path)
        table = cls(_read_tokens(path), path)
        table._seen = seen
        return table

    def refresh(self, now: float | None = None) -> None:
        """Read the source again if it changed since it was last read; at most once per
        RECHECK_SECONDS, and by one caller at a time (the others use the table as it is)."""
        now = time.monotonic() if now is None else now
        if self.source is None or now - self._checked < RECHECK_SECONDS:
            return
        if not self._checking.acquire(blocking=False):
            return
        try:
            self._checked = now
            seen = _signature(self.source)
            if seen == self._seen or seen == self._refused:
                return
            try:
                digests = _read_tokens(self.source)
            except (OSError, UnicodeDecodeError, AuthConfigError) as exc:
                # A half-written or broken file must not lock everyone out, nor let anyone in.
                self._refused = seen
                log.error(
                    "tokens: %s changed but cannot be used (%s); the %d tokens read before "
                    "stay in force until it is fixed",
                    self.source,
                    exc,
                    len(self.digests),
                )
                return
            self.digests, self._seen, self._refused = digests, seen, None
            log.info(
                "tokens: %s read again: %d tokens of %d tenants",
                self.source,
                len(digests),
                len(set(digests.values())),
            )
        finally:
            self._checking.release()

    def tenant(self, token: str) -> str | None:
        self.refresh()
        hashed = digest(token)
        found = None
        # Compare against every digest so the time taken says nothing about near misses.
        for known, tenant in self.digests.items():
            if hmac.compare_digest(known, hashed):
                found = tenant
        return found


def _read_tokens(path: Path) -> dict[str, str]:
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
            if problem := tenant_problem(tenant):
                raise AuthConfigError(f"{file}:{n}: {problem}")
            digests[hashed] = tenant
    if not digests:
        raise AuthConfigError(f"{path}: no tokens")
    return digests


def _signature(path: Path) -> object:
    """What changes when the tokens do: each file's identity, size and times, following
    symlinks, so a Kubernetes Secret's swapped `..data` link shows as new files."""

    def stat(p: Path) -> tuple[int, ...]:
        try:
            st = p.stat()
        except OSError:  # a dangling link, or gone since it was listed
            st = p.lstat()
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)

    try:
        if not path.is_dir():
            return stat(path)
        return (stat(path), sorted((p.name, stat(p)) for p in path.iterdir()))
    except OSError as exc:
        return ("unreadable", type(exc).__name__, exc.errno)


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
        headers = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if len(headers) > 1:
            # Proxies and clients disagree on which of several wins; trust none of them.
            raise Unauthenticated(
                f"{len(headers)} authorization headers: send one (authorization: Bearer TOKEN)"
            )
        header = headers[0] if headers else ""
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
