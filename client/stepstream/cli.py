"""The `trainer` command: serve, worker, submit, jobs, show, watch, cancel, download, plot,
and two that need no server: validate (no TensorFlow) and train (runs a job here)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import TextIO

from stepstream.kernel.events import Event
from stepstream.kernel.spec import JobSpec, SpecError, load_spec


class ProgressBar:
    """One self-rewriting line: step, loss, accuracy (or mae), speed and time left."""

    def __init__(self, total: int, out: TextIO = sys.stderr, every: float = 0.1):
        self.total, self.out, self.every = total, out, every
        self.last_draw = self.last_line = 0.0
        self.tty = out.isatty()

    def update(self, step: int, loss: float, metric: str, value: float | None, sps: float):
        now = time.monotonic()
        if now - self.last_draw < self.every and step < self.total:
            return
        self.last_draw = now
        shown = "n/a" if value is None else f"{value:.4f}"
        line = f"loss {loss:.4f}  {metric} {shown}  {sps:,.0f} steps/s"
        if self.total:
            bar = "#" * int(min(step / self.total, 1.0) * 30)
            eta = (self.total - step) / sps if sps > 0 else math.inf
            eta_text = "--" if not math.isfinite(eta) else f"{int(eta) // 60}:{int(eta) % 60:02d}"
            line = f"[{bar:<30}] {step}/{self.total}  {line}  ETA {eta_text}"
        else:  # an epochs-based job: the step count depends on the data, not known here
            line = f"step {step}  {line}"
        if self.tty:
            self.out.write("\r" + line)
        elif step == self.total or now - self.last_line > 5:
            self.last_line = now
            self.out.write(line + "\n")
        self.out.flush()

    def close(self):
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def _print_event(event: Event, bar: ProgressBar, spec: JobSpec | None) -> None:
    if event.kind == "step" and spec is not None:
        value = event.mae if spec.step_metric == "mae" else event.accuracy
        bar.update(event.step, event.loss, spec.step_metric, value, event.steps_per_second)
        return
    if bar.tty and event.kind != "result":
        bar.out.write("\r\033[K")
    if event.kind == "eval":
        values = "  ".join(f"{k} {v:.4f}" for k, v in event.values.items())
        print(f"step {event.step} {event.split}: {values}", file=sys.stderr)
    elif event.kind == "checkpoint":
        print(f"step {event.step}: checkpoint {event.path}".rstrip(), file=sys.stderr)
    elif event.kind == "log":
        print(event.message, file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    try:
        from stepstream_service.engine.datasets import DataPaths
        from stepstream_service.engine.trainer import train
        from stepstream_service.errors import TrainerError
    except ImportError as exc:
        print(f"trainer train needs the service: pip install '.[service]' ({exc})", file=sys.stderr)
        return 2
    bar = ProgressBar(spec.training.steps or 0)

    def emit(event: Event) -> None:
        _print_event(event, bar, spec)

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
            f"{spec.name}: succeeded after {result.steps} steps in {result.duration_s:.1f} s "
            f"({result.stop_reason}); test {test or 'n/a'}; model {result.model_path}"
        )
        return 0
    failure = result.failure.message if result.failure else result.stop_reason
    print(f"{spec.name}: {result.outcome}: {failure}", file=sys.stderr)
    return 1


def _validate(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    print(
        f"{args.file}: valid ({spec.model.architecture}, {spec.loss.name}, "
        f"{spec.optimizer.name}, {spec.dataset.name})"
    )
    return 0


STATE_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 3}


def _client(args: argparse.Namespace):
    from stepstream.client import TrainingClient

    return TrainingClient(args.address, **_credentials(args))


def _credentials(args: argparse.Namespace) -> dict:
    return {
        "token": args.token,
        "tls": args.tls,
        "ca_cert": args.ca_cert,
        "client_cert": args.client_cert,
        "client_key": args.client_key,
    }


def _follow(job, spec_metric: str, total: int, after_seq: int = 0) -> int:
    """Stream a job with a progress bar; the exit code says how it ended."""
    bar = ProgressBar(total)
    final = None
    for event in job.stream(after_seq):
        if event.kind == "step":
            value = event.mae if spec_metric == "mae" else event.accuracy
            bar.update(event.step, event.loss, spec_metric, value, event.steps_per_second)
            continue
        if bar.tty:
            bar.out.write("\r\033[K")
        if event.kind == "state":
            detail = f": {event.failure.reason}: {event.failure.message}" if event.failure else ""
            print(f"{job.id}: {event.state}{detail}", file=sys.stderr)
            final = event.state
        elif event.kind in ("eval", "log", "checkpoint"):
            _print_event(event, bar, None)
    bar.close()
    return STATE_EXIT.get(final or "", 1)


def _submit(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    with _client(args) as client:
        job = client.submit(spec, priority=args.priority, request_id=args.request_id)
        print(job.name)
        if not args.follow:
            return 0
        return _follow(job, spec.step_metric, spec.training.steps or 0)


def _watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job)
        info = job.info()
        spec = JobSpec.parse(info.spec)
        return _follow(job, spec.step_metric, info.total_steps, args.after_seq)


def _jobs(args: argparse.Namespace) -> int:
    labels = dict(kv.split("=", 1) for kv in args.label)
    with _client(args) as client:
        print(f"{'JOB':<26}{'NAME':<22}{'STATE':<12}{'STEP':>12}{'LOSS':>10}{'ACC':>8}")
        for i, job in enumerate(client.jobs(state=args.state, labels=labels)):
            if i >= args.limit:
                break
            step = f"{job.step}/{job.total_steps}" if job.total_steps else str(job.step)
            print(
                f"{job.id:<26}{job.display_name[:21]:<22}{job.state:<12}{step:>12}"
                f"{job.loss:>10.4f}{job.accuracy:>8.4f}"
            )
    return 0


def _show(args: argparse.Namespace) -> int:
    import json

    with _client(args) as client:
        info = client.job(args.job).info()
    out = {k: v for k, v in info.__dict__.items() if k != "spec"}
    out["failure"] = info.failure.__dict__ if info.failure else None
    out["spec"] = info.spec
    print(json.dumps(out, indent=2, default=str))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.job(args.job).cancel()
    print(f"{info.id}: {info.state}")
    return 0


def _download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        path = client.job(args.job).download_model(args.output)
    print(path)
    return 0


def _plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("trainer plot needs matplotlib: pip install '.[plot]'", file=sys.stderr)
        return 2
    with _client(args) as client:
        job = client.job(args.job)
        info, m = job.info(), job.metrics(max_points=args.max_points)
    if not m.steps:
        print(f"{info.id}: no steps recorded yet", file=sys.stderr)
        return 1
    regression = all(math.isnan(a) for a in m.accuracy)
    name = "mae" if regression else "accuracy"
    key = "mean_absolute_error" if regression else "accuracy"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    curves = (
        (ax_loss, m.loss, "loss", "loss"),
        (ax_acc, m.mae if regression else m.accuracy, name, key),
    )
    for ax, series, label, eval_key in curves:
        # Batch values are noisy: drawn faint, with their moving average on top.
        ax.plot(m.steps, series, lw=0.6, alpha=0.35, color="tab:blue", label=f"batch {label}")
        smooth = _moving_average(series, max(len(series) // 50, 1))
        ax.plot(m.steps, smooth, lw=1.6, color="tab:blue", label=f"batch {label}, average")
        for split in sorted({e.split for e in m.evals}):
            evals = [e for e in m.evals if e.split == split and eval_key in e.values]
            ax.plot(
                [e.step for e in evals],
                [e.values[eval_key] for e in evals],
                "o-",
                color="tab:orange",
                label=f"{split} {label}",
            )
        ax.set(xlabel="step", ylabel=label, title=f"{info.display_name}: {label}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(args.output)
    return 0


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _service_settings(args: argparse.Namespace):
    from stepstream_service.config import Settings

    given = {k: getattr(args, k, None) for k in _SERVICE_FLAGS}
    return Settings(**{k: v for k, v in given.items() if v is not None})


_SERVICE_FLAGS = (
    "port",
    "metrics_port",
    "workers",
    "gpus",
    "store",
    "data_dir",
    "host",
    "artifacts",
)


def _until_signalled() -> None:
    import signal
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()


def _serve(args: argparse.Namespace) -> int:
    from stepstream_service.runtime.server import Server
    from stepstream_service.store.schema import SchemaError

    settings = _service_settings(args)
    logging.getLogger().setLevel(logging.INFO)
    try:
        server = Server(settings)
    except SchemaError as exc:
        print(f"trainer serve: {exc}", file=sys.stderr)
        return 5
    server.start()
    workers = len(server.supervisor.slots) if server.supervisor else 0
    store = _safe(settings.store_url)
    print(
        f"trainer serve: grpc {server.host}:{server.port} metrics "
        f"{server.host}:{server.metrics_port} workers {workers} store {store}; "
        f"{server.describe}",
        flush=True,
    )
    _until_signalled()
    server.stop()
    return 0


def _worker(args: argparse.Namespace) -> int:
    """Workers on this machine joining the pool of a shared store: one per GPU, or N."""
    from stepstream_service.runtime.server import Supervisor
    from stepstream_service.store.jobs import Store
    from stepstream_service.store.schema import SchemaError

    settings = _service_settings(args)
    logging.getLogger().setLevel(logging.INFO)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        Store(settings.store_url).close()  # refuse a schema this version does not know, now
    except SchemaError as exc:
        print(f"trainer worker: {exc}", file=sys.stderr)
        return 5
    from prometheus_client import CollectorRegistry, start_http_server

    from stepstream_service.runtime.metrics import WorkerHostMetrics

    registry = CollectorRegistry()
    supervisor = Supervisor(settings, WorkerHostMetrics(registry))
    http = None
    if args.metrics_port is not None:
        http, _ = start_http_server(args.metrics_port, addr=settings.host, registry=registry)
    supervisor.start()
    slots = ", ".join(slot for slot, _ in supervisor.slots)
    metrics = f" metrics {settings.host}:{http.server_port}" if http else ""
    print(f"trainer worker: {slots}{metrics} store {_safe(settings.store_url)}", flush=True)
    _until_signalled()
    supervisor.stop(grace=settings.grace_seconds)
    if http:
        http.shutdown()
    return 0


def _token(args: argparse.Namespace) -> int:
    """A new random token: the client keeps the token, the server's tokens file the digest."""
    from stepstream_service.api.auth import digest, new_token

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


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the server says SERVING (grpc.health.v1): for container health checks."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from stepstream.connection import Credentials

    with Credentials(**_credentials(args)).channel(args.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=5)
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _migrate(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from stepstream_service.store import schema
    from stepstream_service.store.jobs import engine_url

    settings = _service_settings(args)
    if settings.store is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(engine_url(settings.store_url))
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


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(prog="trainer", description="Model-training service.")
    sub = parser.add_subparsers(dest="command", required=True)
    # The one place the client side reads the environment.
    address = os.environ.get("TRAINER_ADDRESS", "localhost:50051")
    token = os.environ.get("TRAINER_TOKEN")

    def command(name: str, func, help: str, remote: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        if remote:
            p.add_argument("--address", default=address, help="host:port of the server")
            p.add_argument("--token", default=token, help="bearer token (or TRAINER_TOKEN)")
            p.add_argument("--tls", action="store_true", help="connect with TLS")
            p.add_argument("--ca-cert", default=None, help="the server's CA (implies --tls)")
            p.add_argument("--client-cert", default=None, help="for mutual TLS, with its key")
            p.add_argument("--client-key", default=None)
        p.set_defaults(func=func)
        return p

    p = command("validate", _validate, "check a job file (no TensorFlow needed)", remote=False)
    p.add_argument("file")
    p = command("train", _train, "run a job file on this machine with a progress bar", False)
    p.add_argument("file")
    p.add_argument("--workdir", default="runs", help="where models and checkpoints go")
    p.add_argument("--data-dir", default=None, help="looked in first for datasets")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    p = command("serve", _serve, "run the server, its workers and the metrics port", False)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--metrics-port", type=int, default=None)
    _store_flags(p)
    p = command("worker", _worker, "run this machine's workers against a shared store", False)
    _store_flags(p)
    p.add_argument("--host", default=None, help="where the metrics port listens")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics, if set")
    p = command("token", _token, "make a bearer token for a tenant", remote=False)
    p.add_argument("tenant")
    p = command("prune", _prune, "delete finished jobs by age or count (never live ones)", False)
    p.add_argument("--store", default=None, help="database URL (default: SQLite in --data-dir)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--artifacts", default=None)
    p.add_argument("--older-than-days", type=float, default=None)
    p.add_argument("--keep", type=int, default=None, help="keep the newest N finished jobs")
    p = command("health", _health, "exit 0 if the server is SERVING (grpc.health.v1)")
    p.add_argument("--service", default="", help="a service name; the server as a whole if empty")
    p = command("migrate", _migrate, "create or upgrade the store's schema", False)
    p.add_argument("--store", default=None, help="database URL (default: SQLite in --data-dir)")
    p.add_argument("--data-dir", default=None)

    p = command("submit", _submit, "submit a job file")
    p.add_argument("file")
    p.add_argument("--follow", "-f", action="store_true", help="stream it with a progress bar")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--request-id", default=None, help="makes retries idempotent")
    p = command("jobs", _jobs, "list jobs, newest first")
    p.add_argument("--state", default=None)
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    p.add_argument("--limit", type=int, default=50)
    p = command("show", _show, "a job's details as JSON")
    p.add_argument("job")
    for name in ("watch", "logs"):
        p = command(name, _watch, "stream a job's events with a progress bar")
        p.add_argument("job")
        p.add_argument("--after-seq", type=int, default=0)
    p = command("cancel", _cancel, "cancel a job")
    p.add_argument("job")
    p = command("download", _download, "download a job's trained model")
    p.add_argument("job")
    p.add_argument("-o", "--output", default=".", help="a file or a folder")
    p = command("plot", _plot, "plot a job's loss and accuracy curves")
    p.add_argument("job")
    p.add_argument("-o", "--output", default="curves.png")
    p.add_argument("--max-points", type=int, default=2000)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SpecError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except _rpc_error() as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 4


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, help="CPU workers when no GPU is used")
    p.add_argument("--gpus", default=None, help="all, none, or a list like 0,1")
    p.add_argument("--store", default=None, help="database URL (default: SQLite in --data-dir)")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--artifacts", default=None, help="models and checkpoints: a folder or fsspec URL"
    )


def _rpc_error() -> type[Exception]:
    import grpc

    return grpc.RpcError


if __name__ == "__main__":
    sys.exit(main())
