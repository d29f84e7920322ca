"""Hostile requests, round two: every string a tenant sends is bounded, a job is created only
when its answers can be sent, a listing of a tenant's largest jobs keeps the server's memory
bounded, a watch of a finished job ends, and errors echo no unbounded input.

One server (module scope) with tokens and no workers: every job stays queued, which is what a
tenant's largest listing looks like.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from stepstream.cli.errors import STATE_EXIT
from stepstream.v1 import trainer_pb2 as pb
from tests.faults.test_processes import rss_mb
from tests.faults.test_trust import bearer, serving, stub_of
from tests.integration.test_service import classes

Code = grpc.StatusCode
LARGEST_JOBS = 150  # several pages of the largest jobs for every listing


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, tokens):
    with serving(request, tmp_path_factory, "sqlite", tokens_file=tokens.file) as svc:
        yield svc


@pytest.fixture(scope="module")
def small_messages(request, tmp_path_factory, tokens):
    """A server whose message limit is below what the largest allowed spec's answer needs."""
    with serving(
        request, tmp_path_factory, "sqlite", tokens_file=tokens.file, max_message_bytes=32768
    ) as svc:
        yield svc


def create(stub, md, spec: dict, **fields) -> pb.Job:
    return stub.CreateJob(
        pb.CreateJobRequest(spec_json=json.dumps(spec), **fields), metadata=md, timeout=30
    )


def listed(stub, md) -> list[pb.Job]:
    jobs, token = [], ""
    while True:
        page = stub.ListJobs(
            pb.ListJobsRequest(page_size=1000, page_token=token), metadata=md, timeout=60
        )
        jobs += page.jobs
        token = page.next_page_token
        if not token:
            return jobs


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def largest_spec(name: str) -> dict:
    """The largest spec the default limits allow: every label at its longest, every layer."""
    labels = {f"k{i:02d}-" + "k" * 58: "v" * 256 for i in range(64)}
    layers = [{"type": "dense", "units": 4, "activation": "relu"} for _ in range(63)]
    model = {"architecture": "layers", "layers": layers}
    return {**classes(10, name), "labels": labels, "model": model}


# ---------------------------------------------------------------- 1. labels and strings


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        ({"big": "x" * 7 * 1024 * 1024}, "max_spec_bytes"),
        ({"big": "x" * 1024 * 1024}, "max_spec_bytes"),
        ({f"l{i}": "v" for i in range(100_000)}, "max_spec_bytes"),
        ({f"l{i}": "v" for i in range(65)}, "64"),
        ({"long": "x" * 257}, "at most 256 printable characters"),
        ({"nul": "a\x00b"}, "no NUL"),
        ({"a/../b": "v"}, "label key"),
        ({"k" * 64: "v"}, "label key"),
    ],
    ids=["7MB", "1MB", "100k-labels", "65-labels", "long-value", "nul", "key-chars", "key-long"],
)
def test_labels_are_bounded_and_nothing_is_created(server, tokens, raw, labels, says):
    stub, md = raw(server), bearer(tokens.bob)
    before = len(listed(stub, md))
    spec = {**classes(10, "labelled"), "labels": labels}
    error = refusal(lambda: create(stub, md, spec, request_id=f"labels-{len(labels)}"))
    assert error.code() == Code.INVALID_ARGUMENT, error.details()
    assert says in error.details(), error.details()
    assert len(error.details()) < 2000, "the refusal echoes the input"
    # Nothing was created, and every read of the tenant's jobs still works.
    assert len(listed(stub, md)) == before


def test_request_strings_are_bounded(server, tokens, raw):
    stub, md = raw(server), bearer(tokens.bob)
    cases = {
        "request_id": lambda: create(stub, md, classes(5, "r"), request_id="r\nid"),
        "filter": lambda: stub.ListJobs(
            pb.ListJobsRequest(filter="name=" + "x" * 100_000), metadata=md, timeout=30
        ),
        "page_token": lambda: stub.ListJobs(
            pb.ListJobsRequest(page_token="A" * 100_000), metadata=md, timeout=30
        ),
        "dataset.path": lambda: create(
            stub, md, {**classes(5, "p"), "dataset": {"name": "npz", "path": "u/" * 2500}}
        ),
        "name": lambda: create(stub, md, {**classes(5, "n"), "name": "n" * 10_000}),
    }
    for field, call in cases.items():
        error = refusal(call)
        assert error.code() == Code.INVALID_ARGUMENT, (field, error.details())
        assert field in error.details(), (field, error.details())
        assert len(error.details()) < 2000, (field, "the refusal echoes the input")
        assert "/tmp" not in error.details() and str(server.data_dir) not in error.details()


