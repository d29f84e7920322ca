"""The CPU image, run as a container user runs it: health, a job submitted from the host through
a published port, its metrics scraped the same way, and what the container findings asked for
(an explicit insecure opt-in, a health check that follows the port and tells the truth,
TensorFlow's threads from the CPU limit, OCI labels, `--gpus all` without GPUs refused)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import (
    DEMO_TOKEN,
    ROOT,
    Built,
    Docker,
    StepFailed,
    container,
    http_get,
    timed,
)

TOKENS = ROOT / "deploy" / "tokens.example"
# The health check every few seconds instead of every 30, and failures counted from the start
# (not after the image's start period), so a test sees its verdict soon.
FAST_HEALTH = (
    "--health-interval=2s",
    "--health-timeout=10s",
    "--health-retries=2",
    "--health-start-period=1s",  # 0 would mean: as the image says
)
PUBLISH = ("--publish=127.0.0.1::50051", "--publish=127.0.0.1::9464")


def trainer_cli(*args: str, address: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The host's `trainer` command line, talking to a container through its published port."""
    env = {**os.environ, "TRAINER_ADDRESS": address, "TRAINER_TOKEN": DEMO_TOKEN}
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "trainer"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def test_the_image_says_what_it_is(docker: Docker, image: Built) -> None:
    config = docker("image", "inspect", image.tag).stdout
    labels = json.loads(config)[0]["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == image.version
    assert labels["org.opencontainers.image.revision"] == image.revision
    assert labels["org.opencontainers.image.source"] == image.source
    assert labels["org.opencontainers.image.created"].endswith("Z")
    assert labels["org.opencontainers.image.base.name"].startswith("trainer-base:")
    assert labels["io.trainer.variant"] == "cpu"
    user = json.loads(config)[0]["Config"]["User"]
    assert user == "10001:10001"


def test_served_with_tokens_it_is_healthy_and_runs_a_job_from_the_host(
    docker: Docker, image: Built, network: str
) -> None:
    options = (
        *FAST_HEALTH,
        *PUBLISH,
        f"--volume={TOKENS}:/run/secrets/trainer_tokens:ro",
        "--env=TRAINER_TOKENS_FILE=/run/secrets/trainer_tokens",
    )
    with container(
        docker, image.tag, "serve", "--workers", "1", "--metrics-host", "0.0.0.0", options=options
    ) as c:
        with timed("run the image until healthy (serve + 1 worker)"):
            status = c.wait_health("healthy")
        assert status == "healthy", c.logs()[-3000:]
        address = f"127.0.0.1:{c.port(50051)}"
        with timed("submit the linear example from the host and follow it"):
            done = trainer_cli(
                "submit", "examples/linear_regression.yaml", "--follow", address=address
            )
        assert done.returncode == 0, done.stdout + done.stderr
        assert ": SUCCEEDED" in done.stdout + done.stderr, done.stdout + done.stderr
        listed = trainer_cli("jobs", "-o", "json", address=address)
        assert '"SUCCEEDED"' in listed.stdout, listed.stdout + listed.stderr
        with timed("scrape the server's metrics through the published port"):
            metrics = http_get(f"http://127.0.0.1:{c.port(9464)}/metrics")
        assert 'trainer_job_step{job_id="job-' in metrics, metrics[:2000]
        assert "trainer_job_submissions_total 1.0" in metrics, metrics[:2000]


def test_without_authentication_the_server_refuses_to_start(docker: Docker, image: Built):
    """The image's default command listens on 0.0.0.0: without tokens it must not fall back to
    a loopback nobody outside the container reaches, while looking healthy."""
    with container(docker, image.tag, options=FAST_HEALTH) as c:
        code = c.wait_exit()
        logs = c.logs()
    assert code == 2, logs
    assert "refusing to listen on 0.0.0.0 with no authentication" in logs, logs
    assert "--insecure" in logs and "TRAINER_TOKENS_FILE" in logs, logs


def test_the_insecure_opt_in_listens_on_every_interface_and_says_so(
    docker: Docker, image: Built, network: str
) -> None:
    options = (*FAST_HEALTH, *PUBLISH, "--env=TRAINER_INSECURE=1")
    with container(docker, image.tag, "serve", "--workers", "0", options=options) as c:
        assert c.wait_health("healthy") == "healthy", c.logs()[-3000:]
        logs = c.logs()
        assert "INSECURE" in logs and "auth none (INSECURE" in logs, logs
        listed = trainer_cli("jobs", "-o", "json", address=f"127.0.0.1:{c.port(50051)}")
        assert listed.returncode == 0, listed.stdout + listed.stderr


def test_the_health_check_follows_the_port_the_server_was_given(
    docker: Docker, image: Built, network: str
) -> None:
    options = (*FAST_HEALTH, "--env=TRAINER_INSECURE=1")
    with container(docker, image.tag, "serve", "--workers", "0", "--port", "6000",
                   options=options) as c:  # fmt: skip
        assert c.wait_health("healthy") == "healthy", c.logs()[-3000:]
        probe = c.inspect()["State"]["Health"]["Log"][-1]["Output"]
        assert ":6000" in probe and "SERVING" in probe, probe


def test_a_server_only_loopback_reaches_is_not_healthy(
    docker: Docker, image: Built, network: str
) -> None:
    with container(docker, image.tag, "serve", "--workers", "0", "--host", "127.0.0.1",
                   options=FAST_HEALTH) as c:  # fmt: skip
        c.wait_log("trainer serve: grpc 127.0.0.1:")
        assert c.wait_health("unhealthy") == "unhealthy", c.logs()[-3000:]
        probe = c.inspect()["State"]["Health"]["Log"][-1]["Output"]
        assert "127.0.0.1 only" in probe, probe


@pytest.mark.parametrize("cpus", [1, 2])
def test_tensorflow_thread_pools_follow_the_cpu_limit(
    docker: Docker, image: Built, network: str, cpus: int
) -> None:
    limit = os.cpu_count() if cpus == 2 else cpus
    options = (f"--cpus={cpus}",) if cpus == 1 else ()
    with container(docker, image.tag, "worker", "--gpus", "none", "--workers", "1",
                   options=options) as c:  # fmt: skip
        logs = c.wait_log("TensorFlow thread pools:", timeout=180)
    line = next(s for s in logs.splitlines() if "TensorFlow thread pools:" in s)
    assert f"TensorFlow thread pools: {limit} intra-op, {limit} inter-op" in line, line
    if cpus == 1:
        assert "CPU quota 1" in line, line


def test_gpus_all_without_nvidia_smi_is_refused_out_loud(docker: Docker, image: Built):
    with container(docker, image.tag, "worker", "--gpus", "all") as c:
        code = c.wait_exit()
        logs = c.logs()
    assert code == 2, logs
    assert "--gpus all" in logs and "nvidia-smi" in logs, logs
    if "cpu0" in logs:
        raise StepFailed(f"CPU workers started anyway:\n{logs}")
