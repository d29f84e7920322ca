"""The clients' shared core (stepstream.protocol) without a server: requests, decoding, retry
decisions, and the programs run against a scripted fake that answers each operation."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from stepstream import protocol
from stepstream.aio import AsyncJob, AsyncTrainingClient
from stepstream.client import Job, TrainingClient
from stepstream.kernel.events import StateEvent, StepEvent
from stepstream.kernel.failures import Failure
from stepstream.kernel.spec import SpecError
from stepstream.kernel.states import JobState
from stepstream.kernel.wire import event_to_proto, failure_to_proto, state_to_proto, timestamp
from stepstream.protocol import (
    END,
    Call,
    Emit,
    JobInfo,
    Next,
    Open,
    Operations,
    RetryPolicy,
    Run,
    Sleep,
    StreamCursor,
)
from stepstream.v1 import trainer_pb2 as pb

SPEC = {
    "name": "tiny",
    "model": "linear",
    "dataset": {"name": "linear"},
    "training": {"steps": 10, "batch_size": 10},
}
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class RpcFailure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class FakeClock:
    """Stands in for the time module: monotonic time moves only when a program sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(protocol, "time", fake)
    return fake


class FakeServer:
    """Answers a program's operations: `handlers[method](request)` gives a reply, or for a
    stream an iterable of replies; either may be an exception, which is raised in its place.
    Every operation is logged; sleeps move the clock."""

    def __init__(self, clock: FakeClock | None = None, **handlers: Callable[[Any], Any]):
        self.clock, self.handlers = clock, handlers
        self.log: list[Any] = []

    def calls(self, method: str) -> list[Any]:
        return [op.request for op in self.log if isinstance(op, Call) and op.method == method]

    def sleeps(self) -> list[float]:
        return [op.seconds for op in self.log if isinstance(op, Sleep)]

    def __call__(self, op: Any) -> Any:
        self.log.append(op)
        if isinstance(op, Sleep):
            if self.clock is not None:
                self.clock.now += op.seconds
            return None
        if isinstance(op, Next):
            reply = next(op.stream, END)
            if isinstance(reply, BaseException):
                raise reply
            return reply
        reply = self.handlers[op.method](op.request)
        if isinstance(reply, BaseException):
            raise reply
        return FakeStream(reply) if isinstance(op, Open) else reply


class FakeStream:
    """A server stream's call: iterated by Next, cancelled when its run closes."""

    def __init__(self, replies: Any):
        self.replies, self.cancelled = iter(replies), False

    def __next__(self) -> Any:
        return next(self.replies)

    def cancel(self) -> None:
        self.cancelled = True


def drive(program: protocol.Program[Any], server: FakeServer) -> tuple[Any, list[Any]]:
    """Run a program as a shell would: its result and what it emitted."""
    run, emitted = Run(program), []
    try:
        for op in run:
            if isinstance(op, Emit):
                emitted.append(op.value)
            else:
                run.settle(server, op)
    finally:
        run.close()
    return run.result, emitted


def job(state: str = "RUNNING", last_seq: int = 0, **fields: Any) -> pb.Job:
    return pb.Job(name="jobs/job-1", state=state_to_proto(state), last_seq=last_seq, **fields)


def step(seq: int) -> pb.JobEvent:
    return event_to_proto(StepEvent(seq, 0.5, 0.9, None, 0.1, 100.0, 1000.0, 0.0, seq=seq))


def change(seq: int, state: str) -> pb.JobEvent:
    return event_to_proto(StateEvent(JobState(state), 1, 0.0, seq=seq))


def batch(*events: pb.JobEvent) -> pb.WatchJobResponse:
    return pb.WatchJobResponse(batch=pb.EventBatch(events=events))


def snapshot(state: str = "RUNNING", last_seq: int = 0) -> pb.WatchJobResponse:
    return pb.WatchJobResponse(snapshot=job(state, last_seq))


# ---------------------------------------------------------------- requests and answers


