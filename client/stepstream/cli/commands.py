"""The `trainer` command's client commands (submit, jobs, show, watch, cancel, download, plot,
health, validate; `trainer experiment ...` comes from cli.experiments), the parser they hang on
(with the help's examples, and the commands that packages add through the `stepstream.commands`
entry points), and `main`, which runs one and turns its failure into an exit code."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
import math
import os
import shutil
import sys
from pathlib import Path

from stepstream.cli.completion import autocomplete, complete_jobs, complete_states, print_script
from stepstream.cli.errors import (
    EXIT_INTERRUPTED,
    EXIT_SERVER,
    EXIT_USAGE,
    STATE_EXIT,
    CliError,
    no_server_hint,
    rpc_error_text,
    unreachable,
)
from stepstream.cli.experiments import add_commands as add_experiment_commands
from stepstream.cli.fork import add_command as add_fork_command
from stepstream.cli.names import resolve_job
from stepstream.cli.output import FORMATS, dump, job_record, job_view, jobs_table
from stepstream.cli.progress import ProgressBar, print_event
from stepstream.cli.remote import DEFAULT_ADDRESS, connect, credentials
from stepstream.cli.spec_files import load_spec_file, read_spec_file
from stepstream.kernel.experiment import ExperimentSpec
from stepstream.kernel.spec import EXPORT_FORMATS, JobSpec, SpecError

# ---------------------------------------------------------------- commands


def _validate(args: argparse.Namespace) -> int:
    results = []
    for path in args.files:
        spec, problems = read_spec_file(path, experiments=True)
        results.append((path, spec, problems))
    invalid = sum(1 for _, spec, _ in results if spec is None)
    if args.output in ("json", "yaml"):
        data = [
            {
                "file": "<stdin>" if path == "-" else path,
                "valid": spec is not None,
                "problems": [
                    {k: v for k, v in dataclasses.asdict(p).items() if k != "file"}
                    for p in problems
                ],
            }
            for path, spec, problems in results
        ]
        print(dump(data, args.output))
        return EXIT_USAGE if invalid else 0
    for path, spec, problems in results:
        name = "<stdin>" if path == "-" else path
        if isinstance(spec, ExperimentSpec):
            print(
                f"{name}: valid experiment ({len(spec.space)} fields, {spec.sampler.name}, "
                f"{spec.max_trials} trials, {spec.objective.direction} {spec.objective.metric})"
            )
        elif spec is not None:
            print(
                f"{name}: valid ({spec.model.architecture}, {spec.loss.name}, "
                f"{spec.optimizer.name}, {spec.dataset.name})"
            )
        for problem in problems:
            print(problem, file=sys.stderr)
    if invalid and len(results) > 1:
        print(f"{invalid} of {len(results)} files invalid", file=sys.stderr)
    return EXIT_USAGE if invalid else 0


def _reattach(job_id: str, seq: int, args: argparse.Namespace) -> str:
    address = "" if args.address == DEFAULT_ADDRESS else f" --address {args.address}"
    return f"trainer watch {job_id} --after-seq {seq}{address}"


def _follow(job, metric: str, total: int, args: argparse.Namespace, after_seq: int = 0) -> int:
    """Stream a job with a progress bar; the exit code says how it ended. Ctrl-C detaches
    (the job keeps running) and says how to pick up where it left off."""
    bar = ProgressBar(total, metric)
    final, seq = None, after_seq
    try:
        for event in job.stream(after_seq):
            seq = max(seq, event.seq)
            if event.kind == "state":
                detail = (
                    f": {event.failure.reason}: {event.failure.message}" if event.failure else ""
                )
                bar.write(f"{job.id}: {event.state}{detail}")
                final = event.state
            else:
                print_event(event, bar)
    except KeyboardInterrupt:
        bar.close()
        print(
            f"\ndetached from {job.id} (it keeps running); to re-attach:\n"
            f"  {_reattach(job.id, seq, args)}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    bar.close()
    if final is None:  # resumed after the terminal event: the stream had nothing left to say
        final = job.info().state
    return STATE_EXIT.get(final, 1)


def _submit(args: argparse.Namespace) -> int:
    spec = load_spec_file(args.file)
    with connect(args) as client:
        job = client.submit(spec, priority=args.priority, request_id=args.request_id)
        print(job.name, flush=True)
        if not args.follow:
            return 0
        return _follow(job, spec.step_metric, spec.training.steps or 0, args)


def _watch(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.job(resolve_job(client, args.job))
        info = job.info()
        try:
            metric = JobSpec.parse(info.spec).step_metric
        except SpecError:  # a spec this client's version cannot read: ask the numbers
            metric = "mae" if info.mae is not None else "accuracy"
        return _follow(job, metric, info.total_steps, args, args.after_seq)


def _jobs(args: argparse.Namespace) -> int:
    try:
        labels = dict(kv.split("=", 1) for kv in args.label)
    except ValueError:
        raise CliError("--label takes KEY=VALUE") from None
    with connect(args) as client:
        found = client.jobs(
            state=args.state, labels=labels, name=args.name, page_size=min(args.limit, 1000) or 1
        )
        infos = []
        for info in found:  # all of them before the first line, so an error prints no header
            if len(infos) >= args.limit:
                break
            infos.append(info)
    if args.output != "table":
        print(dump([job_record(i) for i in infos], args.output))
    elif infos:
        print(jobs_table(infos))
    else:
        print("no jobs found", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.job(resolve_job(client, args.job)).info()
    print(job_view(info) if args.output == "table" else dump(job_record(info), args.output))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.job(resolve_job(client, args.job)).cancel()
    print(f"{info.id}: {info.state}")
    return 0


def _download(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.job(resolve_job(client, args.job))
        path = job.download_model(args.output, args.format)
    print(path)
    return 0


def _tensorboard(args: argparse.Namespace) -> int:
    """Each job's TensorBoard files in a folder of its own under -o, named for a person
    (display name and short id), so `tensorboard --logdir DIR` shows one run per job."""
    out = Path(args.output)
    with connect(args) as client:
        jobs = [client.job(resolve_job(client, name)).info() for name in args.jobs]
        for info in jobs:
            short = info.id.removeprefix("job-")[:8]
            folder = out / f"{info.display_name}-{short}"
            if folder.exists():
                shutil.rmtree(folder)  # a fresh copy: the job may have gone on since
            client.job(info.id).download_tensorboard(folder)
            print(folder)
    print(f"tensorboard --logdir {out}", file=sys.stderr)
    return 0


def _upload(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=Path(args.path).name) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        with connect(args) as client:
            dataset = client.upload(args.path, args.name, progress=progress)
    print(dataset.path)
    return 0


def _plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("trainer plot needs matplotlib: pip install 'stepstream[plot]'", file=sys.stderr)
        return 2
    with connect(args) as client:
        job = client.job(resolve_job(client, args.job))
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
    """Exit 0 when the server says SERVING (grpc.health.v1): for container health checks.
    With --serve-file, the server that wrote it, checked where others reach it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from stepstream.connection import Credentials

    address, served = args.address, {}
    if args.serve_file is not None:
        address, served = _served_address(args.serve_file)
        if served["tls"] and not (args.tls or args.ca_cert):
            args.tls = True
    with Credentials(**credentials(args)).channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and unreachable(exc.details() or ""):
                print(no_server_hint(address, exc.details() or ""), file=sys.stderr)
            else:
                print(f"{address}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if args.output == "table":
        print(f"{address}: {status}")
    else:
        record = {"address": address, "service": args.service, "status": status}
        if served:
            record.update(serve_file=args.serve_file, pid=served["pid"])
        print(dump(record, args.output))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


def _served_address(path: str) -> tuple[str, dict]:
    """The address at which others reach the server that wrote `path` (`trainer serve` with
    TRAINER_SERVE_FILE), and what it wrote. CliError (exit 1) when there is none, it is not
    running, or it listens where nothing outside its machine can reach it."""
    import ipaddress
    import json

    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        message = f"{path}: no server has started here (nothing written to {path})"
        raise CliError(message, 1) from None
    try:
        record = json.loads(text)
        served = {
            "pid": int(record["pid"]),
            "host": str(record["host"]),
            "port": int(record["port"]),
            "tls": bool(record.get("tls", False)),
        }
    except (ValueError, TypeError, KeyError) as exc:
        raise CliError(f"{path}: not a serve file ({type(exc).__name__}: {exc})", 1) from None
    try:
        os.kill(served["pid"], 0)
    except ProcessLookupError:
        raise CliError(
            f"{path}: the server that wrote it (pid {served['pid']}) is not running", 1
        ) from None
    except PermissionError:
        pass  # alive, as another user
    host = served["host"]
    if host == "localhost" or _is_ip(host, lambda ip: ip.is_loopback):
        raise CliError(
            f"the server listens on {host} only: nothing outside this machine (or container) "
            "can reach it",
            1,
        )
    if host in _WILDCARD_HOSTS:
        # Every interface: check the one a published port or another machine arrives at.
        host = _own_address()
        if host is None:
            host = "127.0.0.1"
            print("this machine has no address but loopback: checking 127.0.0.1", file=sys.stderr)
    bare = host.strip("[]")
    if _is_ip(bare, lambda ip: isinstance(ip, ipaddress.IPv6Address)):
        host = f"[{bare}]"
    return f"{host}:{served['port']}", served


def _is_ip(host: str, test) -> bool:
    import ipaddress

    try:
        return bool(test(ipaddress.ip_address(host.strip("[]"))))
    except ValueError:
        return False


def _own_address() -> str | None:
    """An address of this machine (or container) that is not loopback, if it has one."""
    import contextlib
    import socket

    found: list[str] = []
    with contextlib.suppress(OSError):
        found.append(socket.gethostbyname(socket.gethostname()))
    with contextlib.suppress(OSError):
        found += [a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # sends nothing: picks the interface of the default route
        found.append(s.getsockname()[0])
    for address in found:
        if not _is_ip(address, lambda ip: ip.is_loopback or ip.is_unspecified):
            return address
    return None


# ---------------------------------------------------------------- the parser

EXAMPLES = """\
examples:
  trainer validate examples/*.yaml              check job files, no server needed
  trainer submit examples/mnist_mlp.yaml -f     submit, then follow with a progress bar
  trainer jobs --state RUNNING -o json          running jobs, for scripts
  trainer show 3f2a -o table                    a job by id prefix (or by its name)
  trainer watch seed-mlp                        live steps; Ctrl-C detaches
  trainer cancel 3f2a
  trainer download 3f2a -o model.keras
  trainer experiment submit sweep.yaml -f       a hyperparameter search, its trials live
  trainer serve --workers 2                     run the service here

Jobs are named by id (job-3f2a...), a unique prefix of it (3f2a), or a unique display name.
Remote commands take --address host:port (default $TRAINER_ADDRESS, else localhost:50051).
Exit codes: 0 done, 1 job failed, 2 bad input, 3 job cancelled, 4 server error or no server,
5 store schema, 130 interrupted (a followed job keeps running).
Shell completion: eval "$(trainer completion bash)"   (or zsh, fish)
"""

_EPILOGS = {
    "validate": """\
examples:
  trainer validate job.yaml
  trainer validate examples/*.yaml other.json   every problem of every file, at its line
  trainer validate examples/experiments/sweep.yaml   an experiment file (it has space:)
  generate-job | trainer validate -             from stdin
  trainer validate job.yaml -o json             for editors and CI
""",
    "submit": """\
examples:
  trainer submit job.yaml                       prints the job's name
  trainer submit job.yaml --follow              progress bar; exit 0 ok, 1 failed, 3 cancelled
  trainer submit job.yaml --request-id run-42   a retry never makes a second job
  cat job.yaml | trainer submit - -f

Ctrl-C while following detaches: the job keeps running, and the command to re-attach
(trainer watch JOB --after-seq N) is printed.
""",
    "jobs": """\
examples:
  trainer jobs
  trainer jobs --state RUNNING --label team=vision
  trainer jobs --name seed-mlp -o json | jq '.[].state'
""",
    "show": """\
examples:
  trainer show job-3f2a0c...                    a full id
  trainer show 3f2a -o table                    a unique id prefix, for people
  trainer show seed-mlp -o yaml                 a unique display name, spec included
""",
    "watch": """\
examples:
  trainer watch 3f2a                            replay from the start, then live
  trainer watch seed-mlp --after-seq 1200       resume after the last event seen

Ctrl-C detaches (exit 130) and prints the --after-seq to resume from.
""",
    "cancel": "examples:\n  trainer cancel 3f2a\n  trainer cancel seed-mlp\n",
    "download": """\
examples:
  trainer download 3f2a
  trainer download seed-mlp -o model.keras
  trainer download seed-mlp --format onnx -o model.onnx
  trainer download seed-mlp --format saved_model -o serving/seed-mlp/1   for TF Serving
""",
    "tensorboard": """\
examples:
  trainer tensorboard 3f2a seed-mlp -o runs && tensorboard --logdir runs
""",
    "upload": "examples:\n  trainer upload iris.csv\n  trainer upload photos/ --name flowers\n"
    "  trainer upload mobilenet.weights.h5   # a backbone's weights: model.weights in a spec\n",
    "plot": "examples:\n  trainer plot 3f2a -o curves.png --max-points 500\n",
    "health": """\
examples:
  trainer health --address trainer.internal:50051 || restart-it
  trainer health --serve-file /tmp/trainer-serve.json   a container's HEALTHCHECK, with
                                                        TRAINER_SERVE_FILE set for the server
""",
    "completion": """\
examples:
  eval "$(trainer completion bash)"             in ~/.bashrc
  eval "$(trainer completion zsh)"              in ~/.zshrc
  trainer completion fish | source
""",
}

_EPILOGS["logs"] = _EPILOGS["watch"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer",
        description="Model-training service: submit Keras training jobs, stream every step.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.metadata.version('stepstream')}",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The one place the client side reads the environment.
    address = os.environ.get("TRAINER_ADDRESS", DEFAULT_ADDRESS)
    token = os.environ.get("TRAINER_TOKEN")

    def command(
        name: str,
        func,
        help: str,
        remote: bool = True,
        *,
        epilog: str | None = None,
        parent: argparse._SubParsersAction | None = None,
    ) -> argparse.ArgumentParser:
        p = (parent or sub).add_parser(
            name,
            help=help,
            description=help[:1].upper() + help[1:] + ".",
            epilog=epilog if epilog is not None else _EPILOGS.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if remote:
            p.add_argument("--address", default=address, help="host:port of the server")
            p.add_argument("--token", default=token, help="bearer token (or TRAINER_TOKEN)")
            p.add_argument("--tls", action="store_true", help="connect with TLS")
            p.add_argument("--ca-cert", default=None, help="the server's CA (implies --tls)")
            p.add_argument("--client-cert", default=None, help="for mutual TLS, with its key")
            p.add_argument("--client-key", default=None)
        p.set_defaults(func=func)
        return p

    def output(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument(
            "-o",
            "--output",
            choices=FORMATS,
            default=default,
            help=f"how to print it (default {default})",
        )

    def job_arg(p: argparse.ArgumentParser) -> None:
        action = p.add_argument("job", help="an id, a unique id prefix, or a unique display name")
        action.completer = complete_jobs  # type: ignore[attr-defined]

    p = command("validate", _validate, "check job files (no server, no TensorFlow)", remote=False)
    p.add_argument(
        "files", nargs="+", metavar="FILE", help="YAML or JSON job or experiment files; - for stdin"
    )
    output(p, "table")
    p = command("health", _health, "exit 0 if the server is SERVING (grpc.health.v1)")
    p.add_argument("--service", default="", help="a service name; the server as a whole if empty")
    p.add_argument(
        "--serve-file",
        metavar="FILE",
        default=None,
        help="check the server that wrote FILE (its TRAINER_SERVE_FILE) where others reach it, "
        "instead of --address: unhealthy when none is running or it listens on loopback only",
    )
    output(p, "table")
    p = command("submit", _submit, "submit a job file")
    p.add_argument("file", help="a YAML or JSON job file; - for stdin")
    p.add_argument("--follow", "-f", action="store_true", help="stream it with a progress bar")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--request-id", default=None, help="makes retries idempotent")
    add_fork_command(command)
    p = command("jobs", _jobs, "list jobs, newest first")
    state = p.add_argument("--state", default=None, help="QUEUED, RUNNING, SUCCEEDED, ...")
    state.completer = complete_states  # type: ignore[attr-defined]
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    p.add_argument("--name", default=None, help="jobs with this display name")
    p.add_argument("--limit", type=int, default=50)
    output(p, "table")
    p = command("show", _show, "a job's details (JSON by default; -o table for people)")
    job_arg(p)
    output(p, "json")
    for name, what in (("watch", ""), ("logs", " (the same as watch)")):
        p = command(name, _watch, f"stream a job's events with a progress bar{what}")
        job_arg(p)
        p.add_argument(
            "--after-seq", type=int, default=0, help="resume after this event (Ctrl-C prints it)"
        )
    p = command("cancel", _cancel, "cancel a job")
    job_arg(p)
    p = command("download", _download, "download a job's trained model")
    job_arg(p)
    p.add_argument("-o", "--output", default=".", help="a file or a folder")
    p.add_argument(
        "--format",
        choices=("keras", *EXPORT_FORMATS),
        default="keras",
        help="keras (default), onnx, tflite, or saved_model (a folder, for TF Serving); one the "
        "job did not export is converted on the server",
    )
    p = command("tensorboard", _tensorboard, "download jobs' TensorBoard files, one run each")
    action = p.add_argument("jobs", nargs="+", metavar="JOB", help="ids, prefixes or names")
    action.completer = complete_jobs  # type: ignore[attr-defined]
    p.add_argument("-o", "--output", default="tensorboard", help="the log folder (--logdir)")
    p = command("upload", _upload, "upload a dataset, image folder or weights file (resumes)")
    p.add_argument(
        "path",
        help="a .csv, .parquet, .tfrecord or .npz file, an image folder, or a backbone's "
        ".weights.h5 file",
    )
    p.add_argument("--name", help="the upload's name (the file's name without its extension)")
    p = command("plot", _plot, "plot a job's loss and accuracy curves")
    job_arg(p)
    p.add_argument("-o", "--output", default="curves.png")
    p.add_argument("--max-points", type=int, default=2000)
    add_experiment_commands(sub, command, output)
    p = command("completion", print_script, "print a shell's tab-completion script", False)
    p.add_argument("shell", choices=("bash", "zsh", "fish"))

    # Commands that run the server side (serve, worker, migrate, ...) come from the packages
    # that provide them, so this module never imports the service.
    for plugin in importlib.metadata.entry_points(group="stepstream.commands"):
        plugin.load()(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    autocomplete(parser)  # when the shell asks for completions: answer, then exit
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CliError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `trainer jobs | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except ModuleNotFoundError as exc:
        module = getattr(args.func, "__module__", __name__)
        if module == __package__ or module.startswith(f"{__package__}."):  # a client command
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
        print(rpc_error_text(exc, getattr(args, "address", DEFAULT_ADDRESS)), file=sys.stderr)
        return EXIT_SERVER


def _rpc_error() -> type[Exception]:
    import grpc

    return grpc.RpcError
