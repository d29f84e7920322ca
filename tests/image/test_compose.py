"""deploy/compose.yaml brought up for real: PostgreSQL, the schema migration, the API server and
two workers from the image built here, and Prometheus, with PostgreSQL and Prometheus built
locally from Debian's packages. A job submitted from the host succeeds on a worker, and the
stack's Prometheus scrapes its metrics. Grafana is left out: no registry this machine reaches
(Debian, PyPI, npm) ships it."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .conftest import (
    ROOT,
    Built,
    Docker,
    StepFailed,
    build_support_image,
    http_get,
    timed,
)
from .test_image import trainer_cli

COMPOSE = ROOT / "deploy" / "compose.yaml"
SERVICES = ("postgres", "migrate", "server", "worker", "prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    docker: Docker
    project: str
    env: dict[str, str]
    job_id: str | None = None  # the job the first test ran

    def compose(self, *args: str, check: bool = True, timeout: float = 300):
        return self.docker.compose(
            "--file", str(COMPOSE), "--project-name", self.project, *args,
            env=self.env, check=check, timeout=timeout,
        )  # fmt: skip

    def containers(self, service: str) -> list[dict]:
        out = self.compose("ps", "--all", "--format", "json", service).stdout.strip()
        if not out:
            return []
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines()]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.env['TRAINER_PORT']}"

    def prometheus(self, query: str) -> list[dict]:
        url = (
            f"http://127.0.0.1:{self.env['PROMETHEUS_PORT']}/api/v1/query?"
            + urllib.parse.urlencode({"query": query})
        )
        return json.loads(http_get(url))["data"]["result"]

    def logs(self) -> str:
        proc = self.compose("logs", "--no-color", "--tail", "60", check=False)
        return (proc.stdout + proc.stderr)[-6000:]


@pytest.fixture(scope="module")
def stack(docker: Docker, base_image: str, image: Built) -> Iterator[Stack]:
    postgres = build_support_image(docker, base_image, "postgres")
    prometheus = build_support_image(docker, base_image, "prometheus")
    repository, tag = image.tag.split(":")
    env = {
        "TRAINER_IMAGE": repository,
        "TRAINER_TAG": tag,
        "POSTGRES_IMAGE": postgres,
        "PROMETHEUS_IMAGE": prometheus,
        "TRAINER_WORKERS": "2",
        "TRAINER_PORT": str(free_port()),
        "TRAINER_METRICS_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()),
        "GRAFANA_PORT": str(free_port()),
    }
    found = Stack(docker, f"trainer-test-{uuid.uuid4().hex[:8]}", env)
    try:
        with timed("compose up: postgres, migrate, server, 2 workers, prometheus"):
            try:
                found.compose("up", "--detach", "--no-build", *SERVICES, timeout=600)
            except StepFailed as exc:
                raise StepFailed(f"{exc}\n{found.logs()}") from None
            deadline = time.monotonic() + 180
            while trainer_cli("health", address=found.address, timeout=30).returncode != 0:
                if time.monotonic() > deadline:
                    raise StepFailed(f"the stack's server never answered:\n{found.logs()}")
                time.sleep(1)
        yield found
    finally:
        found.compose("down", "--volumes", "--timeout", "20", check=False, timeout=300)


def test_the_stack_runs_a_job_on_its_workers(stack: Stack) -> None:
    workers = [c for c in stack.containers("worker") if c.get("State") == "running"]
    assert len(workers) == 2, stack.containers("worker")
    with timed("compose: submit the linear example and follow it"):
        done = trainer_cli(
            "submit", "examples/linear_regression.yaml", "--follow", address=stack.address
        )
    assert done.returncode == 0, done.stdout + done.stderr + stack.logs()
    shown = trainer_cli("jobs", "-o", "json", address=stack.address)
    jobs = json.loads(shown.stdout)
    assert [j["state"] for j in jobs] == ["SUCCEEDED"], jobs
    stack.job_id = jobs[0]["id"]


def test_the_stacks_prometheus_scrapes_the_job(stack: Stack) -> None:
    job_id = stack.job_id
    if job_id is None:
        raise StepFailed("the job test did not run first")
    with timed("compose: the job's metrics reach Prometheus"):
        deadline = time.monotonic() + 120
        found: list[dict] = []
        while not found and time.monotonic() < deadline:
            found = stack.prometheus(f'trainer_job_step{{job_id="{job_id}"}}')
            if not found:
                time.sleep(2)
    assert found, stack.prometheus("up")
    assert float(found[0]["value"][1]) == 200.0, found


def test_the_stacks_prometheus_scrapes_the_server_and_both_workers(stack: Stack) -> None:
    # Workers are found by DNS, which Prometheus looks at again every 15 s.
    deadline = time.monotonic() + 120
    while True:
        up = [r["metric"] for r in stack.prometheus("up == 1")]
        jobs = sorted(m["job"] for m in up)
        if jobs == ["trainer-server", "trainer-worker", "trainer-worker"]:
            break
        assert time.monotonic() < deadline, up
        time.sleep(2)
    worker = next(m["instance"] for m in up if m["job"] == "trainer-worker")
    slots = stack.prometheus(f'trainer_worker_processes{{instance="{worker}"}}')
    assert slots, f"no worker metrics from {worker}"


def test_prometheus_is_on_loopback_without_its_shutdown_api(stack: Stack) -> None:
    published = stack.compose("port", "prometheus", "9090").stdout.strip()
    assert published.startswith("127.0.0.1:"), published
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.env['PROMETHEUS_PORT']}/-/quit", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403, refused.value
    assert "Healthy" in http_get(f"http://127.0.0.1:{stack.env['PROMETHEUS_PORT']}/-/healthy")