def test_spec_request_validates_here_and_keeps_a_given_request_id():
    request = protocol.spec_request(SPEC, "req-1", priority=3, max_attempts=2)
    assert request.request_id == "req-1" and request.priority == 3 and request.max_attempts == 2
    assert json.loads(request.spec_json)["name"] == "tiny"
    fresh = {protocol.spec_request(SPEC, None, 0, 0).request_id for _ in range(3)}
    assert len(fresh) == 3
    with pytest.raises(SpecError):
        protocol.spec_request({**SPEC, "model": "no-such-architecture"}, None, 0, 0)


def test_list_filter_and_job_names():
    assert protocol.list_filter() == ""
    text = protocol.list_filter("RUNNING", {"team": "vision", "tier": "a"}, "seed")
    assert text == "state=RUNNING label.team=vision label.tier=a name=seed"
    assert protocol.job_name("job-1") == protocol.job_name("jobs/job-1") == "jobs/job-1"


def test_job_info_decodes_every_field_and_leaves_unset_ones_none():
    message = job(
        "FAILED",
        last_seq=12,
        display_name="tiny",
        step=5,
        total_steps=10,
        loss=0.25,
        accuracy=0.75,
        labels={"team": "vision"},
        test_metrics={"accuracy": 0.7},
        failure=failure_to_proto(Failure("non_finite_loss", "nan", 5)),
        create_time=timestamp(100.5),
        spec_json=json.dumps({"name": "tiny"}),
        worker="host-1-0",
    )
    info = JobInfo.from_proto(message)
    assert info.id == "job-1" and info.state == JobState.FAILED and info.terminal
    assert info.accuracy == 0.75 and info.mae is None and info.last_seq == 12
    assert info.failure == Failure("non_finite_loss", "nan", 5)
    assert info.create_time == 100.5 and info.start_time is None
    assert info.labels == {"team": "vision"} and info.spec == {"name": "tiny"}
    assert JobInfo.from_proto(job()).failure is None and not JobInfo.from_proto(job()).terminal


def test_metrics_and_capabilities_decode():
    metrics = protocol.metrics_from_proto(
        pb.JobMetrics(
            steps=[1, 2],
            loss=[0.5, 0.4],
            accuracy=[0.1, 0.2],
            evals=[pb.EvalEvent(step=2, split="test", values={"accuracy": 0.3})],
            total_points=10,
        )
    )
    assert metrics.steps == [1, 2] and metrics.total_points == 10
    assert metrics.evals[0].values == {"accuracy": 0.3} and metrics.evals[0].split == "test"
    caps = protocol.capabilities_from_proto(
        pb.Capabilities(losses=["mse"], aliases={"loss/mae": "mean_absolute_error"})
    )
    assert caps["losses"] == ["mse"] and caps["layers"] == []
    assert caps["aliases"] == {"loss/mae": "mean_absolute_error"}
    assert set(caps) == {*protocol.CAPABILITY_KINDS, "aliases"}


def test_stream_cursor_moves_to_the_last_event_and_counts_downtime():
    cursor = StreamCursor(5)
    assert cursor.request("jobs/job-1").after_seq == 5
    assert cursor.take(snapshot()) == [] and cursor.seq == 5
    assert [e.seq for e in cursor.take(batch(step(6), step(7)))] == [6, 7]
    assert cursor.request("jobs/job-1").after_seq == 7
    assert cursor.down_for(10.0) == 0.0 and cursor.down_for(12.5) == 2.5
    cursor.take(batch(step(8)))
    assert cursor.down_since is None


# ---------------------------------------------------------------- retry policy decisions


def test_submit_backs_off_doubling_on_transient_codes_only():
    policy = RetryPolicy()
    delays = [policy.submit_delay(UNAVAILABLE, attempt) for attempt in range(4)]
    assert delays == [0.5, 1.0, 2.0, None]
    assert policy.submit_delay(grpc.StatusCode.DEADLINE_EXCEEDED, 0) == 0.5
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, None):
        assert policy.submit_delay(code, 0) is None


