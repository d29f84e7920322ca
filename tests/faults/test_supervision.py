"""Supervision and the edges of trust: a worker whose server was killed, a token taken out of
the tokens file while the server runs, and who can read the metrics port.

Each case checks that nothing was lost and that no job ran to completion twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import time
import urllib.request

import grpc
import pytest

from stepstream.client import TrainingClient
from stepstream.kernel.events import StepEvent
from stepstream.v1 import trainer_pb2 as pb
from tests.conftest import alive
from tests.faults.conftest import assert_intact
from tests.faults.test_trust import bearer, failure, outside_address, serving, stub_of
from tests.integration.conftest import ServiceProcess
from tests.integration.test_service import classes, wait_for_step

Code = grpc.StatusCode


def gone_within(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def wait_for(what: str, check, timeout: float = 30, every: float = 0.05):
    end = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < end, f"never: {what}"
        time.sleep(every)
    return found


# ---------------------------------------------------------------- 3. workers outlive their server


def test_a_killed_servers_worker_ends_and_a_held_slot_gets_no_second_worker(
    start_service, tmp_path
):
    import fcntl

    data = tmp_path / "data"
    spec = classes(1500, "outlived", checkpoint_every=100)
    started: list[int] = []  # every worker seen, killed at the end whatever happened
    try:
        # The slot is held (as by a worker whose server died): the new worker must wait.
        lock = data / "locks" / "cpu0.lock"
        lock.parent.mkdir(parents=True)
        holder = lock.open("a+")
        fcntl.flock(holder, fcntl.LOCK_EX)
        lock.write_text(f"{os.getpid()}\n")
        first = start_service(data, workers=1, lease_seconds=2)
        log = first.log_path
        with TrainingClient(first.address) as c:
            job = c.submit(spec, max_attempts=5)
            wait_for(
                "the worker says the slot is held",
                lambda: f"held by pid {os.getpid()}" in log.read_text(errors="replace"),
            )
            time.sleep(1.0)
            assert job.info().state == "QUEUED", "a worker ran beside the slot's holder"
            holder.close()
            wait_for_step(job, 300)
        (orphan,) = first.worker_pids()
        started.append(orphan)

        first.proc.kill()  # kill -9: no chance to stop its worker
        killed = time.monotonic()
        first.proc.wait()
        second = start_service(data, workers=1, lease_seconds=2)  # at once, on the same slot
        started += second.wait_for_workers(1)
        assert gone_within(orphan, 10), "the worker outlived its killed server by 10 s"
        print(f"orphan gone {time.monotonic() - killed:.1f} s after the kill")
        with TrainingClient(second.address) as c:
            job = c.job(job.name)
            info = job.wait(timeout=120)
            events = list(job.stream())
        states = assert_intact(events, steps=1500, final="SUCCEEDED")
        assert states == ["QUEUED", "RUNNING", "QUEUED", "RUNNING", "SUCCEEDED"]
        assert info.attempts == 2
        # The new worker took the slot only once the orphan had let go of it.
        text = log.read_text(errors="replace")
        host = os.uname().nodename
        orphan_id, new_id = (f"{host}-{s.proc.pid}-cpu0" for s in (first, second))
        taken = re.search(rf"worker {re.escape(new_id)}: slot lock \S+ taken", text)
        assert taken, "the new worker never took its slot"
        assert text.find(f"worker {orphan_id}: stopped") in range(taken.start())
    finally:
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- 5. revoked tokens


def test_a_token_taken_out_of_the_file_is_refused_within_seconds(request, tmp_path_factory, tokens):
    from stepstream_service.api.auth import digest

    folder = tmp_path_factory.mktemp("revoke")
    file = folder / "tokens"
    both = f"team-a {digest(tokens.alice)}\nteam-b {digest(tokens.bob)}\n"

    def rewrite(text: str) -> None:
        # As an operator (or Kubernetes) would: a new file moved into place.
        (folder / "tokens.new").write_text(text)
        (folder / "tokens.new").replace(file)

    rewrite(both)
    with serving(request, tmp_path_factory, "sqlite", tokens_file=file) as svc:
        channel, stub = stub_of(svc)
        request.addfinalizer(channel.close)
        alice, bob = bearer(tokens.alice), bearer(tokens.bob)

        def listing(md) -> grpc.StatusCode:
            try:
                stub.ListJobs(pb.ListJobsRequest(), metadata=md, timeout=10)
                return Code.OK
            except grpc.RpcError as exc:
                return exc.code()

        create = pb.CreateJobRequest(spec_json=json.dumps(classes(20, "kept")))
        job = stub.CreateJob(create, metadata=alice, timeout=10)
        assert listing(alice) == listing(bob) == Code.OK

        rewrite(f"team-b {digest(tokens.bob)}\n")
        revoked = time.monotonic()
        wait_for("alice refused", lambda: listing(alice) == Code.UNAUTHENTICATED, timeout=10)
        took = time.monotonic() - revoked
        print(f"revoked token refused {took:.2f} s after the file changed")
        assert took < 5, "the revoked token worked for 5 s more"
        assert listing(bob) == Code.OK

        # A broken file keeps the last good table: nobody let in, nobody locked out.
        rewrite("team-a sha256:not-a-digest\n")
        time.sleep(1.5)
        assert (listing(alice), listing(bob)) == (Code.UNAUTHENTICATED, Code.OK)
        assert "cannot be used" in svc.log_path.read_text()

        # Two authorization headers: which one counts is not for the server to guess.
        for twice in (bob + bob, bob + alice, alice + bob):
            err = failure(lambda md=twice: stub.ListJobs(pb.ListJobsRequest(), metadata=md))
            assert err.code() == Code.UNAUTHENTICATED, err.details()
            assert "authorization headers" in err.details()

        # Alice is back: her job was kept all along.
        rewrite(both)
        wait_for("alice back", lambda: listing(alice) == Code.OK, timeout=10)
        stub.CancelJob(pb.CancelJobRequest(name=job.name), metadata=alice, timeout=10)
        with TrainingClient(svc.address, token=tokens.alice) as c:
            assert_intact(list(c.job(job.name).stream()), final="CANCELLED")


# ---------------------------------------------------------------- 6. the metrics port


def test_the_metrics_port_is_loopback_tls_and_can_leave_job_names_out(tmp_path, certs, tokens):
    from stepstream.kernel.states import JobState
    from stepstream_service.store import NewEvent, Store

    url = f"sqlite:///{tmp_path / 'trainer.db'}"
    svc = ServiceProcess(
        tmp_path / "data",
        "--host",
        "0.0.0.0",
        workers=0,
        store=url,
        tokens_file=tokens.file,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        metrics_job_names="false",
    )
    try:
        assert svc.host == "0.0.0.0", svc.ready
        port = svc.metrics_port
        outside = outside_address()
        if outside is not None:  # gRPC answers there; the metrics port does not listen there
            with pytest.raises(OSError):
                socket.create_connection((outside, port), timeout=5).close()
        # TLS with the server's certificate; plain HTTP gets nothing.
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        context = ssl.create_default_context(cafile=str(certs.ca))

        def scrape() -> str:
            with urllib.request.urlopen(
                f"https://127.0.0.1:{port}/metrics", timeout=5, context=context
            ) as r:
                return r.read().decode()

        assert "trainer_queue_depth" in scrape()
        # A client that connects and never speaks holds no one else up.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            assert "trainer_queue_depth" in scrape()

        secret = "tenant-secret-project-name"
        with TrainingClient(svc.address, token=tokens.alice, ca_cert=certs.ca) as c:
            job = c.submit(classes(5, secret))
            # This test plays the worker, so no framework has to start.
            store = Store(url)
            try:
                claimed = store.claim("fake-worker", 30)
                assert claimed is not None and claimed.id == job.id
                steps = [
                    NewEvent.of(StepEvent(s, 0.5, 0.5, None, 0.01, 100.0, 1600.0, time.time()))
                    for s in range(1, 6)
                ]
                store.append_events(job.id, "fake-worker", steps, {"step": 5, "loss": 0.5})
                series = f'trainer_job_step{{job_id="{job.id}"}} 5.0'

                def with_the_series() -> str:
                    text = scrape()
                    return text if series in text else ""

                text = wait_for("the job's series", with_the_series)
                assert secret not in text
                store.finish(job.id, "fake-worker", JobState.SUCCEEDED, model_path=None)
            finally:
                store.close()
            assert job.wait(timeout=30).state == "SUCCEEDED"
            assert_intact(list(job.stream()), steps=5, final="SUCCEEDED")
        assert secret not in scrape()
    finally:
        svc.stop()
