"""The `trainer` command's server side: serve, worker, migrate, token, prune, and train (a job
run here, without a server). The client's CLI adds them through the `stepstream.commands`
entry point; everything heavy is imported when a command runs, so a client-only install
still lists them and says what to install."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from stepstream.cli.progress import ProgressBar, print_event
from stepstream.cli.spec_files import load_spec_file
from stepstream.kernel.events import Event

_EPILOGS = {
    "train": """\
examples:
  trainer train examples/linear_regression.yaml
  trainer train job.yaml --workdir runs --resume   continue from the last checkpoint
""",
    "serve": """\
examples:
  trainer serve                                    SQLite in trainer-data/, one CPU worker
  trainer serve --workers 2 --gpus none --port 50051 --metrics-port 9464
  trainer serve --store postgresql://trainer@db/trainer --workers 0   an API replica
  TRAINER_TOKENS_FILE=tokens trainer serve --host 0.0.0.0   reachable from other machines
""",
    "worker": """\
examples:
  trainer worker --store postgresql://trainer@db/trainer --gpus all
  trainer worker --store postgresql://trainer@db/trainer --workers 4 --metrics-port 9465
""",
    "token": "examples:\n  trainer token team-a    then add its digest line to the tokens file\n",
    "prune": """\
examples:
  trainer prune --older-than-days 30
  trainer prune --keep 1000 --store postgresql://trainer@db/trainer
""",
    "migrate": "examples:\n  trainer migrate --store postgresql://trainer@db/trainer\n",
}


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the server's commands through the client's `command(name, func, help, remote)`."""

    def command(name: str, func, help: str, remote: bool) -> argparse.ArgumentParser:
        return add(name, func, help, remote, epilog=_EPILOGS.get(name))

    p = command("train", train_here, "run a job file on this machine with a progress bar", False)
    p.add_argument("file")
    p.add_argument("--workdir", default="runs", help="where models and checkpoints go")
    p.add_argument("--data-dir", default=None, help="looked in first for datasets")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    p = command("serve", _serve, "run the server, its workers and the metrics port", False)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--metrics-host", default=None, help="where the metrics port listens")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="with no tokens file and no client CA, listen on a --host that is not loopback "
        "anyway: anyone who can reach the port may use it (or TRAINER_INSECURE=1)",
    )
    _store_flags(p)
    p = command("worker", _worker, "run this machine's workers against a shared store", False)
    _store_flags(p)
    p.add_argument("--metrics-host", "--host", default=None, help="where the metrics port listens")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics, if set")
    p = command("token", _token, "make a bearer token for a tenant", remote=False)
    p.add_argument("tenant")
    p = command("prune", _prune, "delete finished jobs by age or count (never live ones)", False)
    p.add_argument("--store", default=None, help="database URL (default: SQLite in --data-dir)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--artifacts", default=None)
    p.add_argument("--older-than-days", type=float, default=None)
    p.add_argument("--keep", type=int, default=None, help="keep the newest N finished jobs")
    p = command("migrate", _migrate, "create or upgrade the store's schema", False)
    p.add_argument("--store", default=None, help="database URL (default: SQLite in --data-dir)")
    p.add_argument("--data-dir", default=None)


def train_here(args: argparse.Namespace) -> int:
    spec = load_spec_file(args.file)  # its problems name the file and line
    from stepstream_service.engine.datasets import DataPaths
    from stepstream_service.engine.trainer import train
    from stepstream_service.errors import TrainerError

    bar = ProgressBar(spec.training.steps or 0, spec.step_metric)

    def emit(event: Event) -> None:
        print_event(event, bar)

    paths = DataPaths(data_dir=Path(args.data_dir) if args.data_dir else None)
    workdir = Path(args.workdir) / spec.name
    try:
        result = train(spec, emit, workdir=workdir, paths=paths, resume=args.resume)
    except TrainerError as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("interrupted", file=sys.stderr)
        return 130
    bar.close()
    if result.outcome == "succeeded":
        test = "  ".join(f"{k} {v:.4f}" for k, v in result.test_metrics.items())
        print(
            f"{spec.name}: succeeded after {result.steps} steps in {result.duration_seconds:.1f} s "
            f"({result.stop_reason}); test {test or 'n/a'}; model {result.model_path}"
        )
        return 0
    failure = result.failure.message if result.failure else result.stop_reason
    print(f"{spec.name}: {result.outcome}: {failure}", file=sys.stderr)
    return 1


def _service_settings(args: argparse.Namespace):
    from stepstream_service.config import Settings

    given = {k: getattr(args, k, None) for k in _SERVICE_FLAGS}
    return Settings(**{k: v for k, v in given.items() if v is not None})


_SERVICE_FLAGS = (
    "port",
    "metrics_port",
    "workers",
    "gpus",
    "gpus_per_worker",
    "cpu_devices",
    "gang_host",
    "store",
    "data_dir",
    "host",
    "metrics_host",
    "artifacts",
    "insecure",
)


