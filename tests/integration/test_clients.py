"""The asyncio client, the CLI against a server, and limits the server enforces."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import numpy as np
import pytest

from stepstream.aio import AsyncTrainingClient
from stepstream.client import TrainingClient

from ..conftest import EXAMPLES
from .test_service import classes

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
