"""A real server on port 0, as a subprocess, with its workers; each test cleans up after it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

READY = re.compile(r"grpc (\S+):(\d+) metrics \S+:(\d+) workers (\d+)")


class ServiceProcess:
    def __init__(self, data_dir: Path, workers: int = 1, port: int = 0, **settings: object):
        self.data_dir = data_dir
        env = dict(os.environ)
        env.update({f"TRAINER_{k.upper()}": str(v) for k, v in settings.items()})
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainer_client.cli",
                "serve",
                "--port",
                str(port),
                "--metrics-port",
                "0",
                "--workers",
                str(workers),
                "--data-dir",
                str(data_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
        )
        line = self.proc.stdout.readline()
        match = READY.search(line)
        if not match:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log_path.read_text()}")
        host, bound, metrics_port, _ = match.groups()
        self.port = int(bound)
        self.address = f"{host}:{bound}"
        self.metrics_url = f"http://{host}:{metrics_port}/metrics"

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def wait_for_workers(self, count: int, timeout: float = 60) -> list[int]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pids = self.worker_pids()
            if len(pids) >= count:
                return pids
            time.sleep(0.1)
        raise TimeoutError(f"expected {count} workers, have {self.worker_pids()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        children = self.worker_pids() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in children:  # after a SIGKILL of the server its workers are orphans
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture
def start_service(tmp_path):
    started: list[ServiceProcess] = []

    def start(data_dir: Path | None = None, **kwargs) -> ServiceProcess:
        service = ServiceProcess(data_dir or tmp_path / "data", **kwargs)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One server with two CPU workers, shared by the tests of a module."""
    svc = ServiceProcess(
        tmp_path_factory.mktemp("svc") / "data",
        workers=2,
        lease_seconds=5,
        metrics_linger_seconds=600,
    )
    yield svc
    svc.stop()


@pytest.fixture
def client(service):
    from trainer_client.client import TrainingClient

    with TrainingClient(service.address) as c:
        yield c
