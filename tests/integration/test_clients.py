"""The asyncio client, the CLI against a server, and limits the server enforces."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from stepstream.aio import AsyncTrainingClient
from stepstream.client import TrainingClient

from ..conftest import EXAMPLES
from .test_service import classes, wait_for_step

pytestmark = pytest.mark.slow


def test_async_client_submits_streams_and_downloads(service, tmp_path):
    async def scenario():
        async with AsyncTrainingClient(service.address) as client:
            job = await client.submit(classes(40, "async", eval_every=20))
            events = [e async for e in job.stream()]
            info = await job.wait(timeout=30)
            path = await job.download_model(tmp_path / "m.keras")
            metrics = await job.metrics(max_points=5)
            listed = [j.id async for j in client.jobs(state="SUCCEEDED")]
            return events, info, path, metrics, listed, job.id

    events, info, path, metrics, listed, job_id = asyncio.run(scenario())
    assert [e.step for e in events if e.kind == "step"] == list(range(1, 41))
    assert [e.step for e in events if e.kind == "eval"] == [20, 40]
    assert info.state == "SUCCEEDED" and path.stat().st_size > 0
    assert len(metrics.steps) == 5 and job_id in listed


def test_async_client_has_every_reach_of_the_sync_one(service, tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    np.savez(tmp_path / "mine.npz", x=x, y=(x[:, 0] > 0).astype("int64"))
    spec = {**classes(20, "parity"), "labels": {"suite": "aio-parity"}}

    async def scenario():
        async with AsyncTrainingClient(service.address) as client:
            first = await client.submit(spec, request_id="aio-parity-1", priority=1)
            again = await client.submit(spec, request_id="aio-parity-1", priority=1)
            info = await first.wait(timeout=60)
            state = await first.state
            listed = [j.name async for j in client.jobs(labels={"suite": "aio-parity"})]
            named = [j.name async for j in client.jobs(state="SUCCEEDED", name="parity")]
            caps = await client.capabilities()
            path = await client.upload_dataset("mine", tmp_path / "mine.npz", chunk_size=512)
            return first, again, info, state, listed, named, caps, path

    first, again, info, state, listed, named, caps, path = asyncio.run(scenario())
    assert again.name == first.name and info.state == state == "SUCCEEDED"
    assert listed == [first.name] and first.name in named
    assert "mlp" in caps["architectures"] and caps["aliases"]
    with TrainingClient(service.address) as client:
        trained = client.submit(
            {"dataset": {"name": "npz", "path": path}, "training": {"steps": 10, "batch_size": 16}}
        )
        assert trained.wait(timeout=60).state == "SUCCEEDED"


class CountGetJob(grpc.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.calls = 0

    def intercept_unary_unary(self, continuation, details, request):
        self.calls += details.method.endswith("/GetJob")
        return continuation(details, request)


class CountGetJobAsync(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.calls = 0

    async def intercept_unary_unary(self, continuation, details, request):
        method = details.method
        self.calls += (method.decode() if isinstance(method, bytes) else method).endswith("/GetJob")
        return await continuation(details, request)


def wait_counting(address: str, name: str, asynchronous: bool) -> tuple[str, int]:
    """Wait for a job through a channel that counts GetJob calls: (final state, count)."""
    if not asynchronous:
        counter = CountGetJob()
        channel = grpc.intercept_channel(grpc.insecure_channel(address), counter)
        with TrainingClient(address, channel=channel) as client:
            return client.job(name).wait(timeout=60).state, counter.calls

    async def scenario():
        counter = CountGetJobAsync()
        channel = grpc.aio.insecure_channel(address, interceptors=[counter])
        async with AsyncTrainingClient(address, channel=channel) as client:
            return (await client.job(name).wait(timeout=60)).state, counter.calls

    return asyncio.run(scenario())


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_wait_rides_the_stream_instead_of_polling(service, client, asynchronous):
    job = client.submit(classes(10_000_000, "ridden"))
    wait_for_step(job, 1)
    cancel = threading.Timer(3.0, job.cancel)
    cancel.start()
    started = time.monotonic()
    try:
        state, get_jobs = wait_counting(service.address, job.name, asynchronous)
    finally:
        cancel.join()
    assert state == "CANCELLED" and time.monotonic() - started > 2.5
    assert 1 <= get_jobs <= 2  # where it starts, and the final job: none while it runs


def test_wait_times_out_naming_the_job_and_its_state(service, client):
    job = client.submit(classes(10_000_000, "overdue"))
    wait_for_step(job, 1)

    async def wait_async():
        async with AsyncTrainingClient(service.address) as aio:
            await aio.job(job.name).wait(timeout=1)

    try:
        for wait in (lambda: job.wait(timeout=1), lambda: asyncio.run(wait_async())):
            started = time.monotonic()
            with pytest.raises(TimeoutError, match=f"{job.name} still RUNNING after 1 s"):
                wait()
            assert time.monotonic() - started < 3
    finally:
        job.cancel()
    assert job.wait(timeout=60).state == "CANCELLED"


@pytest.mark.parametrize("engine", ["sqlite"])
def test_wait_rides_out_a_server_restart(start_service, tmp_path):
    data = tmp_path / "same-port"
    first = start_service(data, workers=1, lease_seconds=2)
    with TrainingClient(first.address) as client, ThreadPoolExecutor(1) as pool:
        job = client.submit(classes(2000, "restarted", checkpoint_every=100))
        waiting = pool.submit(job.wait, 150)
        wait_for_step(job, 200)
        first.stop()
        start_service(data, workers=1, lease_seconds=2, port=first.port)
        info = waiting.result(timeout=180)
    assert info.state == "SUCCEEDED" and info.step == 2000


def cli(service, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stepstream.cli", *args, "--address", service.address],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_submit_follow_jobs_show_plot_download(service, tmp_path):
    out = cli(service, "submit", str(EXAMPLES / "linear_regression.yaml"), "--follow")
    assert out.returncode == 0, out.stderr
    name = out.stdout.split()[0]
    assert name.startswith("jobs/job-") and "200/200" in out.stderr and "SUCCEEDED" in out.stderr
    job_id = name.removeprefix("jobs/")
    assert job_id in cli(service, "jobs").stdout
    assert '"state": "SUCCEEDED"' in cli(service, "show", job_id).stdout
    watch = cli(service, "watch", job_id)
    assert watch.returncode == 0 and "SUCCEEDED" in watch.stderr
    plot = cli(service, "plot", job_id, "-o", str(tmp_path / "curves.png"))
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    download = cli(service, "download", job_id, "-o", str(tmp_path))
    assert download.returncode == 0 and (tmp_path / "linear-regression.keras").is_file()


def test_cli_exit_code_of_failed_and_cancelled_jobs(service, tmp_path):
    bad = tmp_path / "nan.yaml"
    bad.write_text(
        "model: linear\ndataset: {name: linear, noise: 10}\n"
        "optimizer: {name: sgd, learning_rate: 1.0e6}\n"
        "training: {steps: 100, batch_size: 100}\n"
    )
    out = cli(service, "submit", str(bad), "--follow")
    assert out.returncode == 1 and "non_finite_loss" in out.stderr
    missing = cli(service, "cancel", "job-0123456789abcdef0123")
    assert missing.returncode == 4 and "NOT_FOUND" in missing.stderr


def test_max_duration_fails_the_job_with_a_timeout(client):
    job = client.submit(classes(10_000_000, "slowpoke", max_duration=1))
    info = job.wait(timeout=60)
    assert info.state == "FAILED" and info.failure.reason == "max_duration_exceeded"


def test_upload_size_is_limited(start_service, tmp_path):
    svc = start_service(workers=0, max_upload_bytes=10_000)
    np.savez(tmp_path / "big.npz", x=np.zeros((100, 100)), y=np.zeros(100))
    with TrainingClient(svc.address) as c, pytest.raises(grpc.RpcError) as caught:
        c.upload_dataset("big", tmp_path / "big.npz", chunk_size=4096)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_upload_bytes" in caught.value.details()
    assert not list((svc.data_dir / "uploads").glob("*"))
