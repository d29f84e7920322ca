"""The fault suite: processes, machines and the database fail, inputs are malformed or hostile,
and each case checks that nothing was lost and that no job ran to completion twice.

Cases run on the embedded SQLite store unless they say otherwise; those whose outcome rests
on the store (leases, transitions, restarts) name PostgreSQL or both, so the suite stays well
inside CI's time while the integration tests cover every RPC on both engines.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from stepstream.kernel.events import Event
from tests.integration.conftest import start_service  # noqa: F401  shared fixture

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


@pytest.fixture
def engine() -> str:
    """The store engine of `start_service`; a test parametrises `engine` to choose another."""
    return "sqlite"


def assert_intact(events: list[Event], *, steps: int | None = None, final: str | None = None):
    """The history of one job is whole: seq 1..n without gap or repeat, exactly one terminal
    state (the last event), at most one SUCCEEDED, and with `steps`, every step 1..steps."""
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "a gap or a repeat"
    states = [e.state for e in events if e.kind == "state"]
    ended = [s for s in states if s in TERMINAL]
    assert len(ended) == 1 and states[-1] == ended[0], f"terminal states: {states}"
    assert events[-1].kind == "state", "events after the terminal state"
    if final is not None:
        assert ended[0] == final, states
    if steps is not None:
        assert {e.step for e in events if e.kind == "step"} == set(range(1, steps + 1))
    return states


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA the server does not trust
    other_cert: Path
    other_key: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    """A CA, a server certificate for 127.0.0.1/localhost, and client certificates: one from
    that CA, one from a stranger's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("certs")
    now = datetime.datetime.now(datetime.timezone.utc)

    def write(name: str, cert, key) -> tuple[Path, Path]:
        c, k = folder / f"{name}.crt", folder / f"{name}.key"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return c, k

    def authority(cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    def leaf(cn: str, ca_cert, ca_key, *, server: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    ca_cert, ca_key = authority("trainer test CA")
    other_cert, other_key = authority("a stranger's CA")
    ca, _ = write("ca", ca_cert, ca_key)
    other_ca, _ = write("other-ca", other_cert, other_key)
    server_cert, server_key = write("server", *leaf("localhost", ca_cert, ca_key, server=True))
    client_cert, client_key = write("client", *leaf("alice", ca_cert, ca_key, server=False))
    stranger_cert, stranger_key = write(
        "stranger", *leaf("mallory", other_cert, other_key, server=False)
    )
    return Certs(
        ca, server_cert, server_key, client_cert, client_key, other_ca, stranger_cert, stranger_key
    )


@dataclass(frozen=True)
class Tokens:
    file: Path
    alice: str  # tenant team-a
    bob: str  # tenant team-b


@pytest.fixture(scope="session")
def tokens(tmp_path_factory) -> Tokens:
    from stepstream_service.api.auth import digest, new_token

    alice, bob = new_token(), new_token()
    file = tmp_path_factory.mktemp("tokens") / "tokens"
    file.write_text(f"# tenants of the fault suite\nteam-a {digest(alice)}\nteam-b {digest(bob)}\n")
    return Tokens(file, alice, bob)


@pytest.fixture
def raw():
    """raw(svc) -> a plain stub on svc (client-side validation bypassed); closed after."""
    from stepstream.v1 import trainer_pb2_grpc

    channels: list[grpc.Channel] = []

    def make(svc) -> trainer_pb2_grpc.TrainerServiceStub:
        channel = grpc.insecure_channel(svc.address)
        channels.append(channel)
        return trainer_pb2_grpc.TrainerServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()


@pytest.fixture(scope="module")
def tls_server(request, tmp_path_factory, certs, tokens):
    """A server with tokens and TLS (no client certificates), on SQLite, for one module."""
    from tests.faults.test_trust import serving

    with serving(
        request,
        tmp_path_factory,
        tokens_file=tokens.file,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
    ) as svc:
        yield svc
