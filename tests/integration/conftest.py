"""A real server on port 0, as a subprocess, with its workers; each test cleans up after it.

Every test here runs against both store engines: SQLite in the test's folder, and a fresh
database on the real PostgreSQL server.
"""

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

from tests.conftest import ENGINES

READY = re.compile(r"grpc (\S+):(\d+) metrics (\S+):(\d+) workers (\d+)")


def service_env(**settings: object) -> dict[str, str]:
    """This environment plus each setting as its TRAINER_<NAME> variable."""
    env = dict(os.environ)
    env.update({f"TRAINER_{k.upper()}": str(v) for k, v in settings.items()})
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


class ServiceProcess:
    """`trainer serve` on free ports; `flags` go on its command line, `settings` into its
    environment. `ready` is the line it printed once listening."""

    def __init__(
        self,
        data_dir: Path,
        *flags: str,
        workers: int = 1,
        port: int = 0,
        **settings: object,
    ):
        self.data_dir = data_dir
        # The database it uses, for a test to open beside it.
        self.store_url = str(settings.get("store") or f"sqlite:///{data_dir / 'trainer.db'}")
        env = service_env(**settings)
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stepstream.cli",
                "serve",
                "--port",
                str(port),
                "--metrics-port",
                "0",
                "--workers",
                str(workers),
                "--data-dir",
                str(data_dir),
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
        )
        self.ready = self.proc.stdout.readline().strip()
        match = READY.search(self.ready)
        if not match:
            self.stop()
            raise RuntimeError(f"server did not start: {self.ready!r}\n{self.log_path.read_text()}")
        self.host, port, self.metrics_host, metrics_port, _ = match.groups()
        self.port, self.metrics_port = int(port), int(metrics_port)
        # 0.0.0.0 listens on every address, loopback included.
        reach = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        self.address = f"{reach}:{self.port}"
        metrics = "127.0.0.1" if self.metrics_host == "0.0.0.0" else self.metrics_host
        self.metrics_url = f"http://{metrics}:{self.metrics_port}/metrics"

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


class WorkerHost:
    """`trainer worker` as another machine would run it: its own data folder, the shared
    database and artifact store, in a process group of its own so it can die as a whole."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        store: str,
        workers: int = 1,
        metrics: bool = False,
        **settings: object,
    ):
        env = service_env(**settings)
        self.data_dir = tmp / name
        self.log_path = tmp / f"{name}-worker.log"
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stepstream.cli",
                "worker",
                "--store",
                store,
                "--workers",
                str(workers),
                "--data-dir",
                str(self.data_dir),
                *(["--metrics-port", "0"] if metrics else []),
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
            start_new_session=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("trainer worker:"):
            self.kill()
            raise RuntimeError(f"worker did not start: {line!r}\n{self.log_path.read_text()}")
        found = re.search(r"metrics (\S+:\d+)", line)
        self.metrics = found.group(1) if found else None  # host:port of its /metrics
        # Worker ids carry the supervisor's pid: host-pid-slot.
        self.id_prefix = f"{os.uname().nodename}-{self.proc.pid}-"

    def kill(self) -> None:
        """The machine dies: the supervisor and its workers at once, no goodbye."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture
def start_service(tmp_path, engine, database):
    """start(...) -> a running service; every start in one test shares one database (so a
    restarted server finds its jobs), unless `store=` says otherwise."""
    started: list[ServiceProcess] = []
    url: list[str] = []

    def start(data_dir: Path | None = None, **kwargs) -> ServiceProcess:
        if "store" not in kwargs:
            if not url:
                url.append(database(engine))
            kwargs["store"] = url[0]
        service = ServiceProcess(data_dir or tmp_path / "data", **kwargs)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="module", params=ENGINES)
def service(request, tmp_path_factory):
    """One server with two CPU workers, shared by the tests of a module."""
    folder = tmp_path_factory.mktemp("svc")
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'trainer.db'}"
    else:
        url = request.getfixturevalue("postgres").create()
    svc = ServiceProcess(
        folder / "data",
        workers=2,
        lease_seconds=5,
        metrics_linger_seconds=600,
        store=url,
    )
    svc.engine = request.param
    yield svc
    svc.stop()
    if request.param == "postgresql":
        request.getfixturevalue("postgres").drop(url)


@pytest.fixture
def client(service):
    from stepstream.client import TrainingClient

    with TrainingClient(service.address) as c:
        yield c