def test_stream_and_wait_decisions():
    policy = RetryPolicy()
    assert policy.stream_delay(UNAVAILABLE, 10.0, retry_seconds=60) == 0.5
    assert policy.stream_delay(UNAVAILABLE, 61.0, retry_seconds=60) is None
    assert policy.stream_delay(grpc.StatusCode.NOT_FOUND, 0.0, retry_seconds=60) is None
    assert policy.wait_delay(UNAVAILABLE) == 0.5
    assert policy.wait_delay(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1.0
    assert policy.wait_delay(grpc.StatusCode.PERMISSION_DENIED) is None
    assert protocol.code_of(ValueError()) is None


# ---------------------------------------------------------------- the programs


def test_submit_retries_with_the_same_request_until_it_succeeds():
    replies = iter([RpcFailure(UNAVAILABLE), RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED)])
    server = FakeServer(CreateJob=lambda request: next(replies, pb.Job(name="jobs/job-9")))
    request = protocol.spec_request(SPEC, None, 0, 0)
    name, _ = drive(Operations().submit(request), server)
    assert name == "jobs/job-9" and server.sleeps() == [0.5, 1.0]
    sent = server.calls("CreateJob")
    assert len(sent) == 3 and {r.request_id for r in sent} == {request.request_id}


def test_submit_gives_up_after_its_retries_and_at_once_on_a_bad_request():
    server = FakeServer(CreateJob=lambda request: RpcFailure(UNAVAILABLE))
    with pytest.raises(RpcFailure):
        drive(Operations().submit(pb.CreateJobRequest()), server)
    assert server.sleeps() == [0.5, 1.0, 2.0] and len(server.calls("CreateJob")) == 4
    bad = FakeServer(CreateJob=lambda request: RpcFailure(grpc.StatusCode.INVALID_ARGUMENT))
    with pytest.raises(RpcFailure):
        drive(Operations().submit(pb.CreateJobRequest()), bad)
    assert bad.sleeps() == []


def test_unary_calls_carry_the_client_timeout():
    server = FakeServer(GetJob=lambda request: job(), CancelJob=lambda request: job("CANCELLING"))
    info, _ = drive(Operations(timeout=7.0).get("jobs/job-1"), server)
    assert info.state == "RUNNING" and server.log[0].timeout == 7.0
    info, _ = drive(Operations().cancel("jobs/job-1"), server)
    assert info.state == "CANCELLING"


def test_jobs_follows_pages():
    pages = {
        "": pb.ListJobsResponse(jobs=[job(), job()], next_page_token="p2"),
        "p2": pb.ListJobsResponse(jobs=[job("SUCCEEDED")]),
    }
    server = FakeServer(ListJobs=lambda request: pages[request.page_token])
    _, listed = drive(Operations().jobs("state=RUNNING", page_size=2), server)
    assert [i.state for i in listed] == ["RUNNING", "RUNNING", "SUCCEEDED"]
    assert {r.filter for r in server.calls("ListJobs")} == {"state=RUNNING"}


def test_watch_resumes_from_the_last_seq_after_a_dropped_stream(clock):
    streams = iter(
        [
            [snapshot(), batch(step(4), step(5)), RpcFailure(UNAVAILABLE)],
            [RpcFailure(UNAVAILABLE)],
            [snapshot(), batch(step(6), change(7, "SUCCEEDED"), step(99))],
        ]
    )
    server = FakeServer(clock, WatchJob=lambda request: next(streams))
    _, events = drive(Operations().watch("jobs/job-1", after_seq=3), server)
    assert [e.seq for e in events] == [4, 5, 6, 7]  # nothing after the terminal event
    assert [r.after_seq for r in server.calls("WatchJob")] == [3, 5, 5]
    assert server.sleeps() == [0.5, 0.5]


def test_watch_gives_up_retry_seconds_after_the_last_message(clock):
    server = FakeServer(clock, WatchJob=lambda request: [RpcFailure(UNAVAILABLE)])
    with pytest.raises(RpcFailure):
        drive(Operations().watch("jobs/job-1", retry_seconds=2.0), server)
    assert server.sleeps() == [0.5] * 5  # down 0, 0.5, ... 2.0 s: then 2.5 > 2


