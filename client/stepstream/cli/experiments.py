"""`trainer experiment ...`: submit (and follow), watch, show, list, cancel and plot experiments,
the searches whose every trial is a job. `add_commands` hangs them on the parser."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stepstream.cli.completion import complete_experiment_states, complete_experiments
from stepstream.cli.errors import EXIT_INTERRUPTED, STATE_EXIT
from stepstream.cli.experiment_views import (
    LiveTrials,
    experiment_record,
    experiment_view,
    experiments_table,
)
from stepstream.cli.names import resolve_experiment
from stepstream.cli.output import dump
from stepstream.cli.progress import terminal_width
from stepstream.cli.remote import DEFAULT_ADDRESS, connect
from stepstream.cli.spec_files import load_experiment_file


def _follow(client: Any, exp_id: str, args: argparse.Namespace, after_seq: int = 0) -> int:
    """The live table of trials until the experiment ends; its state is the exit code. Ctrl-C
    detaches (the experiment keeps running) and says how to come back."""
    out = sys.stdout
    tty = out.isatty()
    rows = _terminal_rows(out) if tty else 24
    live = LiveTrials(out, tty, rows=rows, width=terminal_width(out) - 1)
    final = None
    try:
        for update in client.watch_experiment(exp_id, after_seq):
            live.update(update)
            final = update.experiment
    except KeyboardInterrupt:
        address = "" if args.address == DEFAULT_ADDRESS else f" --address {args.address}"
        print(
            f"\ndetached from {exp_id} (it keeps running); to re-attach:\n"
            f"  trainer experiment watch {exp_id}{address}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if final is None or not final.terminal:  # the stream ended early: ask for the last word
        final = client.get_experiment(exp_id)
    if final.message and final.state != "SUCCEEDED":
        print(f"{exp_id}: {final.message}", file=sys.stderr)
    return STATE_EXIT.get(final.state, 1)


def _terminal_rows(out: Any) -> int:
    import os

    try:
        return os.get_terminal_size(out.fileno()).lines or 24
    except (AttributeError, OSError, ValueError):
        return 24


def _submit(args: argparse.Namespace) -> int:
    spec = load_experiment_file(args.file)
    with connect(args) as client:
        info = client.submit_experiment(spec, request_id=args.request_id, priority=args.priority)
        print(info.id, flush=True)
        if not args.follow:
            return 0
        return _follow(client, info.id, args)


def _watch(args: argparse.Namespace) -> int:
    with connect(args) as client:
        return _follow(client, resolve_experiment(client, args.experiment), args, args.after_seq)


def _show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.get_experiment(resolve_experiment(client, args.experiment))
    text = experiment_view(info) if args.output == "table" else None
    print(text if text is not None else dump(experiment_record(info), args.output))
    return 0


def _list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        found = client.experiments(
            state=args.state, name=args.name, page_size=min(args.limit, 1000) or 1
        )
        infos = []
        for info in found:  # all of them before the first line, so an error prints no header
            if len(infos) >= args.limit:
                break
            infos.append(info)
    if args.output != "table":
        print(dump([experiment_record(i) for i in infos], args.output))
    elif infos:
        print(experiments_table(infos))
    else:
        print("no experiments found", file=sys.stderr)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.cancel_experiment(resolve_experiment(client, args.experiment))
    print(f"{info.id}: {info.state}" + (" (cancel requested)" if not info.terminal else ""))
    return 0


def _plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "trainer experiment plot needs matplotlib: pip install 'stepstream[plot]'",
            file=sys.stderr,
        )
        return 2
    from stepstream.cli.experiment_plot import draw, objective_curve

    with connect(args) as client:
        info = client.get_experiment(resolve_experiment(client, args.experiment))
        curves = {
            t.number: objective_curve(
                client.job(t.job_id).metrics(max_points=args.max_points), info.objective
            )
            for t in info.trials
        }
    if not info.trials:
        print(f"{info.id}: no trials yet", file=sys.stderr)
        return 1
    draw(info, curves, args.output)
    print(args.output)
    return 0


EPILOG = """\
examples:
  trainer experiment submit examples/experiments/sweep.yaml --follow
  trainer experiment list --state RUNNING
  trainer experiment show 3f2a                  the header, then every trial, best first
  trainer experiment show seed-mlp-sweep -o json | jq '.trials[] | {number, value}'
  trainer experiment watch 3f2a                 the live table again; Ctrl-C detaches
  trainer experiment cancel 3f2a
  trainer experiment plot 3f2a -o sweep.png     trial curves and parallel coordinates