def test_a_job_whose_answer_could_not_be_sent_is_never_created(small_messages, tokens, raw):
    stub, md = raw(small_messages), bearer(tokens.alice)
    spec = largest_spec("too-big-to-answer")
    for _ in range(2):  # a retry must not create it either
        error = refusal(lambda: create(stub, md, spec, request_id="answerable"))
        assert error.code() == Code.INVALID_ARGUMENT, error.details()
        assert "max_message_bytes" in error.details()
    assert listed(stub, md) == []
    small = create(stub, md, classes(5, "small"), request_id="small")
    got = stub.GetJob(pb.GetJobRequest(name=small.name), metadata=md, timeout=30)
    assert got.display_name == "small"


def test_listing_the_largest_jobs_keeps_memory_bounded(server, tokens, raw):
    """30 callers list a tenant's largest allowed jobs at once, several times: every page is
    whole (each job once, across pages), and the server's memory grows by a bounded amount."""
    stub, md = raw(server), bearer(tokens.alice)
    ids = set()
    for i in range(LARGEST_JOBS):
        ids.add(create(stub, md, largest_spec(f"largest-{i}")).name)
    base = rss_mb(server.proc.pid)
    peak = base

    def lister(_: int) -> set[str]:
        return {j.name for j in listed(stub, md)}

    with ThreadPoolExecutor(30) as pool:
        for _ in range(3):
            running = [pool.submit(lister, n) for n in range(30)]
            while not all(f.done() for f in running):
                peak = max(peak, rss_mb(server.proc.pid))
                time.sleep(0.05)
            for f in running:
                assert f.result() >= ids
    grown = peak - base
    print(f"server RSS {base:.0f} MB before, {peak:.0f} MB at peak (+{grown:.0f} MB)")
    assert grown < 400, f"30 listings grew the server by {grown:.0f} MB"
    # No page is over the message limit, and the listing is not one job per page either.
    page = stub.ListJobs(pb.ListJobsRequest(page_size=1000), metadata=md, timeout=60)
    assert 1 < len(page.jobs) < LARGEST_JOBS and page.next_page_token


# ---------------------------------------------------------------- 4. a watch that never ends


@pytest.fixture(scope="module")
def finished(server, tokens) -> pb.Job:
    channel, stub = stub_of(server)
    with channel:
        md = bearer(tokens.alice)
        job = create(stub, md, classes(5, "finished"))
        return stub.CancelJob(pb.CancelJobRequest(name=job.name), metadata=md, timeout=30)


@pytest.mark.parametrize("past", [0, 1, 1000])
def test_a_watch_after_the_last_event_of_a_finished_job_ends(server, tokens, raw, finished, past):
    stub, md = raw(server), bearer(tokens.alice)
    assert finished.state == pb.JOB_STATE_CANCELLED and finished.last_seq > 0
    after = finished.last_seq + past
    replies = list(
        stub.WatchJob(
            pb.WatchJobRequest(name=finished.name, after_seq=after), metadata=md, timeout=15
        )
    )
    assert [r.WhichOneof("kind") for r in replies] == ["snapshot"]


def test_trainer_watch_after_the_last_seq_exits(server, tokens, finished, tmp_path):
    env = {"TRAINER_TOKEN": tokens.alice, "PATH": str(Path(sys.executable).parent)}
    cmd = [sys.executable, "-m", "stepstream.cli", "watch", "--address", server.address]
    done = subprocess.run(
        [*cmd, finished.name, "--after-seq", str(finished.last_seq)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == STATE_EXIT["CANCELLED"], done.stderr


# ---------------------------------------------------------------- 9. what errors echo


def test_errors_echo_no_unbounded_input(server, tokens, raw):
    stub, md = raw(server), bearer(tokens.alice)
    name = "jobs/" + "x" * 100_000
    for call in (
        lambda: stub.GetJob(pb.GetJobRequest(name=name), metadata=md, timeout=30),
        lambda: stub.CancelJob(pb.CancelJobRequest(name=name), metadata=md, timeout=30),
        lambda: list(stub.WatchJob(pb.WatchJobRequest(name=name), metadata=md, timeout=30)),
    ):
        error = refusal(call)
        assert error.code() == Code.INVALID_ARGUMENT
        assert len(error.details()) < 500
        trailing = sum(len(k) + len(v) for k, v in (error.trailing_metadata() or ()))
        assert trailing < 4000, "the error's metadata carries the input"
    # A filter term is not echoed whole either (`trainer show NAME` looks a name up by one).
    term = "name=" + "y" * 60_000 + " x"
    error = refusal(lambda: stub.ListJobs(pb.ListJobsRequest(filter=term), metadata=md, timeout=30))
    assert error.code() == Code.INVALID_ARGUMENT and len(error.details()) < 500
    # Through the command line: a readable error, not a failure to read the answer.
    env = {"TRAINER_TOKEN": tokens.alice, "PATH": str(Path(sys.executable).parent)}
    cmd = [sys.executable, "-m", "stepstream.cli", "show", "--address", server.address]
    done = subprocess.run([*cmd, "z" * 100_000], capture_output=True, text=True, env=env)
    assert done.returncode in (2, 4) and len(done.stderr) < 2000, done.stderr[:300]
    assert "z" * 200 not in done.stderr and "Traceback" not in done.stderr
