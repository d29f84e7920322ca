"""Trust: who may see what, how they connect, how much they may ask for, and what hostile or
malformed requests get back.

Each scenario shares one server (module scope) started with `trainer serve`; a scenario runs on
both store engines only where the store decides the outcome (tenancy, request_id races, queue
limits, malformed input that reaches SQL). Every refusal is checked for its exact status code and
for naming the field or limit that refused it.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import ipaddress
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stepstream.client import TrainingClient
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc
from tests.conftest import ENGINES
from tests.faults.conftest import assert_intact
from tests.integration.conftest import ServiceProcess, service_env
from tests.integration.test_service import classes

Code = grpc.StatusCode
MISSING = "jobs/job-" + "0" * 20  # well formed, never created


# ---------------------------------------------------------------- servers


@contextlib.contextmanager
def serving(
    request, tmp_path_factory, engine: str = "sqlite", *flags: str, **settings: object
) -> Iterator[ServiceProcess]:
    """A server on a fresh database of `engine`, stopped (and its database dropped) after."""
    folder = tmp_path_factory.mktemp(f"trust-{engine}")
    pg = request.getfixturevalue("postgres") if engine == "postgresql" else None
    url = pg.create() if pg else f"sqlite:///{folder / 'trainer.db'}"
    settings.setdefault("workers", 0)
    svc = ServiceProcess(folder / "data", *flags, store=url, **settings)
    svc.engine = engine
    try:
        yield svc
    finally:
        svc.stop()
        if pg:
            pg.drop(url)


@pytest.fixture(scope="module", params=ENGINES)
def tenancy(request, tmp_path_factory, tokens):
    """Two tenants and a worker: whose jobs are whose, and races on one request_id."""
    with serving(
        request, tmp_path_factory, request.param, workers=1, tokens_file=tokens.file
    ) as svc:
        yield svc


@pytest.fixture(scope="module", params=ENGINES)
def limited(request, tmp_path_factory, tokens):
    """No workers, so jobs stay queued; a tenant may have two queued. Fuzzed here too."""
    with serving(
        request,
        tmp_path_factory,
        request.param,
        tokens_file=tokens.file,
        max_queued_per_tenant=2,
        max_steps=1000,
        max_message_bytes=256 * 1024,
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
def guarded(request, tmp_path_factory, tokens):
    """Tokens and tight limits on everything that does not depend on the store."""
    with serving(
        request,
        tmp_path_factory,
        tokens_file=tokens.file,
        max_watchers_per_tenant=2,
        max_steps=1000,
        max_epochs=50,
        max_layers=3,
        max_units=64,
        max_upload_bytes=4096,
        max_message_bytes=256 * 1024,
    ) as svc:
        yield svc


# ---------------------------------------------------------------- helpers


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def stub_of(svc: ServiceProcess) -> tuple[grpc.Channel, trainer_pb2_grpc.TrainerServiceStub]:
    channel = grpc.insecure_channel(svc.address)
    return channel, trainer_pb2_grpc.TrainerServiceStub(channel)


def failure(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def outcome(call: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
    try:
        return Code.OK, call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def spec_json(data: dict) -> str:
    return json.dumps(data)


def every_rpc(stub, name: str, md) -> dict[str, Callable[[], Any]]:
    """Each TrainerService RPC, called on job `name` where it takes one."""

    def upload() -> Iterator[pb.UploadDatasetRequest]:
        yield pb.UploadDatasetRequest(name="probe")
        yield pb.UploadDatasetRequest(chunk=b"0123456789")

    t = 10
    return {
        "CreateJob": lambda: stub.CreateJob(
            pb.CreateJobRequest(spec_json=spec_json(classes(20, "probe"))), metadata=md, timeout=t
        ),
        "GetJob": lambda: stub.GetJob(pb.GetJobRequest(name=name), metadata=md, timeout=t),
        "ListJobs": lambda: stub.ListJobs(pb.ListJobsRequest(), metadata=md, timeout=t),
        "CancelJob": lambda: stub.CancelJob(pb.CancelJobRequest(name=name), metadata=md, timeout=t),
        "WatchJob": lambda: list(
            stub.WatchJob(pb.WatchJobRequest(name=name), metadata=md, timeout=t)
        ),
        "GetJobMetrics": lambda: stub.GetJobMetrics(
            pb.GetJobMetricsRequest(name=name), metadata=md, timeout=t
        ),
        "DownloadModel": lambda: list(
            stub.DownloadModel(pb.DownloadModelRequest(name=name), metadata=md, timeout=t)
        ),
        "UploadDataset": lambda: stub.UploadDataset(upload(), metadata=md, timeout=t),
        "ListCapabilities": lambda: stub.ListCapabilities(
            pb.ListCapabilitiesRequest(), metadata=md, timeout=t
        ),
    }


def job_reads(stub, name: str, md) -> dict[str, Callable[[], Any]]:
    calls = every_rpc(stub, name, md)
    keys = ("GetJob", "WatchJob", "CancelJob", "GetJobMetrics", "DownloadModel")
    return {k: calls[k] for k in keys}


def assert_healthy(svc: ServiceProcess) -> None:
    assert svc.proc.poll() is None, f"the server exited:\n{svc.log_path.read_text()[-3000:]}"
    with grpc.insecure_channel(svc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "stepstream.v1.TrainerService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    found = []
    with contextlib.suppress(OSError):
        found.append(socket.gethostbyname(socket.gethostname()))
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        found += re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outward interface
        found.append(s.getsockname()[0])
    for address in found:
        ip = ipaddress.ip_address(address)
        if not ip.is_loopback and not ip.is_unspecified:
            return address
    return None


def cancel_all(client: TrainingClient) -> None:
    for info in client.jobs(state="QUEUED", page_size=1000):
        with contextlib.suppress(grpc.RpcError):
            client.job(info.name).cancel()


# ---------------------------------------------------------------- 1. tenants


def test_another_tenants_job_is_as_unknown_as_a_missing_one(tenancy, tokens, raw, tmp_path):
    stub = raw(tenancy)
    with (
        TrainingClient(tenancy.address, token=tokens.alice) as alice,
        TrainingClient(tenancy.address, token=tokens.bob) as bob,
    ):
        spec = classes(20, "shared")
        theirs = bob.submit(spec, request_id="same-request")
        mine = alice.submit(spec, request_id="same-request")
        assert mine.name != theirs.name, "one request_id of two tenants made one job"
        assert bob.submit(spec, request_id="same-request").name == theirs.name
        assert alice.submit(spec, request_id="same-request").name == mine.name

        def probe() -> None:
            as_alice = bearer(tokens.alice)
            missing = job_reads(stub, MISSING, as_alice)
            for rpc, call in job_reads(stub, theirs.name, as_alice).items():
                err = failure(call)
                ref = failure(missing[rpc])
                assert (err.code(), ref.code()) == (Code.NOT_FOUND, Code.NOT_FOUND), rpc
                # The same words as for a job that does not exist, but for the id itself.
                assert err.details().replace(theirs.id, "ID") == ref.details().replace(
                    MISSING.removeprefix("jobs/"), "ID"
                ), rpc

        probe()  # while bob's job is queued or running: alice cannot cancel it either
        events = list(theirs.stream())
        assert_intact(events, steps=20, final="SUCCEEDED")
        assert "CANCELLING" not in [e.state for e in events if e.kind == "state"]
        probe()  # finished, with a model to download: still not found for alice
        assert theirs.download_model(tmp_path / "bob.keras").stat().st_size > 0

        listed = {j.name for j in alice.jobs(page_size=1000)}
        assert mine.name in listed and theirs.name not in listed
        assert {j.name for j in alice.jobs(name="shared")} == {mine.name}
        theirs_listed = {j.name for j in bob.jobs(page_size=1000)}
        assert theirs.name in theirs_listed and mine.name not in theirs_listed
        assert mine.wait(timeout=120).state == "SUCCEEDED"


# ---------------------------------------------------------------- 2. tokens

HEADERS = {
    "no token": None,
    "bearer without a token": "Bearer",
    "bearer and blanks": "Bearer    ",
    "basic scheme": "Basic " + base64.b64encode(b"team-a:secret").decode(),
    "a token without a scheme": "{alice}",
    "another scheme with a good token": "Token {alice}",
    "a good token cut short": "Bearer {alice_cut}",
    "an unknown token": "Bearer trn_" + "x" * 43,
    "the digest instead of the token": "Bearer {alice_digest}",
}


@pytest.mark.parametrize("header", HEADERS.values(), ids=HEADERS.keys())
@pytest.mark.parametrize("name", [MISSING, "jobs/../x"], ids=["well-formed", "malformed"])
def test_every_rpc_needs_a_valid_token(guarded, tokens, raw, header, name):
    from stepstream_service.api.auth import digest

    stub = raw(guarded)
    md = []
    if header is not None:
        value = header.format(
            alice=tokens.alice, alice_cut=tokens.alice[:-1], alice_digest=digest(tokens.alice)
        )
        md = [("authorization", value)]
    wrong = {}
    for rpc, call in every_rpc(stub, name, md).items():
        code, details = outcome(call)
        if code != Code.UNAUTHENTICATED or "token" not in details:
            wrong[rpc] = (code, details)
    assert not wrong, f"not UNAUTHENTICATED: {wrong}"


def test_health_needs_no_token(guarded):
    assert_healthy(guarded)


# ---------------------------------------------------------------- 3. TLS


def test_tls_refuses_plaintext_and_strangers_and_keeps_serving(tls_server, certs, tokens):
    assert tls_server.ready.endswith("; auth tokens, tls on"), tls_server.ready

    def listing(**creds) -> None:
        with TrainingClient(tls_server.address, token=tokens.alice, timeout=10, **creds) as c:
            list(c.jobs())

    listing(ca_cert=certs.ca)
    for _ in range(3):
        assert failure(listing).code() == Code.UNAVAILABLE  # plaintext
    # Not plaintext gRPC either: raw bytes, an HTTP/1 request, a connection closed at once.
    for junk in (os.urandom(512), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b""):
        with socket.create_connection(("127.0.0.1", tls_server.port), timeout=5) as s:
            s.sendall(junk)
    # TLS, but not trusting the server's CA: a stranger's CA, or the system's roots.
    assert failure(lambda: listing(ca_cert=certs.other_ca)).code() == Code.UNAVAILABLE
    assert failure(lambda: listing(tls=True)).code() == Code.UNAVAILABLE
    listing(ca_cert=certs.ca)
    with TrainingClient(tls_server.address, token=tokens.bob, ca_cert=certs.ca) as bob:
        job = bob.submit(classes(20, "over-tls"))
        assert job.cancel().state == "CANCELLED"
    assert tls_server.proc.poll() is None


# ---------------------------------------------------------------- 4. mutual TLS


def test_mutual_tls_needs_a_client_certificate_from_its_ca(request, tmp_path_factory, certs):
    with serving(
        request,
        tmp_path_factory,
        "sqlite",
        "--host",
        "0.0.0.0",
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
    ) as svc:
        # Client certificates are authentication: it listens where asked.
        assert svc.host == "0.0.0.0", svc.ready
        assert svc.ready.endswith("; auth client certificates, tls on"), svc.ready

        def listing(**creds) -> None:
            with TrainingClient(svc.address, timeout=10, ca_cert=certs.ca, **creds) as c:
                list(c.jobs())

        assert failure(listing).code() == Code.UNAVAILABLE  # no client certificate
        stranger = dict(client_cert=certs.other_cert, client_key=certs.other_key)
        assert failure(lambda: listing(**stranger)).code() == Code.UNAVAILABLE
        listing(client_cert=certs.client_cert, client_key=certs.client_key)
        with TrainingClient(
            svc.address,
            ca_cert=certs.ca,
            client_cert=certs.client_cert,
            client_key=certs.client_key,
        ) as c:
            assert c.submit(classes(20, "mtls")).cancel().state == "CANCELLED"
        assert failure(lambda: listing(**stranger)).code() == Code.UNAVAILABLE
        assert svc.proc.poll() is None


# ---------------------------------------------------------------- 5. loopback, or insecure


def test_without_authentication_a_wildcard_host_is_refused(tmp_path):
    """`serve --host 0.0.0.0` with no tokens and no client certificates does not start: in a
    container, quietly listening on loopback instead would look healthy and answer nobody."""
    env = service_env(store=f"sqlite:///{tmp_path / 'trainer.db'}")
    env.pop("TRAINER_INSECURE", None)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "stepstream.cli", "serve", "--host", "0.0.0.0"),
            *("--port", "0", "--metrics-port", "0", "--workers", "0"),
            *("--data-dir", str(tmp_path / "data")),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert done.stdout == "", done.stdout
    said = done.stderr.strip().splitlines()
    assert said[-1] == (
        "trainer serve: refusing to listen on 0.0.0.0 with no authentication: give a tokens "
        "file (TRAINER_TOKENS_FILE, made with `trainer token TENANT`) or client certificates "
        "(TRAINER_TLS_CLIENT_CA), or --insecure / TRAINER_INSECURE=1 to accept anyone who can "
        "reach the port"
    ), done.stderr
    assert not (tmp_path / "data").exists(), "it refused after creating its data folder"


def test_without_authentication_it_listens_on_loopback_by_default(request, tmp_path_factory):
    with serving(request, tmp_path_factory, "sqlite") as svc:
        assert f"grpc 127.0.0.1:{svc.port} " in svc.ready, svc.ready
        assert svc.ready.endswith("; auth none (loopback only), tls off"), svc.ready
        with TrainingClient(svc.address, timeout=10) as c:
            assert list(c.jobs()) == []
        outside = outside_address()
        if outside is None:
            pytest.skip("this machine has no address but loopback")
        assert refused(f"{outside}:{svc.port}").code() == Code.UNAVAILABLE


@pytest.fixture(scope="module")
def insecure_everywhere(request, tmp_path_factory):
    """`serve --host 0.0.0.0 --insecure`: no authentication, on purpose."""
    with serving(request, tmp_path_factory, "sqlite", "--host", "0.0.0.0", "--insecure") as svc:
        yield svc


def refused(address: str) -> grpc.RpcError:
    with TrainingClient(address, timeout=5) as c:
        return failure(lambda: list(c.jobs()))


def test_insecure_listens_where_asked_and_says_so(insecure_everywhere):
    svc = insecure_everywhere
    assert f"grpc 0.0.0.0:{svc.port} " in svc.ready, svc.ready
    assert svc.ready.endswith("; auth none (INSECURE, all interfaces), tls off"), svc.ready
    log = svc.log_path.read_text()
    assert (
        f"INSECURE: listening on 0.0.0.0:{svc.port} with no authentication; anyone who can "
        "reach this port can submit jobs, read every job and download models"
    ) in log, log[-3000:]
    outside = outside_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    with TrainingClient(f"{outside}:{svc.port}", timeout=10) as c:
        assert list(c.jobs()) == []


def test_insecure_from_the_environment_too(request, tmp_path_factory):
    with serving(request, tmp_path_factory, "sqlite", "--host", "0.0.0.0", insecure=1) as svc:
        assert svc.ready.endswith("; auth none (INSECURE, all interfaces), tls off"), svc.ready


def test_insecure_leaves_the_metrics_port_on_loopback(insecure_everywhere):
    svc = insecure_everywhere
    outside = outside_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    assert svc.metrics_host == "127.0.0.1", svc.ready
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{outside}:{svc.metrics_port}/metrics", timeout=5)
    with urllib.request.urlopen(svc.metrics_url, timeout=5) as reply:
        assert reply.status == 200


def test_with_tokens_it_listens_where_asked(request, tmp_path_factory, tokens):
    outside = outside_address()
    with serving(
        request, tmp_path_factory, "sqlite", "--host", "0.0.0.0", tokens_file=tokens.file
    ) as svc:
        assert f"grpc 0.0.0.0:{svc.port} " in svc.ready, svc.ready
        assert svc.ready.endswith("; auth tokens, tls off"), svc.ready
        if outside is None:
            pytest.skip("this machine has no address but loopback")
        with TrainingClient(f"{outside}:{svc.port}", token=tokens.alice, timeout=10) as c:
            assert list(c.jobs()) == []
        assert refused(f"{outside}:{svc.port}").code() == Code.UNAUTHENTICATED


# ---------------------------------------------------------------- 6. limits


def test_queued_jobs_per_tenant_are_limited(limited, tokens):
    with (
        TrainingClient(limited.address, token=tokens.alice) as alice,
        TrainingClient(limited.address, token=tokens.bob) as bob,
    ):
        try:
            first = alice.submit(classes(20, "q1"), request_id="rid-q")
            alice.submit(classes(20, "q2"))
            err = failure(lambda: alice.submit(classes(20, "q3")))
            assert err.code() == Code.RESOURCE_EXHAUSTED
            assert "max_queued_per_tenant" in err.details() and "2" in err.details()
            # A retry of an accepted submit is no new job: the limit does not refuse it.
            assert alice.submit(classes(20, "q1"), request_id="rid-q").name == first.name
            bob.submit(classes(20, "theirs"))  # another tenant's queue is its own
            first.cancel()
            alice.submit(classes(20, "q4"))  # room again
            assert failure(lambda: alice.submit(classes(20, "q5"))).code() == (
                Code.RESOURCE_EXHAUSTED
            )
        finally:
            cancel_all(alice)
            cancel_all(bob)


def test_queued_limit_holds_under_concurrent_submits(request, limited, tokens):
    barrier = threading.Barrier(10)

    def submit(i: int) -> grpc.StatusCode:
        with TrainingClient(limited.address, token=tokens.alice, timeout=30) as c:
            grpc.channel_ready_future(c._channel).result(timeout=10)
            barrier.wait(timeout=30)
            code, _ = outcome(lambda: c.submit(classes(20, f"burst{i}")))
            return code

    with TrainingClient(limited.address, token=tokens.alice) as alice:
        try:
            with ThreadPoolExecutor(10) as pool:
                codes = list(pool.map(submit, range(10)))
            assert codes.count(Code.OK) == 2, codes
            assert codes.count(Code.RESOURCE_EXHAUSTED) == 8, codes
            assert len(list(alice.jobs(state="QUEUED"))) == 2
        finally:
            cancel_all(alice)


def test_concurrent_streams_per_tenant_are_limited(guarded, tokens, raw):
    stub = raw(guarded)
    alice, bob = bearer(tokens.alice), bearer(tokens.bob)
    mine = stub.CreateJob(
        pb.CreateJobRequest(spec_json=spec_json(classes(20, "watched"))), metadata=alice
    )
    theirs = stub.CreateJob(
        pb.CreateJobRequest(spec_json=spec_json(classes(20, "w"))), metadata=bob
    )
    streams = []

    def watch(name: str, md) -> Any:
        stream = stub.WatchJob(pb.WatchJobRequest(name=name), metadata=md, timeout=60)
        streams.append(stream)
        first = next(stream)  # the snapshot: the stream is open and counted
        assert first.WhichOneof("kind") == "snapshot"
        return stream

    try:
        one, _ = watch(mine.name, alice), watch(mine.name, alice)
        err = failure(lambda: watch(mine.name, alice))
        assert err.code() == Code.RESOURCE_EXHAUSTED
        assert "max_watchers_per_tenant" in err.details() and "2" in err.details()
        watch(theirs.name, bob)  # another tenant has streams of its own
        one.cancel()
        end = time.monotonic() + 10
        while True:  # the server notices the closed stream within its next wait (1 s)
            code, details = outcome(lambda: watch(mine.name, alice))
            if code == Code.OK or time.monotonic() > end:
                break
            assert code == Code.RESOURCE_EXHAUSTED, details
            time.sleep(0.2)
        assert code == Code.OK, details
    finally:
        for stream in streams:
            stream.cancel()
        for job, md in ((mine, alice), (theirs, bob)):
            stub.CancelJob(pb.CancelJobRequest(name=job.name), metadata=md)


def without_steps(spec: dict, **training) -> dict:
    spec = copy.deepcopy(spec)
    spec["training"].pop("steps")
    spec["training"].update(training)
    return spec


def with_model(**model) -> dict:
    spec = classes(20, "wide")
    spec["model"] = {"architecture": "mlp", **model}
    return spec


SPEC_LIMITS = {
    "steps": (classes(1001), "training.steps", "max_steps", "1000"),
    "epochs": (without_steps(classes(1), epochs=51), "training.epochs", "max_epochs", "50"),
    "units": (with_model(hidden_units=[8, 65]), "model.hidden_units.1", "max_units", "64"),
    "layers": (with_model(hidden_units=[8, 8, 8, 8]), "model", "max_layers", "3"),
}


@pytest.mark.parametrize("spec, field, limit, value", SPEC_LIMITS.values(), ids=SPEC_LIMITS.keys())
def test_spec_limits_name_the_field_and_the_limit(guarded, tokens, spec, field, limit, value):
    with TrainingClient(guarded.address, token=tokens.alice) as alice:
        err = failure(lambda: alice.submit(spec))  # the client knows no server's limits
    assert err.code() == Code.INVALID_ARGUMENT
    assert f"{field}:" in err.details() and limit in err.details() and value in err.details()


def test_spec_at_the_limits_is_accepted(guarded, tokens):
    spec = with_model(hidden_units=[64, 64, 64])
    spec["training"]["steps"] = 1000
    with TrainingClient(guarded.address, token=tokens.alice) as alice:
        assert alice.submit(spec).cancel().state == "CANCELLED"


def test_uploads_are_limited_and_leave_nothing_behind(guarded, tokens, tmp_path):
    big, small = tmp_path / "big.npz", tmp_path / "small.npz"
    big.write_bytes(os.urandom(4097))
    np.savez(small, x=np.zeros((4, 2), "float32"), y=np.zeros(4, "int64"))  # npz: checked
    folder = guarded.data_dir / "uploads" / "team-b"
    with TrainingClient(guarded.address, token=tokens.bob) as bob:
        err = failure(lambda: bob.upload_dataset("too-big", big, chunk_size=1000))
        assert err.code() == Code.RESOURCE_EXHAUSTED
        assert "max_upload_bytes" in err.details() and "4096" in err.details()
        assert bob.upload_dataset("fits", small) == "uploads/team-b/fits.npz"
    left = sorted(p.name for p in folder.iterdir())
    assert "fits.npz" in left and not [n for n in left if "too-big" in n], left


def test_a_request_over_max_message_bytes_is_refused(guarded, tokens, raw):
    stub = raw(guarded)
    spec = classes(20, "huge")
    spec["labels"] = {"padding": "x" * (300 * 1024)}
    err = failure(
        lambda: stub.CreateJob(
            pb.CreateJobRequest(spec_json=spec_json(spec)),
            metadata=bearer(tokens.alice),
            timeout=10,
        )
    )
    assert err.code() == Code.RESOURCE_EXHAUSTED, err.details()
    assert_healthy(guarded)
    with TrainingClient(guarded.address, token=tokens.alice) as alice:
        assert "huge" not in {j.display_name for j in alice.jobs(page_size=1000)}


def npz_job(path: str) -> dict:
    spec = classes(20, "from-upload")
    spec["dataset"] = {"name": "npz", "path": path}
    return spec


ELSEWHERE = [
    "uploads/team-a/mine.npz",  # another tenant's upload
    "/etc/passwd",
    "uploads/../x",
    "uploads/team-b/../team-a/mine.npz",
    "uploads/team-b/../../etc/passwd",
    "../uploads/team-b/x.npz",
    "uploads/team-b",
    "uploads/team-bx/x.npz",
    "./uploads/team-b/x.npz",
    "uploads/x.npz",
    "jobs/job-1/model.keras",
    "file:///etc/passwd",
]


def test_a_dataset_path_must_be_one_of_the_tenants_uploads(guarded, tokens, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 2), "float32"), y=np.zeros(4, "int64"))
    with (
        TrainingClient(guarded.address, token=tokens.alice) as alice,
        TrainingClient(guarded.address, token=tokens.bob) as bob,
    ):
        assert alice.upload_dataset("mine", data) == "uploads/team-a/mine.npz"
        mine = bob.upload_dataset("x", data)
        wrong = {}
        for path in ELSEWHERE:
            code, details = outcome(lambda path=path: bob.submit(npz_job(path)))
            if code != Code.INVALID_ARGUMENT or "dataset.path" not in details:
                wrong[path] = (code, details)
        assert not wrong, wrong
        assert bob.submit(npz_job(mine)).cancel().state == "CANCELLED"


# ---------------------------------------------------------------- 7. request_id races


def test_one_request_id_from_twenty_clients_at_once_is_one_job(tenancy, tokens, raw):
    request_id = f"race-{uuid.uuid4().hex}"
    barrier = threading.Barrier(20)

    def submit(_: int) -> str:
        with TrainingClient(tenancy.address, token=tokens.alice, timeout=60) as c:
            grpc.channel_ready_future(c._channel).result(timeout=10)
            barrier.wait(timeout=30)
            return c.submit(classes(20, "race"), request_id=request_id).name

    with ThreadPoolExecutor(20) as pool:
        names = list(pool.map(submit, range(20)))
    assert len(set(names)) == 1, set(names)
    listed = raw(tenancy).ListJobs(
        pb.ListJobsRequest(filter="name=race", page_size=1000), metadata=bearer(tokens.alice)
    )
    same = [j for j in listed.jobs if j.request_id == request_id]
    assert [j.name for j in same] == [names[0]]
    with TrainingClient(tenancy.address, token=tokens.alice) as alice:
        job = alice.job(names[0])
        assert_intact(list(job.stream()), steps=20, final="SUCCEEDED")
        info = job.info()
        assert info.state == "SUCCEEDED" and info.attempts == 1


# ---------------------------------------------------------------- 8. malformed input

VALID = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND}
FUZZ = settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
NAMES = st.sampled_from(
    ["mlp", "cnn", "adam", "mse", "npz", "relu", "name", "steps", "layers", "dense", "x", ""]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    TEXT,
    NAMES,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT | NAMES, inner, max_size=4),
    max_leaves=12,
)
SPEC_PATHS = [
    ("name",),
    ("labels",),
    ("metrics",),
    ("loss",),
    ("optimizer",),
    ("optimizer", "learning_rate"),
    ("model",),
    ("model", "architecture"),
    ("model", "hidden_units"),
    ("model", "layers"),
    ("dataset",),
    ("dataset", "name"),
    ("dataset", "path"),
    ("dataset", "num_samples"),
    ("training",),
    ("training", "steps"),
    ("training", "batch_size"),
    ("training", "max_duration"),
    ("runtime", "steps_per_execution"),
    ("unknown",),
]


@st.composite
def specs(draw) -> dict:
    """Random JSON, or a valid spec with a few of its fields replaced by random values."""
    if draw(st.booleans()):
        return draw(st.dictionaries(TEXT | NAMES, JSON, max_size=6))
    spec = classes(20, "fuzzed")
    for _ in range(draw(st.integers(1, 3))):
        *parents, leaf = draw(st.sampled_from(SPEC_PATHS))
        node = spec
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = draw(JSON)
    return spec


INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)


def assert_answer(code: grpc.StatusCode, details: Any, what: str) -> None:
    assert code in VALID, f"{what}: {code} {details}"


@FUZZ
@given(spec=specs(), request_id=TEXT | st.text(max_size=300), priority=INT32, attempts=INT32)
@example(classes(20, "nan") | {"optimizer": {"learning_rate": math.nan}}, "", 0, 0)
@example(classes(20, "inf") | {"training": {"steps": math.inf}}, "", 0, 0)
@example(classes(20, "long-request-id"), "r" * 200, 0, 0)
@example(classes(20, "nul-request-id"), "a\x00b", 0, 0)
@example(classes(10**30), "", 2**31 - 1, -1)
@example({"model": "transformer", "loss": 3, "training": []}, "", 0, 0)
def test_fuzzed_create_job(limited, tokens, raw, spec, request_id, priority, attempts):
    stub = raw(limited)
    md = bearer(tokens.bob)
    request = pb.CreateJobRequest(
        spec_json=spec_json(spec), request_id=request_id, priority=priority, max_attempts=attempts
    )
    code, answer = outcome(lambda: stub.CreateJob(request, metadata=md, timeout=10))
    if code == Code.OK:
        # A repeated request_id may answer with a job an earlier example already cancelled.
        cancelled, _ = outcome(
            lambda: stub.CancelJob(pb.CancelJobRequest(name=answer.name), metadata=md)
        )
        assert cancelled in (Code.OK, Code.FAILED_PRECONDITION)
    elif code == Code.ALREADY_EXISTS:  # an earlier example used this request_id
        assert request_id and "request_id" in answer, answer
    else:
        assert_answer(code, answer, "CreateJob")
        if code == Code.INVALID_ARGUMENT:  # "FIELD: what is wrong", on a line of its own
            assert re.search(r"^ *[^ \n][^\n]*?: \S", answer, re.M), f"names nothing: {answer}"


@pytest.mark.parametrize("metrics", [True, False, 3, 0.5])
def test_metrics_that_are_no_list_are_invalid_argument(guarded, tokens, raw, metrics):
    spec = classes(20, "metrics") | {"metrics": metrics}
    err = failure(
        lambda: raw(guarded).CreateJob(
            pb.CreateJobRequest(spec_json=spec_json(spec)), metadata=bearer(tokens.bob), timeout=10
        )
    )
    assert err.code() == Code.INVALID_ARGUMENT, err.details()
    assert "metrics" in err.details()


JOB_NAMES = st.one_of(
    TEXT,
    TEXT.map(lambda s: "jobs/job-" + s),
    st.sampled_from(
        [
            "",
            "jobs/",
            "jobs/../x",
            "jobs/job-",
            "jobs/job-" + "f" * 41,
            "jobs/job-ABC",
            "jobs/job-0/../../etc",
            "jobs/job-0\x00",
            "jobs/%2e%2e/x",
            "/etc/passwd",
            "job-" + "0" * 20,
            "jobs/job-0 OR 1=1",
        ]
    ),
)


@FUZZ
@given(name=JOB_NAMES, after_seq=INT64, max_points=INT32, upload=TEXT)
@example(name="jobs/../x", after_seq=-1, max_points=-1, upload="../../etc/passwd")
@example(name="jobs/job-0\x00", after_seq=2**63 - 1, max_points=2**31 - 1, upload="a\x00")
def test_fuzzed_job_names(limited, tokens, raw, name, after_seq, max_points, upload):
    stub = raw(limited)
    md = bearer(tokens.bob)
    calls = {
        "GetJob": lambda: stub.GetJob(pb.GetJobRequest(name=name), metadata=md, timeout=10),
        "CancelJob": lambda: stub.CancelJob(pb.CancelJobRequest(name=name), metadata=md),
        "WatchJob": lambda: list(
            stub.WatchJob(
                pb.WatchJobRequest(name=name, after_seq=after_seq), metadata=md, timeout=10
            )
        ),
        "GetJobMetrics": lambda: stub.GetJobMetrics(
            pb.GetJobMetricsRequest(name=name, max_points=max_points), metadata=md, timeout=10
        ),
        "DownloadModel": lambda: list(
            stub.DownloadModel(pb.DownloadModelRequest(name=name), metadata=md, timeout=10)
        ),
    }
    for rpc, call in calls.items():
        code, answer = outcome(call)
        assert code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT), f"{rpc}: {code} {answer}"

    def parts() -> Iterator[pb.UploadDatasetRequest]:
        yield pb.UploadDatasetRequest(name=upload)
        yield pb.UploadDatasetRequest(chunk=b"x")

    code, answer = outcome(lambda: stub.UploadDataset(parts(), metadata=md, timeout=10))
    assert code in (Code.OK, Code.INVALID_ARGUMENT), f"UploadDataset: {code} {answer}"
    if code == Code.OK:
        assert answer.path == f"uploads/team-b/{upload}.npz"
        where = (limited.data_dir / answer.path).resolve()
        assert where.parent == (limited.data_dir / "uploads" / "team-b").resolve()


def token_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


PAGE_TOKENS = st.one_of(
    TEXT,
    st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.tuples(st.floats() | TEXT, TEXT).map(lambda t: token_of(f"{t[0]!r}|{t[1]}")),
    st.sampled_from(
        [token_of(t) for t in ("nan|job-1", "1e400|x", "1|\x00", "1|2|3", "|", "-inf|job-")]
    ),
)
FILTERS = st.one_of(
    TEXT,
    st.lists(
        st.tuples(st.sampled_from(["state=", "name=", "label.", "label.k=", "x="]), TEXT).map(
            "".join
        ),
        max_size=3,
    ).map(" AND ".join),
)


@FUZZ
@given(filter_=FILTERS, page_size=INT32, page_token=PAGE_TOKENS)
@example(filter_="name=a\x00b", page_size=-1, page_token="")
@example(filter_="", page_size=0, page_token=token_of("1|\x00"))
@example(filter_="state=running label.k=\x00", page_size=1001, page_token="!!!")
def test_fuzzed_listing(limited, tokens, raw, filter_, page_size, page_token):
    stub = raw(limited)
    request = pb.ListJobsRequest(filter=filter_, page_size=page_size, page_token=page_token)
    code, answer = outcome(lambda: stub.ListJobs(request, metadata=bearer(tokens.bob), timeout=10))
    assert code in (Code.OK, Code.INVALID_ARGUMENT), f"ListJobs: {code} {answer}"
    if code == Code.INVALID_ARGUMENT:
        assert re.match(r"(filter|page_size|page_token)\b", answer), answer


@FUZZ
@given(body=st.binary(min_size=1, max_size=200))
@example(body=b"\xff\xff\xff")
def test_fuzzed_raw_bytes(limited, tokens, body):
    with grpc.insecure_channel(limited.address) as channel:
        for method in ("CreateJob", "GetJob", "ListJobs"):
            call = channel.unary_unary(
                f"/stepstream.v1.TrainerService/{method}",
                request_serializer=None,
                response_deserializer=None,
            )
            code, answer = outcome(
                lambda call=call: call(body, metadata=bearer(tokens.bob), timeout=10)
            )
            if code == Code.OK and method == "CreateJob":
                name = pb.Job.FromString(answer).name
                trainer_pb2_grpc.TrainerServiceStub(channel).CancelJob(
                    pb.CancelJobRequest(name=name), metadata=bearer(tokens.bob)
                )
            assert code in VALID, f"{method}({body!r}): {code} {answer}"


def test_the_server_survived_the_fuzzing(limited, tokens):
    assert_healthy(limited)
    with TrainingClient(limited.address, token=tokens.bob) as bob:
        assert bob.submit(classes(20, "after-fuzz")).cancel().state == "CANCELLED"
        assert not list(bob.jobs(state="QUEUED"))
    # Nothing reached the servicer as a bug (an INTERNAL answer is logged as "RPC failed").
    failed = re.findall(
        r"stepstream_service\.api\.servicer: (\w+ failed)", limited.log_path.read_text()
    )
    assert not failed, failed


# ---------------------------------------------------------------- streams and the thread pool


def test_one_tenants_streams_do_not_starve_another(request, tmp_path_factory, tokens):
    with serving(request, tmp_path_factory, "sqlite", tokens_file=tokens.file) as svc:
        channel, stub = stub_of(svc)
        alice, bob = bearer(tokens.alice), bearer(tokens.bob)
        job = stub.CreateJob(
            pb.CreateJobRequest(spec_json=spec_json(classes(20, "w"))), metadata=alice
        )
        theirs = stub.CreateJob(
            pb.CreateJobRequest(spec_json=spec_json(classes(20, "b"))), metadata=bob
        )
        streams = []
        try:
            for _ in range(80):  # well within the default allowance of 200
                streams.append(stub.WatchJob(pb.WatchJobRequest(name=job.name), metadata=alice))
            time.sleep(2)
            code, answer = outcome(
                lambda: stub.GetJob(pb.GetJobRequest(name=theirs.name), metadata=bob, timeout=5)
            )
            assert code == Code.OK, f"bob: {code} {answer}"
        finally:
            for stream in streams:
                stream.cancel()
            channel.close()