Experiments are named by id (exp-3f2a...), a unique prefix of it, or a unique name. Each
trial is a job labelled experiment=<id> trial=<number>: trainer jobs --label experiment=<id>.
--follow and watch exit 0 when the experiment succeeds, 1 failed, 3 cancelled, 130 detached.
"""

_EPILOGS = {
    "submit": """\
examples:
  trainer experiment submit sweep.yaml          prints the experiment's id
  trainer experiment submit sweep.yaml -f       a live table of the trials until it ends
  trainer experiment submit sweep.yaml --request-id sweep-7   a retry never makes a second

The file is checked here first (trainer validate sweep.yaml does only that); its job: may be
inline or the path of a job file beside it.
""",
    "show": "examples:\n  trainer experiment show 3f2a\n"
    "  trainer experiment show seed-mlp-sweep -o yaml\n",
    "plot": "examples:\n  trainer experiment plot 3f2a -o sweep.png --max-points 500\n",
}


def add_commands(sub: Any, command: Any, output: Any) -> None:
    """`trainer experiment COMMAND`: `command(name, func, help, parent=...)` makes each with the
    connection flags, `output(p, default)` adds -o."""
    group = sub.add_parser(
        "experiment",
        help="hyperparameter searches: submit, watch, show, list, cancel, plot",
        description="Hyperparameter searches over a job's fields; every trial is a job.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inner = group.add_subparsers(dest="experiment_command", required=True, metavar="COMMAND")

    def experiment_arg(p: argparse.ArgumentParser) -> None:
        action = p.add_argument(
            "experiment", help="an id, a unique id prefix, or a unique experiment name"
        )
        action.completer = complete_experiments  # type: ignore[attr-defined]

    def sub_command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        return command(name, func, help, parent=inner, epilog=_EPILOGS.get(name, ""))

    p = sub_command("submit", _submit, "submit an experiment file")
    p.add_argument("file", help="a YAML or JSON experiment file; - for stdin")
    p.add_argument("--follow", "-f", action="store_true", help="a live table of its trials")
    p.add_argument("--priority", type=int, default=0, help="each trial job's, unless the file says")
    p.add_argument("--request-id", default=None, help="makes retries idempotent")
    p = sub_command("watch", _watch, "the live table of an experiment's trials")
    experiment_arg(p)
    p.add_argument("--after-seq", type=int, default=0, help="only trials changed after this")
    p = sub_command("show", _show, "an experiment and its trials (-o json|yaml for scripts)")
    experiment_arg(p)
    output(p, "table")
    p = sub_command("list", _list, "list experiments, newest first")
    state = p.add_argument("--state", default=None, help="RUNNING, SUCCEEDED, FAILED, CANCELLED")
    state.completer = complete_experiment_states  # type: ignore[attr-defined]
    p.add_argument("--name", default=None, help="experiments with this name")
    p.add_argument("--limit", type=int, default=50)
    output(p, "table")
    p = sub_command("cancel", _cancel, "cancel an experiment and its running trials")
    experiment_arg(p)
    p = sub_command("plot", _plot, "plot every trial's objective and the search space")
    experiment_arg(p)
    p.add_argument("-o", "--output", default="experiment.png")
    p.add_argument("--max-points", type=int, default=500, help="per trial's curve")