def test_wait_rides_the_stream_from_last_seq_and_asks_get_job_twice(clock):
    gets = iter([job("RUNNING", last_seq=40), job("SUCCEEDED", last_seq=43, step=10)])
    stream = [snapshot("RUNNING", 40), batch(step(41), step(42)), batch(change(43, "SUCCEEDED"))]
    server = FakeServer(clock, GetJob=lambda request: next(gets), WatchJob=lambda request: stream)
    info, emitted = drive(Operations().wait("jobs/job-1"), server)
    assert info.state == "SUCCEEDED" and info.step == 10 and emitted == []
    assert len(server.calls("GetJob")) == 2
    (watch,) = server.calls("WatchJob")
    assert watch.after_seq == 40


def test_wait_of_a_finished_job_is_one_get_job():
    server = FakeServer(GetJob=lambda request: job("CANCELLED"))
    info, _ = drive(Operations().wait("jobs/job-1", timeout=5), server)
    assert info.state == "CANCELLED" and [type(op) for op in server.log] == [Call]


def test_wait_outlasts_an_unavailable_server_and_resumes_the_stream(clock):
    gets = iter([RpcFailure(UNAVAILABLE), job(last_seq=2), job("FAILED", last_seq=9)])
    streams = iter([[batch(step(3)), RpcFailure(UNAVAILABLE)], [batch(change(9, "FAILED"))]])
    server = FakeServer(
        clock, GetJob=lambda request: next(gets), WatchJob=lambda request: next(streams)
    )
    info, _ = drive(Operations().wait("jobs/job-1", timeout=60), server)
    assert info.state == "FAILED"
    assert [r.after_seq for r in server.calls("WatchJob")] == [2, 3]
    assert len(server.calls("GetJob")) == 3 and server.sleeps() == [0.5, 0.5]


def test_wait_ends_when_the_snapshot_shows_the_job_ended(clock):
    gets = iter([job(last_seq=2), job("CANCELLED", last_seq=3)])
    server = FakeServer(
        clock,
        GetJob=lambda request: next(gets),
        WatchJob=lambda request: [snapshot("CANCELLED", 3)],
    )
    info, _ = drive(Operations().wait("jobs/job-1"), server)
    assert info.state == "CANCELLED"


def test_wait_polls_get_job_while_the_server_has_no_stream_to_spare(clock):
    gets = iter([job(last_seq=1), job(last_seq=1), job("SUCCEEDED")])
    full = RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED)
    server = FakeServer(clock, GetJob=lambda request: next(gets), WatchJob=lambda request: full)
    info, _ = drive(Operations().wait("jobs/job-1"), server)
    assert info.state == "SUCCEEDED" and server.sleeps() == [1.0, 1.0]
    assert len(server.calls("GetJob")) == 3


def test_wait_times_out_naming_the_job_and_its_last_state(clock):
    def never_ends(request: pb.WatchJobRequest) -> Iterator[Any]:
        yield snapshot("QUEUED")
        yield batch(change(2, "RUNNING"))
        clock.now += 10
        yield RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED)

    server = FakeServer(clock, GetJob=lambda request: job("QUEUED", 1), WatchJob=never_ends)
    with pytest.raises(TimeoutError, match=r"jobs/job-1 still RUNNING after 5 s"):
        drive(Operations().wait("jobs/job-1", timeout=5), server)
    (watch,) = [op for op in server.log if isinstance(op, Open)]
    assert watch.timeout == 5  # the stream's own deadline is the wait's


def test_wait_raises_what_it_cannot_outlast(clock):
    server = FakeServer(clock, GetJob=lambda request: RpcFailure(grpc.StatusCode.NOT_FOUND))
    with pytest.raises(RpcFailure):
        drive(Operations().wait("jobs/job-1", timeout=5), server)