def _until_signalled() -> None:
    from stepstream_service.runtime.signals import stop_event

    stop_event().wait()


def _serve(args: argparse.Namespace) -> int:
    from stepstream_service.runtime.server import InsecureListen, NoGPUs, Server
    from stepstream_service.store.schema import SchemaError

    settings = _service_settings(args)
    logging.getLogger().setLevel(logging.INFO)
    try:
        server = Server(settings)
    except SchemaError as exc:
        print(f"trainer serve: {exc}", file=sys.stderr)
        return 5
    except (InsecureListen, NoGPUs) as exc:
        print(f"trainer serve: {exc}", file=sys.stderr)
        return 2
    server.start()
    workers = len(server.supervisor.slots) if server.supervisor else 0
    store = _safe(settings.store_url)
    print(
        f"trainer serve: grpc {server.host}:{server.port} metrics "
        f"{server.metrics_host}:{server.metrics_port} workers {workers} store {store}; "
        f"{server.describe}",
        flush=True,
    )
    _until_signalled()
    server.stop()
    return 0


def _worker(args: argparse.Namespace) -> int:
    """Workers on this machine joining the pool of a shared store: one per GPU, or N."""
    from prometheus_client import CollectorRegistry

    from stepstream_service.runtime.metrics import WorkerHostMetrics
    from stepstream_service.runtime.server import NoGPUs, Supervisor, metrics_server
    from stepstream_service.store import Store
    from stepstream_service.store.schema import SchemaError

    settings = _service_settings(args)
    logging.getLogger().setLevel(logging.INFO)
    registry = CollectorRegistry()
    try:  # before anything is created: `--gpus all` with no GPU is an error
        supervisor = Supervisor(settings, WorkerHostMetrics(registry))
    except NoGPUs as exc:
        print(f"trainer worker: {exc}", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        Store(settings.store_url).close()  # refuse a schema this version does not know, now
    except SchemaError as exc:
        print(f"trainer worker: {exc}", file=sys.stderr)
        return 5
    http = None
    if args.metrics_port is not None:
        http = metrics_server(settings, registry, port=args.metrics_port)
    supervisor.start()
    slots = ", ".join(slot for slot, _ in supervisor.slots)
    metrics = f" metrics {settings.metrics_host}:{http.server_port}" if http else ""
    print(f"trainer worker: {slots}{metrics} store {_safe(settings.store_url)}", flush=True)
    _until_signalled()
    supervisor.stop(grace=settings.grace_seconds)
    if http:
        http.shutdown()
    return 0


def _token(args: argparse.Namespace) -> int:
    """A new random token: the client keeps the token, the server's tokens file the digest."""
    from stepstream_service.api.auth import digest, new_token
    from stepstream_service.tenants import tenant_problem

    # The server refuses a tokens file with such a name at start-up: refuse it here first.
    if problem := tenant_problem(args.tenant):
        print(f"trainer token: {problem}", file=sys.stderr)
        return 2
    token = new_token()
    print(f"token (give it to {args.tenant}; it is shown once): {token}")
    print(f"line for the server's tokens file:\n{args.tenant} {digest(token)}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    import time

    from stepstream_service.store.retention import prune

    if args.older_than_days is None and args.keep is None:
        print("trainer prune: say --older-than-days D and/or --keep N", file=sys.stderr)
        return 2
    settings = _service_settings(args)
    before = time.time() - args.older_than_days * 86400 if args.older_than_days else None
    removed = prune(settings, finished_before=before, keep_last=args.keep)
    print(f"deleted {len(removed)} finished job(s) with their events and artifacts")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from stepstream_service.store import schema
    from stepstream_service.store.database import make_engine

    settings = _service_settings(args)
    if settings.store is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.store_url)
    try:
        before, after = schema.upgrade(engine)
    except schema.SchemaError as exc:
        print(f"trainer migrate: {exc}", file=sys.stderr)
        return 5
    finally:
        engine.dispose()
    where = _safe(settings.store_url)
    if before == after:
        print(f"{where}: already at schema revision {after}")
    else:
        print(f"{where}: schema revision {before or 'none'} -> {after}")
    return 0


def _safe(url: str) -> str:
    """The URL with any password hidden, for printing."""
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, help="CPU workers when no GPU is used")
    p.add_argument(
        "--gpus",
        default=None,
        help="all (required: no GPU is an error), auto (GPUs if any, else CPU workers), none, "
        "or a list like 0,1 (default none, or TRAINER_GPUS)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=int,
        default=None,
        help="GPUs each worker holds: jobs with runtime.devices up to it run there (default 1)",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="logical devices each CPU worker splits its CPU into (default 1)",
    )
    p.add_argument(
        "--gang-host",
        default=None,
        help="the host other workers reach this one's replicas at, for jobs across workers "
        "(runtime.machines; default this machine's name, or TRAINER_GANG_HOST)",
    )
    p.add_argument("--store", default=None, help="database URL (default: SQLite in --data-dir)")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--artifacts", default=None, help="models and checkpoints: a folder or fsspec URL"
    )
