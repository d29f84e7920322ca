"""The service over real gRPC: jobs, streams, cancel, priorities, metrics, errors."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request
from pathlib import Path

import grpc
import keras
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stepstream.client import TrainingClient
from stepstream.kernel.spec import load_spec
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc

from ..conftest import DIVERGING, EXAMPLES

pytestmark = pytest.mark.slow


def classes(steps: int, name: str = "quick", **training) -> dict:
    return {
        "name": name,
        "dataset": {
            "name": "synthetic_classification",
            "num_samples": 256,
            "num_features": 8,
            "num_classes": 3,
        },
        "model": {"architecture": "mlp", "hidden_units": [16]},
        "training": {"steps": steps, "batch_size": 16, **training},
        "runtime": {"steps_per_execution": 10},
    }


def long_job(name: str = "long") -> dict:
    return classes(100000, name, checkpoint_every=50)


def states_of(events) -> list[str]:
    return [e.state for e in events if e.kind == "state"]


def wait_for_step(job, step: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while job.info().step < step:
        assert time.monotonic() < end, f"{job} never reached step {step}"
        time.sleep(0.05)


def test_submit_stream_every_step_then_download_a_model_that_predicts(client, tmp_path):
    job = client.submit(EXAMPLES / "linear_regression.yaml")
    events = list(job.stream())
    steps = [e.step for e in events if e.kind == "step"]
    assert steps == list(range(1, 201))
    assert states_of(events) == ["QUEUED", "RUNNING", "SUCCEEDED"]
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(events) + 1))
    info = job.info()
    assert info.state == "SUCCEEDED" and info.model_available and info.step == 200
    path = job.download_model(tmp_path)
    model = keras.models.load_model(path)
    w, b = model.get_weights()
    assert abs(float(w[0, 0]) - 0.1) < 1e-3 and abs(float(b[0]) - 0.3) < 1e-3
    pred = model.predict(np.array([[0.5]], dtype="float32"), verbose=0)
    assert pred[0, 0] == pytest.approx(0.35, abs=1e-3)


def test_a_late_watcher_gets_the_whole_history(client):
    job = client.submit(classes(60))
    job.wait(timeout=120)
    late = list(job.stream())
    assert [e.step for e in late if e.kind == "step"] == list(range(1, 61))
    assert late[-1].kind == "state" and late[-1].state == "SUCCEEDED"


def test_resuming_after_a_seq_has_no_gaps_or_repeats(client):
    job = client.submit(classes(300, eval_every=100))
    seen = []
    for event in job.stream():
        seen.append(event)
        if event.kind == "step" and event.step == 120:
            break  # drop the stream mid-job
    resumed = list(job.stream(after_seq=seen[-1].seq))
    whole = [e.seq for e in seen + resumed]
    assert whole == list(range(1, len(whole) + 1))
    steps = [e.step for e in seen + resumed if e.kind == "step"]
    assert steps == list(range(1, 301))


def test_resuming_beside_another_watcher_has_no_gaps_or_repeats(client):
    """With a watcher still attached, the server keeps the job's latest events, and a resume
    near the head starts from them rather than from the store."""
    import threading

    job = client.submit(classes(2000, "resumed-beside"))
    other: list = []
    follower = threading.Thread(target=lambda: other.extend(job.stream()))
    follower.start()
    seen = []
    for event in job.stream():
        seen.append(event)
        if event.kind == "step" and event.step == 500:
            break
    resumed = list(job.stream(after_seq=seen[-1].seq))
    follower.join(timeout=120)
    whole = [e.seq for e in seen + resumed]
    assert whole == list(range(1, len(whole) + 1)) == [e.seq for e in other]
    assert [e.step for e in seen + resumed if e.kind == "step"] == list(range(1, 2001))


def test_cancel_a_queued_and_a_running_job(client):
    running = [client.submit(long_job(f"busy{i}")) for i in range(2)]
    for job in running:
        wait_for_step(job, 1)
    queued = client.submit(classes(50, "waiting"))
    assert queued.info().state == "QUEUED"
    assert queued.cancel().state == "CANCELLED"
    for job in running:
        before = time.monotonic()
        assert job.cancel().state in ("CANCELLING", "CANCELLED")
        assert job.wait(timeout=30).state == "CANCELLED"
        # Seen at the next lease renewal (0.5 s) after the current window; slack for this box.
        assert time.monotonic() - before < 3
    events = list(running[0].stream())
    assert states_of(events)[-2:] == ["CANCELLING", "CANCELLED"]
    with pytest.raises(grpc.RpcError) as caught:
        queued.cancel()
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_prometheus_shows_the_last_streamed_values(client, service):
    job = client.submit(classes(150, "scraped"))
    last = [e for e in job.stream() if e.kind == "step"][-1]
    time.sleep(0.3)  # one tail poll
    text = urllib.request.urlopen(service.metrics_url, timeout=10).read().decode()

    def sample(metric: str) -> float:
        pattern = rf'^{metric}{{job_id="{job.id}",name="scraped"}} (\S+)$'
        return float(re.search(pattern, text, re.M).group(1))

    assert sample("trainer_job_loss") == pytest.approx(last.loss, rel=1e-12)
    assert sample("trainer_job_accuracy") == pytest.approx(last.accuracy, rel=1e-12)
    assert sample("trainer_job_step") == 150
    assert re.search(r'^trainer_job_completions_total{state="SUCCEEDED"} [1-9]', text, re.M)
    assert re.search(r"^trainer_job_queue_wait_seconds_count [1-9]", text, re.M)
    assert re.search(r'^trainer_queue_depth{state="QUEUED"} \d', text, re.M)


def test_a_request_with_many_problems_names_them_all_at_once(service):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    spec = {"dataset": "linear", "modle": "mlp", "training": {"steps": -1}}
    request = pb.CreateJobRequest(spec_json=json.dumps(spec), priority=5000, max_attempts=-1)
    channel, stub = raw_stub(service)
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.CreateJob(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in rpc_status.from_call(caught.value).details)
    fields = sorted(v.field for v in bad.field_violations)
    assert fields == ["max_attempts", "priority", "spec.modle", "spec.training.steps"]


def test_a_regression_job_reports_mae_never_as_accuracy(client, service):
    spec = {
        "name": "regressed",
        "dataset": {"name": "synthetic_regression", "num_samples": 128, "num_features": 4},
        "model": {"architecture": "mlp", "hidden_units": [8]},
        "training": {"steps": 40, "batch_size": 16},
    }
    job = client.submit(spec)
    last = [e for e in job.stream() if e.kind == "step"][-1]
    info = job.info()
    assert last.accuracy is None and last.mae is not None
    assert info.accuracy is None and info.mae == pytest.approx(last.mae, rel=1e-12)
    columns = job.metrics()
    assert all(math.isnan(a) for a in columns.accuracy) and columns.mae[-1] == last.mae
    time.sleep(0.3)  # one tail poll
    text = urllib.request.urlopen(service.metrics_url, timeout=10).read().decode()
    series = rf'{{job_id="{job.id}",name="regressed"}}'
    assert re.search(rf"^trainer_job_mae{series} ", text, re.M)
    assert not re.search(rf"^trainer_job_accuracy{series} ", text, re.M)


def test_the_server_publishes_the_checked_in_spec_schema(service):
    channel, stub = raw_stub(service)
    with channel:
        answer = stub.GetJobSpecSchema(pb.GetJobSpecSchemaRequest(), timeout=10)
    schema = json.loads(answer.json_schema)
    checked_in = Path(__file__).resolve().parents[2] / "schemas" / "job-spec.schema.json"
    assert schema == json.loads(checked_in.read_text())
    assert schema["$id"].endswith("job-spec.schema.json")


def test_integers_stay_integers_on_the_wire(service):
    channel, stub = raw_stub(service)
    with channel:
        job = stub.CreateJob(
            pb.CreateJobRequest(spec_json=json.dumps(classes(30, "typed"))), timeout=10
        )
        spec = json.loads(stub.GetJob(pb.GetJobRequest(name=job.name), timeout=10).spec_json)
    assert spec["training"]["steps"] == 30 and isinstance(spec["training"]["steps"], int)
    assert spec["model"]["hidden_units"] == [16] and isinstance(
        spec["model"]["hidden_units"][0], int
    )


def test_metrics_history_and_downsampling(client):
    job = client.submit(classes(100, eval_every=50))
    job.wait(timeout=120)
    full = job.metrics()
    assert full.steps == list(range(1, 101)) and full.total_points == 100
    assert [e.step for e in full.evals] == [50, 100]
    small = job.metrics(max_points=10)
    assert len(small.steps) == 10 and small.steps[-1] == 100 and small.total_points == 100


def test_create_is_idempotent(client):
    spec = classes(20, "idem")
    first = client.submit(spec, request_id="req-1")
    again = client.submit(spec, request_id="req-1")
    assert first.id == again.id
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(classes(21, "idem"), request_id="req-1")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first.wait(timeout=60)


def test_list_filters_and_pages(client):
    for i in range(3):
        client.submit({**classes(10, "listed"), "labels": {"team": "vision", "i": str(i)}})
    found = list(client.jobs(labels={"team": "vision"}, page_size=2))
    assert len(found) == 3 and all(j.display_name == "listed" for j in found)
    assert {j.labels["i"] for j in found} == {"0", "1", "2"}
    for j in found:
        client.job(j.name).wait(timeout=60)
    assert all(j.state == "SUCCEEDED" for j in client.jobs(name="listed"))


def test_upload_a_dataset_and_train_on_it(client, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)).astype("float32")
    np.savez(tmp_path / "mine.npz", x=x, y=(x[:, 0] > 0).astype("int64"))
    path = client.upload_dataset("mine", tmp_path / "mine.npz")
    job = client.submit(
        {"dataset": {"name": "npz", "path": path}, "training": {"steps": 30, "batch_size": 20}}
    )
    info = job.wait(timeout=60)
    assert info.state == "SUCCEEDED", info.failure


def test_a_failing_job_is_failed_with_its_reason(client):
    job = client.submit(DIVERGING)
    info = job.wait(timeout=60)
    assert info.state == "FAILED" and info.failure.reason == "non_finite_loss"
    assert f"step {info.failure.step}" in info.failure.message


def raw_stub(service):
    channel = grpc.insecure_channel(service.address)
    return channel, trainer_pb2_grpc.TrainerServiceStub(channel)


def spec_json(data: dict) -> str:
    return json.dumps(data)


@pytest.mark.parametrize(
    ("call", "code", "phrase"),
    [
        (
            lambda s: s.CreateJob(pb.CreateJobRequest(spec_json=spec_json({"loss": "nope"}))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "loss.name",
        ),
        (
            lambda s: s.CreateJob(
                pb.CreateJobRequest(spec_json=spec_json({"training": {"batch_size": -1}}))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "training.batch_size",
        ),
        (
            lambda s: s.CreateJob(
                pb.CreateJobRequest(spec_json=spec_json({"dataset": "linear"}), priority=5000)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "priority",
        ),
        (
            lambda s: s.GetJob(pb.GetJobRequest(name="jobs/job-0123456789abcdef0123")),
            grpc.StatusCode.NOT_FOUND,
            "job-0123456789abcdef0123",
        ),
        (
            lambda s: s.GetJob(pb.GetJobRequest(name="nonsense")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "no job name",
        ),
        (
            lambda s: s.CreateJob(pb.CreateJobRequest(spec_json=spec_json({}))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "the spec is empty",
        ),
        (
            lambda s: s.CreateJob(pb.CreateJobRequest(spec_json=spec_json({"colour": "red"}))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "colour: unknown field",
        ),
        (
            lambda s: s.CreateJob(pb.CreateJobRequest()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "spec_json: required",
        ),
        (
            lambda s: s.ListJobs(pb.ListJobsRequest(filter="colour=blue")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "filter",
        ),
        (
            lambda s: s.ListJobs(pb.ListJobsRequest(filter="state=SLEEPING")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "QUEUED",
        ),
        (
            lambda s: s.ListJobs(pb.ListJobsRequest(page_token="garbage")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token",
        ),
        (
            lambda s: list(s.WatchJob(pb.WatchJobRequest(name="jobs/job-ffff"))),
            grpc.StatusCode.NOT_FOUND,
            "job-ffff",
        ),
        (
            lambda s: s.UploadDataset(iter([pb.UploadDatasetRequest(chunk=b"x")])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "name",
        ),
    ],
)
def test_bad_requests_get_the_right_code(service, call, code, phrase):
    channel, stub = raw_stub(service)
    with channel, pytest.raises(grpc.RpcError) as caught:
        call(stub)
    assert caught.value.code() == code
    assert phrase in caught.value.details()


def test_download_before_a_model_exists_is_refused(client, service):
    job = client.submit(classes(100000, "cancelled-early"))  # far from done when cancelled
    job.cancel()
    assert job.wait(timeout=30).state == "CANCELLED"
    with pytest.raises(grpc.RpcError) as caught:
        job.download_model("unused.keras")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no model" in caught.value.details()


def test_health_reflection_and_capabilities(client, service):
    with grpc.insecure_channel(service.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "stepstream.v1.TrainerService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
        listed = {s.name for s in reply.list_services_response.service}
        assert {"stepstream.v1.TrainerService", "grpc.health.v1.Health"} <= listed
    caps = client.capabilities()
    assert "mean_squared_error" in caps["losses"] and "lstm" in caps["layers"]
    assert caps["aliases"]["loss/mse"] == "mean_squared_error"


def test_client_validates_before_sending(service):
    from stepstream.kernel.spec import SpecError

    with TrainingClient(service.address) as c, pytest.raises(SpecError, match=r"loss\.name"):
        c.submit({"loss": "nope"})
    assert load_spec(EXAMPLES / "linear_regression.yaml").name == "linear-regression"


def test_priorities_order_the_queue(start_service):
    svc = start_service(workers=1)
    with TrainingClient(svc.address) as c:
        blocker = c.submit(long_job("blocker"))
        wait_for_step(blocker, 1)
        low = c.submit(classes(10, "low"), priority=0)
        high = c.submit(classes(10, "high"), priority=10)
        blocker.cancel()
        low_info, high_info = low.wait(timeout=60), high.wait(timeout=60)
    assert low_info.state == high_info.state == "SUCCEEDED"
    assert high_info.start_time < low_info.start_time


def test_a_slow_watcher_slows_neither_training_nor_other_watchers(client):
    import threading

    job = client.submit(classes(4000, "watched-slowly"))
    fast, slow, finished = [], [], threading.Event()

    def read_slowly():
        for event in job.stream():
            slow.append(event)
            if not finished.is_set():
                time.sleep(0.01)  # about 100 events a second, far behind the job

    reader = threading.Thread(target=read_slowly)
    reader.start()
    fast.extend(job.stream())
    info = job.wait(timeout=120)
    finished.set()
    behind = len(slow)
    reader.join(timeout=120)
    assert info.state == "SUCCEEDED" and fast[-1].kind == "state"
    assert behind < len(fast) / 2, "the slow watcher was expected to lag far behind"
    # Having lagged past the server's buffer, it caught up from the store: all of it, in order.
    assert [e.seq for e in slow] == [e.seq for e in fast] == list(range(1, len(fast) + 1))


def nice_of(pid: int, tid: int | None = None) -> int:
    task = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(task) as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def test_streams_yield_the_cpu_to_training_and_workers_keep_theirs(client, service):
    """The server's RPC threads and event tail run at rpc_nice (10); its main thread and the
    workers it starts do not, so a crowd of watchers gives way to the jobs."""
    import os

    job = client.submit(classes(100000, "niced"))
    try:
        stream = job.stream()
        next(stream)  # a WatchJob handler is running on one of the RPC threads now
        pid = service.proc.pid
        nices = {int(tid): nice_of(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}
        assert nices[pid] == 0
        assert sum(1 for n in nices.values() if n == 10) >= 2, nices  # the tail, the stream
        assert [nice_of(w) for w in service.worker_pids()] == [0, 0]
    finally:
        job.cancel()
