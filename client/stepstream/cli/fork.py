"""`trainer fork JOB`: a new job that starts from a job's newest checkpoint (its weights,
optimizer state and step) with some of its fields changed, linked to it. `add_command` hangs
it on the parser."""

from __future__ import annotations

import argparse
import re
from typing import Any

import yaml

from stepstream.cli.completion import complete_jobs
from stepstream.cli.errors import CliError
from stepstream.cli.names import resolve_job
from stepstream.cli.remote import connect

# YAML 1.1 reads 1e-4 as text (its floats need a dot); a number is meant.
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_value(text: str) -> Any:
    """A --set value as YAML reads it (1e-4, [64, 32], true, null), numbers always numbers."""
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text  # not YAML: the text itself, which the spec's check then judges
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value else number
    return value


def parse_sets(items: list[str]) -> dict[str, Any]:
    """--set PATH=VALUE arguments as {dotted path: value}; a later one wins."""
    out: dict[str, Any] = {}
    for item in items:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            raise CliError(
                f"--set takes PATH=VALUE, e.g. optimizer.learning_rate=1e-4; got {item!r}"
            )
        out[path.strip()] = parse_value(text)
    return out


def _fork(args: argparse.Namespace) -> int:
    from stepstream.client import fork_spec

    changes = parse_sets(args.set)
    with connect(args) as client:
        source = client.job(resolve_job(client, args.job)).info()
        spec = fork_spec(source, changes, steps=args.steps, name=args.name)
        job = client.submit(spec, priority=args.priority, request_id=args.request_id)
        print(job.name, flush=True)
        if not args.follow:
            return 0
        from stepstream.cli.commands import _follow  # as `trainer submit --follow` follows

        return _follow(job, spec.step_metric, spec.training.steps or 0, args)


EPILOG = """\
examples:
  trainer fork 3f2a --set optimizer.learning_rate=1e-4 --steps +2000
  trainer fork seed-mlp --set model.dropout=0.2 --set training.batch_size=64 --steps +500 -f
  trainer fork 3f2a --set init_from.step=4000 --steps +1000   from an older checkpoint
  trainer jobs --label forked_from=job-3f2a...               a job's forks

The fork starts where the job's newest checkpoint is (a job keeps checkpoints when its
training.checkpoint_every is set, and its last step's when it succeeds): the weights, the
optimizer's state and the step counter go on from there, under the new values. --steps +N
trains N more steps (training.steps = the job's step + N); --steps N trains up to step N.
The model's architecture and layer sizes and the optimizer's kind cannot change across a fork.
Each --set value is read as YAML: 1e-4, [64, 32], true, null.
"""


def add_command(command: Any) -> None:
    """`trainer fork`: `command(name, func, help, epilog=...)` makes it with the connection
    flags."""
    p = command(
        "fork",
        _fork,
        "start a new job from a job's newest checkpoint, with changed hyperparameters",
        epilog=EPILOG,
    )
    action = p.add_argument("job", help="an id, a unique id prefix, or a unique display name")
    action.completer = complete_jobs  # type: ignore[attr-defined]
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="a field of the job's spec by its dotted path (repeatable)",
    )
    p.add_argument(
        "--steps",
        default=None,
        metavar="+N|N",
        help="+N: N more steps than the job has trained; N: train up to step N",
    )
    p.add_argument("--name", default=None, help="the new job's name (default: the job's, -fork)")
    p.add_argument("--follow", "-f", action="store_true", help="stream it with a progress bar")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--request-id", default=None, help="makes retries idempotent")
