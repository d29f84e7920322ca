"""Memory: a job is sized from its spec before anything is allocated. A worker under a
container-style limit (here `prlimit --as`, as cgroups cannot be set in CI) refuses what does not
fit as out_of_memory and lives on; submit refuses what no worker could ever hold; an upload is
refused at once when it is empty, not an npz, or expands past max_upload_expanded_bytes.

Two servers, each shared by its module's cases: `bare` has no worker at all, `limited` one
worker started by hand under an address-space limit.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status

from stepstream.client import TrainingClient
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc
from tests.faults.conftest import assert_intact
from tests.faults.test_trust import serving
from tests.integration.conftest import service_env
from tests.integration.test_service import classes

Code = grpc.StatusCode
GiB = 2**30
# The worker's address space: the framework takes some of it, the 4 x 16384 MLP below far more.
WORKER_AS = 8 * GiB
WORKER_ID = "memory-limited"

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")


def mlp(name: str, layers: int, units: int = 16384) -> dict:
    return {
        "name": name,
        "dataset": {"name": "synthetic_classification", "num_samples": 256, "num_features": 8},
        "model": {"architecture": "mlp", "hidden_units": [units] * layers},
        "training": {"steps": 5, "batch_size": 16},
    }


OVERSIZED = {
    # About 17 billion weights: 255 GiB with adam's slots and the gradients.
    "mlp-64x16384": mlp("wide", 64),
    "embedding-1Mx16384": {
        "name": "embedding",
        "dataset": {"name": "synthetic_sequence", "vocab_size": 1_000_000},
        "model": {"architecture": "rnn", "embedding_dim": 16384},
    },
    "synthetic-10Mx100k": {
        "name": "synthetic",
        "dataset": {
            "name": "synthetic_classification",
            "num_samples": 10_000_000,
            "num_features": 100_000,
        },
        "model": {"architecture": "mlp", "hidden_units": [8]},
    },
}


@pytest.fixture(scope="module")
def images() -> bytes:
    """About 200 KB that expands to 2 x 10000 x 10000 images (190.7 MiB)."""
    out = io.BytesIO()
    np.savez_compressed(out, x=np.zeros((2, 10000, 10000), "uint8"), y=np.zeros(2, "int64"))
    return out.getvalue()


def create(stub, spec: dict) -> pb.Job:
    return stub.CreateJob(pb.CreateJobRequest(spec_json=json.dumps(spec)), timeout=30)


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def reason_of(err: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(err)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def upload(stub, name: str, data: bytes, chunk: int = 64 * 1024) -> pb.Dataset:
    def parts() -> Iterator[pb.UploadDatasetRequest]:
        yield pb.UploadDatasetRequest(name=name)
        for i in range(0, len(data), chunk):
            yield pb.UploadDatasetRequest(chunk=data[i : i + chunk])

    return stub.UploadDataset(parts(), timeout=60)


def job_count(stub) -> int:
    return len(stub.ListJobs(pb.ListJobsRequest(page_size=1000), timeout=30).jobs)


# ---------------------------------------------------------------- no worker known


@pytest.fixture(scope="module")
def bare(request, tmp_path_factory):
    with serving(request, tmp_path_factory, max_upload_expanded_bytes=100 * 2**20) as svc:
        channel = grpc.insecure_channel(svc.address)
        yield svc, trainer_pb2_grpc.TrainerServiceStub(channel)
        channel.close()


def test_with_no_worker_known_a_job_past_max_job_bytes_is_refused_at_submit(bare):
    _, stub = bare
    for name, spec in OVERSIZED.items():
        err = refusal(lambda spec=spec: create(stub, spec))
        assert err.code() == Code.RESOURCE_EXHAUSTED, (name, err.details())
        assert reason_of(err) == "JOB_TOO_LARGE"
        assert re.search(r"needs about [\d.]+ GiB \(weights .*data ", err.details()), err.details()
        assert "64.0 GiB (max_job_bytes)" in err.details()
    assert job_count(stub) == 0  # nothing was queued


def test_an_upload_that_expands_too_far_is_refused_at_upload_leaving_nothing(bare, images):
    svc, stub = bare
    assert len(images) < 300_000
    err = refusal(lambda: upload(stub, "bomb", images))
    assert err.code() == Code.INVALID_ARGUMENT
    assert "190.7 MiB" in err.details() and "max_upload_expanded_bytes" in err.details()
    assert "x 2 x 10000 x 10000 uint8" in err.details()
    assert not list((svc.data_dir / "uploads").iterdir())


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "the upload is empty"),
        (b"GIF89a not an npz at all", "not a zip archive"),
        ("text-in-zip", "'notes.txt', which is not a .npy array"),
        ("wrong-keys", "holds 'features'"),
    ],
    ids=["empty", "not-a-zip", "zip-without-arrays", "wrong-keys"],
)
def test_an_empty_or_non_npz_upload_is_refused_saying_what_was_expected(bare, content, says):
    import zipfile

    svc, stub = bare
    if content == "text-in-zip":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("notes.txt", "hello")
        content = out.getvalue()
    elif content == "wrong-keys":
        out = io.BytesIO()
        np.savez(out, features=np.zeros((4, 2)))
        content = out.getvalue()
    err = refusal(lambda: upload(stub, "junk", content))
    assert err.code() == Code.INVALID_ARGUMENT, err.details()
    assert says in err.details()
    assert "x_train and y_train (or x and y)" in err.details()  # what was expected
    assert str(svc.data_dir) not in err.details()  # no server path
    assert not list((svc.data_dir / "uploads").iterdir())


def test_a_valid_upload_is_still_taken(bare):
    svc, stub = bare
    out = io.BytesIO()
    np.savez(out, x=np.zeros((8, 2), "float32"), y=np.arange(8) % 2)
    assert upload(stub, "fine", out.getvalue()).path == "uploads/fine.npz"
    assert (svc.data_dir / "uploads" / "fine.npz").is_file()


# ---------------------------------------------------------------- a worker under a limit


class LimitedWorker:
    """`python -m stepstream_service.runtime.worker` under `prlimit --as`: the limit a container
    would set, on the worker's own process (prlimit execs it: the pid is the worker's)."""

    def __init__(self, svc, limit: int):
        env = service_env(store=svc.store_url, data_dir=svc.data_dir, worker_seen_seconds=1)
        env["CUDA_VISIBLE_DEVICES"] = ""  # the host's limit is the one under test
        self.log_path = svc.data_dir.parent / "limited-worker.log"
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                "prlimit",
                f"--as={limit}",
                "--",
                sys.executable,
                "-m",
                "stepstream_service.runtime.worker",
                "--worker-id",
                WORKER_ID,
            ],
            stdout=self.log,
            stderr=self.log,
            env=env,
        )

    def wait_registered(self, store_url: str, timeout: float = 120) -> int:
        from stepstream_service.store import Store

        store = Store(store_url)
        try:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
                for w in store.live_workers(60):
                    if w.id == WORKER_ID:
                        return getattr(w, "memory_bytes", None) or 0
                time.sleep(0.2)
        finally:
            store.close()
        raise TimeoutError(f"the worker never registered:\n{self.log_path.read_text()[-3000:]}")

    def peak_rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def limited(request, tmp_path_factory):
    """A server with no worker of its own; the 4 x 16384 MLP is queued while no worker is
    known (so submit cannot refuse it), then a worker under WORKER_AS starts and claims it."""
    with serving(request, tmp_path_factory) as svc:
        svc.store_url = f"sqlite:///{svc.data_dir.parent / 'trainer.db'}"
        with TrainingClient(svc.address) as c:
            big = c.submit(mlp("four-wide", 4)).name  # about 14 GiB with adam
        worker = LimitedWorker(svc, WORKER_AS)
        try:
            memory = worker.wait_registered(svc.store_url)
            yield svc, worker, big, memory
        finally:
            worker.stop()


def test_a_worker_under_a_memory_limit_refuses_an_oversized_job_and_lives_on(limited):
    svc, worker, big, memory = limited
    pid = worker.proc.pid
    with TrainingClient(svc.address) as c:
        info = c.job(big).wait(timeout=120)
        after = c.submit(classes(20, "after-oom")).wait(timeout=120)
        events, small = list(c.job(big).stream()), list(c.job(after.name).stream())
    assert info.state == "FAILED" and info.failure.reason == "out_of_memory", info.failure
    message = info.failure.message
    assert re.search(r"needs about 1\d\.\d GiB \(weights 3\.0 GiB, optimizer", message), message
    assert "RLIMIT_AS" in message and "this worker has" in message, message
    assert not [e for e in events if e.kind == "step"]  # refused before the first step
    assert_intact(events, final="FAILED")
    assert after.state == "SUCCEEDED", after.failure
    assert_intact(small, steps=20, final="SUCCEEDED")
    assert worker.proc.poll() is None and worker.proc.pid == pid  # the same process
    assert 0 < memory < WORKER_AS  # registered: what is left once the framework is loaded
    # Before allocating: the 3 GiB of weights never existed in the worker.
    assert worker.peak_rss() < 2 * GiB, worker.peak_rss()


@pytest.mark.parametrize("name", sorted(OVERSIZED))
def test_submit_refuses_what_no_registered_worker_could_hold(limited, name):
    svc, _, _, memory = limited
    with grpc.insecure_channel(svc.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        before = job_count(stub)
        err = refusal(lambda: create(stub, OVERSIZED[name]))
        assert job_count(stub) == before  # nothing queued
    assert err.code() == Code.RESOURCE_EXHAUSTED and reason_of(err) == "JOB_TOO_LARGE"
    details = err.details()
    assert re.search(r"needs about [\d.]+ GiB \(weights", details), details
    assert f"the largest has {memory / GiB:.1f} GiB (worker memory)" in details, details


def test_an_upload_expanding_to_huge_images_is_refused_at_submit(limited, images):
    svc, _, _, memory = limited
    with grpc.insecure_channel(svc.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        path = upload(stub, "images", images).path  # within max_upload_expanded_bytes
        before = job_count(stub)
        spec = {"name": "on-images", "dataset": {"name": "npz", "path": path}}
        err = refusal(lambda: create(stub, spec))
        assert job_count(stub) == before
    assert err.code() == Code.RESOURCE_EXHAUSTED, err.details()
    # Flattened, each image is 10^8 inputs to the first layer.
    assert re.search(r"needs about \d{3}\.\d GiB \(weights \d+\.\d GiB", err.details())
    assert f"the largest has {memory / GiB:.1f} GiB" in err.details()
    assert os.path.getsize(svc.data_dir / path) == len(images)