def test_download_writes_the_model_and_leaves_nothing_when_cut_off(tmp_path):
    def chunks(*tail: Any) -> list[Any]:
        return [pb.DataChunk(filename="m.keras", data=b"ab"), pb.DataChunk(data=b"cd"), *tail]

    server = FakeServer(DownloadModel=lambda request: chunks())
    path, _ = drive(Operations().download_model("jobs/job-1", tmp_path), server)
    assert path == tmp_path / "m.keras" and path.read_bytes() == b"abcd"
    cut = FakeServer(DownloadModel=lambda request: chunks(RpcFailure(UNAVAILABLE)))
    with pytest.raises(RpcFailure):
        drive(Operations().download_model("jobs/job-1", tmp_path / "x.keras"), cut)
    empty = FakeServer(DownloadModel=lambda request: [])
    with pytest.raises(RuntimeError, match="empty model"):
        drive(Operations().download_model("jobs/job-1", tmp_path / "y.keras"), empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras"]


def test_upload_sends_the_name_then_the_file_in_chunks(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"0123456789")
    sent: list[pb.UploadDatasetRequest] = []

    def upload(requests: Iterator[pb.UploadDatasetRequest]) -> pb.Dataset:
        sent.extend(requests)
        return pb.Dataset(path="uploads/d.npz")

    server = FakeServer(UploadDataset=upload)
    path, _ = drive(Operations().upload_dataset("d", tmp_path / "d.npz", 4), server)
    assert path == "uploads/d.npz" and server.log[0].timeout is None
    assert [r.name for r in sent[:1]] == ["d"] and [r.chunk for r in sent[1:]] == [
        b"0123",
        b"4567",
        b"89",
    ]


def test_closing_a_run_stops_the_program_and_cancels_its_streams():
    cancelled: list[bool] = []

    class Stream:
        def cancel(self) -> None:
            cancelled.append(True)

    run = Run(Operations().watch("jobs/job-1"))
    assert isinstance(next(run), Open)
    run.reply(Stream())
    assert isinstance(next(run), Next)
    run.close()
    assert cancelled == [True]
    with pytest.raises(StopIteration):
        next(run)


# ---------------------------------------------------------------- the two shells


def public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def parameters(function: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize(
    "sync, aio", [(TrainingClient, AsyncTrainingClient), (Job, AsyncJob)], ids=["client", "job"]
)
def test_the_async_client_has_every_method_of_the_sync_one(sync, aio):
    assert public(sync) <= public(aio)
    for name in [*sorted(public(sync)), "__init__"]:
        ours, theirs = inspect.getattr_static(sync, name), inspect.getattr_static(aio, name)
        if isinstance(ours, property):
            assert isinstance(theirs, property), name
        else:
            assert parameters(ours) == parameters(theirs), name
    if hasattr(sync, "__enter__"):
        assert hasattr(aio, "__aenter__") and hasattr(aio, "__aexit__")


def test_the_async_methods_give_awaitables_and_async_iterators():
    async def scenario() -> None:
        async with AsyncTrainingClient("127.0.0.1:1", timeout=0.01) as client:
            handle = client.job("job-1")
            assert repr(handle) == "AsyncJob('jobs/job-1')"
            assert hasattr(handle.stream(), "__anext__") and hasattr(client.jobs(), "__anext__")
            for pending in (handle.info(), handle.state, client.capabilities()):
                assert inspect.isawaitable(pending)
                with pytest.raises(grpc.RpcError):
                    await pending

    asyncio.run(scenario())


def _tar(entries: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_sent_tar_is_unpacked_into_a_folder_and_a_busy_folder_gets_a_new_one(tmp_path):
    sent = _tar({"saved_model.pb": b"graph", "variables/variables.index": b"index"})
    fresh = protocol.Unpacked(tmp_path / "serving" / "1")
    fresh.write("seed.saved_model.tar", sent[:100])
    fresh.write("seed.saved_model.tar", sent[100:])
    assert fresh.keep("job") == tmp_path / "serving" / "1"
    assert (tmp_path / "serving" / "1" / "variables" / "variables.index").read_bytes() == b"index"
    assert sorted(p.name for p in (tmp_path / "serving").iterdir()) == ["1"]  # nothing left
    busy = protocol.Unpacked(tmp_path / "serving")
    busy.write("seed.saved_model.tar", sent)
    assert busy.keep("job") == tmp_path / "serving" / "seed.saved_model"


def test_a_tar_reaching_outside_its_folder_is_refused(tmp_path):
    out = protocol.Unpacked(tmp_path / "runs")
    out.write("x.tensorboard.tar", _tar({"../escaped": b"x"}))
    with pytest.raises(RuntimeError, match="unsafe entry"):
        out.keep("job")
    out.discard()
    assert list(tmp_path.iterdir()) == []
