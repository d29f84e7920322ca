"""How a client reaches the server: plaintext or TLS (with a client certificate for mutual
TLS), and the bearer token that names its tenant. Shared by the sync and asyncio clients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

# Keepalive pings find a dead connection during a long, quiet stream (no steps for minutes).
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


@dataclass(frozen=True)
class Credentials:
    token: str | None = None
    tls: bool = False  # on by itself when any of the files below is given
    ca_cert: str | Path | None = None  # the server's CA; the system's roots when unset
    client_cert: str | Path | None = None  # mutual TLS
    client_key: str | Path | None = None

    @property
    def secure(self) -> bool:
        return self.tls or any((self.ca_cert, self.client_cert, self.client_key))

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(
            read(self.ca_cert), read(self.client_key), read(self.client_cert)
        )

    def channel(self, address: str) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(address, self.channel_credentials(), CHANNEL_OPTIONS)
        return grpc.insecure_channel(address, CHANNEL_OPTIONS)

    def aio_channel(self, address: str) -> grpc.aio.Channel:
        if self.secure:
            return grpc.aio.secure_channel(address, self.channel_credentials(), CHANNEL_OPTIONS)
        return grpc.aio.insecure_channel(address, CHANNEL_OPTIONS)
