"""The `trainer` command's client side: submit, jobs, show, watch, cancel, download, plot,
health, and validate (no server, no TensorFlow). The server's commands (serve, worker,
migrate, train, ...) are added by the service package through the `stepstream.commands`
entry points, and on a client-only install say which extra to install."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import math
import sys
import time
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


def print_event(event: Event, bar: ProgressBar, spec: JobSpec | None) -> None:
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
            print_event(event, bar, None)
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
        print(f"{'JOB':<26}{'NAME':<22}{'STATE':<12}{'STEP':>12}{'LOSS':>10}{'ACC':>8}{'MAE':>8}")
        for i, job in enumerate(client.jobs(state=args.state, labels=labels)):
            if i >= args.limit:
                break
            step = f"{job.step}/{job.total_steps}" if job.total_steps else str(job.step)
            print(
                f"{job.id:<26}{job.display_name[:21]:<22}{job.state:<12}{step:>12}"
                f"{job.loss:>10.4f}{_value(job.accuracy):>8}{_value(job.mae):>8}"
            )
    return 0


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


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


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(prog="trainer", description="Model-training service.")
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.metadata.version('stepstream')}",
    )
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
    p = command("health", _health, "exit 0 if the server is SERVING (grpc.health.v1)")
    p.add_argument("--service", default="", help="a service name; the server as a whole if empty")
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

    # Commands that run the server side (serve, worker, migrate, ...) come from the packages
    # that provide them, so this module never imports the service.
    for plugin in importlib.metadata.entry_points(group="stepstream.commands"):
        plugin.load()(command)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        if getattr(args.func, "__module__", __name__) == __name__:
            raise
        print(
            f"trainer {args.command} runs the service, which is not installed here "
            f"(no module {exc.name!r}): pip install 'stepstream[service]'",
            file=sys.stderr,
        )
        return 2
    except SpecError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except _rpc_error() as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 4


def _rpc_error() -> type[Exception]:
    import grpc

    return grpc.RpcError


if __name__ == "__main__":
    sys.exit(main())
