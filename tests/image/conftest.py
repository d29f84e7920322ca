"""The image, built and run for real.

A Docker daemon (the one DOCKER_HOST or the default socket names, else one started here with
its own data root under .docker/), a Debian bookworm base made locally with mmdebstrap (no
image registry can be reached from these machines), the CPU image built from the Dockerfile on
it, and containers run from that image on a network of their own. A step that cannot be done
fails the run with what it printed: nothing here skips.

scripts/test-image runs these tests (and .ci/run runs scripts/test-image); at the end the run
prints how long each step took.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.compose import compose_command

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STATE = ROOT / ".docker"  # a daemon started here: its data root, socket and logs
IMAGE = "trainer:cpu-test"
BASE = "trainer-base:bookworm-local"
# The local base: Debian's Python 3.11 with venv as `python`, which is what the Dockerfile's
# pinned python:3.11-slim-bookworm gives it.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
# Certificate authorities added to this machine (an HTTPS proxy's own, say): copied into the
# local base so that pip inside the build trusts what the host trusts. None here, none copied.
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
DEMO_TOKEN = "trn_demo_change-me"  # deploy/tokens.example's one tenant

TIMINGS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    if TIMINGS:
        terminalreporter.section("image steps (seconds)")
        for step, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{seconds:8.1f}  {step}")


@contextlib.contextmanager
def timed(step: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    TIMINGS[step] = TIMINGS.get(step, 0.0) + time.monotonic() - start


class StepFailed(AssertionError):
    pass


def run(
    cmd: list[str], *, env: dict | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise StepFailed(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc


def logged(cmd: list[str], log: Path, *, env: dict | None = None, timeout: float) -> None:
    """A long step (a build) with its output in a file; on failure the file's end is shown."""
    with log.open("w") as out:
        proc = subprocess.run(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise StepFailed(f"{' '.join(cmd)} exited {proc.returncode} (log {log}):\n{tail}")


# ---------------------------------------------------------------- the daemon


@dataclass
class Docker:
    env: dict[str, str]
    network: str = ""

    def __call__(self, *args: str, check: bool = True, timeout: float = 120):
        return run(["docker", *args], env=self.env, check=check, timeout=timeout)

    def compose(self, *args: str, env: dict | None = None, check: bool = True, timeout=300):
        command = [*compose_command(), *args]
        return run(command, env={**self.env, **(env or {})}, check=check, timeout=timeout)


def _answers(env: dict) -> bool:
    return run(["docker", "info"], env=env, check=False, timeout=30).returncode == 0


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    if shutil.which("docker") is None:
        raise StepFailed("no docker command: run scripts/install (Debian's docker.io)")
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    if _answers(env):
        yield Docker(env)
        return
    if shutil.which("dockerd") is None:
        raise StepFailed("no Docker daemon answers and no dockerd: run scripts/install")
    if os.geteuid() != 0:
        raise StepFailed("no Docker daemon answers, and only root can start one here")
    STATE.mkdir(exist_ok=True)
    sock = STATE / "docker.sock"
    # The exec root holds the containers' sockets, whose paths must stay short.
    exec_root = Path("/run") / f"trainer-docker-{hashlib.sha1(bytes(STATE)).hexdigest()[:8]}"
    log = (STATE / "dockerd.log").open("ab")
    with timed("start the Docker daemon"):
        daemon = subprocess.Popen(
            [
                "dockerd",
                f"--data-root={STATE / 'root'}",
                f"--exec-root={exec_root}",
                f"--pidfile={STATE / 'dockerd.pid'}",
                f"--host=unix://{sock}",
                "--storage-driver=overlay2",
                # No firewall rules and no default bridge: this machine's network is not ours
                # to change. Containers share networks made for them; ports are published by
                # Docker's userland proxy.
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        env["DOCKER_HOST"] = f"unix://{sock}"
        deadline = time.monotonic() + 90
        while not _answers(env):
            if daemon.poll() is not None or time.monotonic() > deadline:
                daemon.kill()
                tail = (STATE / "dockerd.log").read_text(errors="replace")[-3000:]
                raise StepFailed(f"dockerd did not start:\n{tail}")
            time.sleep(0.5)
    try:
        yield Docker(env)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()


@pytest.fixture(scope="session")
def network(docker: Docker) -> Iterator[str]:
    """A bridge network of the tests' own (the daemon may have no default bridge)."""
    name = f"trainer-image-test-{uuid.uuid4().hex[:8]}"
    docker("network", "create", name)
    docker.network = name
    try:
        yield name
    finally:
        docker("network", "rm", name, check=False)


# ---------------------------------------------------------------- the images


def _recipe() -> str:
    cas = sorted(LOCAL_CAS.glob("*.crt")) if LOCAL_CAS.is_dir() else []
    text = json.dumps([BASE_PACKAGES, [c.read_text() for c in cas]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _label(docker: Docker, image: str, label: str) -> str | None:
    proc = docker("image", "inspect", image, check=False)
    if proc.returncode != 0:
        return None
    labels = json.loads(proc.stdout)[0]["Config"].get("Labels") or {}
    return labels.get(label)


@pytest.fixture(scope="session")
def base_image(docker: Docker) -> str:
    """Debian bookworm with Python 3.11, made here: mmdebstrap, then docker import."""
    recipe = _recipe()
    if _label(docker, BASE, "io.trainer.recipe") == recipe:
        return BASE
    if shutil.which("mmdebstrap") is None:
        raise StepFailed("no mmdebstrap: run scripts/install (Debian's mmdebstrap)")
    STATE.mkdir(exist_ok=True)
    tar = STATE / "base.tar"
    cas = sorted(LOCAL_CAS.glob("*.crt")) if LOCAL_CAS.is_dir() else []
    hooks, changes = [], ["--change", 'CMD ["/bin/bash"]']
    if cas:
        hooks = [
            "--customize-hook=cp "
            + " ".join(str(c) for c in cas)
            + ' "$1/usr/local/share/ca-certificates/" && chroot "$1" update-ca-certificates',
        ]
        changes += ["--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt"]
    with timed("make the base: mmdebstrap bookworm + docker import"):
        logged(
            [
                "mmdebstrap",
                "--variant=apt",
                f"--include={','.join(BASE_PACKAGES)}",
                *hooks,
                "bookworm",
                str(tar),
            ],
            STATE / "mmdebstrap.log",
            timeout=900,
        )
        docker(
            "import",
            *changes,
            "--change",
            f"LABEL io.trainer.recipe={recipe}",
            str(tar),
            BASE,
            timeout=300,
        )
        tar.unlink()
    return BASE


def git(*args: str) -> str:
    proc = run(["git", "-C", str(ROOT), *args], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


@dataclass
class Built:
    tag: str
    version: str
    revision: str
    source: str


@pytest.fixture(scope="session")
def image(docker: Docker, base_image: str) -> Built:
    """The CPU image, built from the Dockerfile on the local base."""
    STATE.mkdir(exist_ok=True)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    revision = git("rev-parse", "HEAD") or "unknown"
    source = git("config", "--get", "remote.origin.url") or str(ROOT)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with timed("build the CPU image"):
        logged(
            [
                "docker",
                "build",
                "--network=host",  # pip and apt reach their package indexes from the host
                f"--build-arg=BASE={base_image}",
                f"--build-arg=VERSION={version}",
                f"--build-arg=REVISION={revision}",
                f"--build-arg=SOURCE={source}",
                f"--build-arg=CREATED={created}",
                f"--tag={IMAGE}",
                str(ROOT),
            ],
            STATE / "build-trainer.log",
            env=docker.env,
            timeout=1800,
        )
    return Built(IMAGE, version, revision, source)


def build_support_image(docker: Docker, base_image: str, name: str) -> str:
    """PostgreSQL or Prometheus from Debian's packages, on the local base."""
    tag = f"trainer-{name}:local"
    with timed(f"build the {name} image"):
        logged(
            [
                "docker",
                "build",
                "--network=host",
                f"--build-arg=BASE={base_image}",
                f"--file={HERE / f'{name}.Dockerfile'}",
                f"--tag={tag}",
                str(HERE),
            ],
            STATE / f"build-{name}.log",
            env=docker.env,
            timeout=900,
        )
    return tag


# ---------------------------------------------------------------- containers


@dataclass
class Container:
    docker: Docker
    name: str
    ports: dict[int, int] = field(default_factory=dict)

    def inspect(self) -> dict:
        return json.loads(self.docker("inspect", self.name).stdout)[0]

    def logs(self) -> str:
        proc = self.docker("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def port(self, inside: int) -> int:
        if inside not in self.ports:
            out = self.docker("port", self.name, f"{inside}/tcp").stdout.split()[0]
            self.ports[inside] = int(out.rsplit(":", 1)[1])
        return self.ports[inside]

    def health(self) -> str:
        return self.inspect()["State"].get("Health", {}).get("Status", "none")

    def wait_health(self, want: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        status = self.health()
        while status != want and time.monotonic() < deadline:
            if not self.inspect()["State"]["Running"]:
                break
            time.sleep(0.5)
            status = self.health()
        return status

    def wait_log(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = self.logs()
            if text in logs:
                return logs
            if not self.inspect()["State"]["Running"]:
                break
            time.sleep(0.5)
        raise StepFailed(f"{self.name} never logged {text!r}:\n{self.logs()[-3000:]}")

    def wait_exit(self, timeout: float = 120) -> int:
        proc = self.docker("wait", self.name, timeout=timeout)
        return int(proc.stdout.strip())


@contextlib.contextmanager
def container(
    docker: Docker, image: str, *args: str, options: tuple[str, ...] = ()
) -> Iterator[Container]:
    """docker run -d on the tests' network; removed, volumes and all, on the way out."""
    name = f"trainer-test-{uuid.uuid4().hex[:8]}"
    docker("run", "--detach", f"--name={name}", f"--network={docker.network}", *options,
           image, *args)  # fmt: skip
    try:
        yield Container(docker, name)
    finally:
        docker("rm", "--force", "--volumes", name, check=False)


def http_get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()
