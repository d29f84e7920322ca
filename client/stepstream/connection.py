"""How a client reaches the server: plaintext or TLS (with a client certificate for mutual
TLS), and the bearer token that names its tenant. Shared by the sync and asyncio clients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from stepstream.v1 import trainer_pb2_grpc

DEFAULT_ADDRESS = "localhost:50051"

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

    def hint(self, details: str) -> str | None:
        """What these credentials likely lack when the server closed the connection at once
        (gRPC says only "Socket closed"), or None."""
        if "socket closed" not in details.lower():
            return None
        if not self.secure:
            return TLS_HINT
        if not self.client_cert:
            return CLIENT_CERT_HINT
        return None


TLS_HINT = (
    "the server may require TLS: use --tls (and --ca-cert FILE) with `trainer`, or tls=True "
    "(and ca_cert=FILE) with the Python client"
)
CLIENT_CERT_HINT = (
    "the server may require a client certificate: use --client-cert and --client-key with "
    "`trainer`, or client_cert= and client_key= with the Python client"
)


class HintedRpcError(grpc.RpcError):
    """A failed call's error with a hint at its likely cause added to its details; the code,
    metadata and the rest are the call's own."""

    def __init__(self, error: grpc.RpcError, hint: str):
        super().__init__(error)
        self.error, self.hint = error, hint

    def code(self) -> grpc.StatusCode:
        return self.error.code()  # type: ignore[attr-defined]

    def details(self) -> str:
        return f"{self.error.details()}; {self.hint}"  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        if name == "error":  # not set yet (a copy being made): no call to ask
            raise AttributeError(name)
        return getattr(self.error, name)

    def __str__(self) -> str:
        return f"{self.code().name}: {self.details()}"


class Connection:
    """What both clients are built on: the address, the default deadline of a call, the
    channel and its stub, and the metadata every call carries."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = 30.0,
        channel: grpc.Channel | grpc.aio.Channel | None = None,
        token: str | None = None,
        tls: bool = False,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
    ):
        """`timeout` bounds each unary call; `channel` replaces the one the client would open
        (a sync client takes a grpc.Channel, an asyncio one a grpc.aio.Channel). `token` names
        your tenant on a server with authentication; `tls` (or any of the certificate files)
        makes the connection TLS, and a client certificate mutual TLS."""
        self.address, self.timeout = address, timeout
        credentials = Credentials(token, tls, ca_cert, client_cert, client_key)
        # A channel given is the caller's to explain: its credentials are not known here.
        self._credentials = credentials if channel is None else None
        self._channel = channel or self._connect(credentials)
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)
        self._metadata = credentials.metadata()

    def _connect(self, credentials: Credentials) -> Any:
        """A new channel to `self.address`, of the client's kind."""
        raise NotImplementedError

    def _explain(self, error: grpc.RpcError) -> grpc.RpcError:
        """`error`, with a hint when the server closed a connection these credentials made."""
        code = getattr(error, "code", None)
        details = getattr(error, "details", None)
        if self._credentials is None or not callable(code) or not callable(details):
            return error
        if code() != grpc.StatusCode.UNAVAILABLE:
            return error
        hint = self._credentials.hint(details() or "")
        return HintedRpcError(error, hint) if hint else error
