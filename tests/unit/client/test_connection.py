"""stepstream.connection: credentials, and the hint added when a server closes a connection
that these credentials set up wrongly (gRPC itself says only "Socket closed")."""

from __future__ import annotations

import grpc
import pytest

from stepstream.client import TrainingClient
from stepstream.connection import CLIENT_CERT_HINT, TLS_HINT, Credentials, HintedRpcError
from tests.unit.client.test_cli import FakeRpcError

CLOSED = (
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
)


@pytest.mark.parametrize(
    ("credentials", "hint"),
    [
        (Credentials(), TLS_HINT),
        (Credentials(token="t"), TLS_HINT),
        (Credentials(tls=True), CLIENT_CERT_HINT),
        (Credentials(ca_cert="ca.crt", client_cert="c.crt", client_key="c.key"), None),
    ],
)
def test_a_closed_connection_hints_at_what_the_credentials_lack(credentials, hint):
    assert credentials.hint(CLOSED) == hint
    assert credentials.hint("Connection refused") is None


def test_a_plaintext_clients_error_carries_the_tls_hint():
    with TrainingClient("127.0.0.1:1") as client:
        closed = client._explain(FakeRpcError(grpc.StatusCode.UNAVAILABLE, CLOSED))
        other = FakeRpcError(grpc.StatusCode.NOT_FOUND, "Socket closed")
        assert client._explain(other) is other
    assert isinstance(closed, HintedRpcError) and isinstance(closed, grpc.RpcError)
    assert closed.code() == grpc.StatusCode.UNAVAILABLE
    assert closed.details() == f"{CLOSED}; {TLS_HINT}"
    assert "--tls" in str(closed) and "tls=True" in str(closed)
    with TrainingClient("127.0.0.1:1", channel=grpc.insecure_channel("127.0.0.1:1")) as given:
        error = FakeRpcError(grpc.StatusCode.UNAVAILABLE, CLOSED)
        assert given._explain(error) is error  # its credentials are not known
