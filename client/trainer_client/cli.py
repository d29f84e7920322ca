"""The `trainer` command.

`trainer validate FILE` checks a job file with no TensorFlow. `trainer train FILE` runs a job
on this machine with the service's engine (needs `pip install '.[service]'`) and shows a live
progress bar; the server commands (serve, submit, watch, ...) come with the service.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import TextIO

from trainer_client.events import Event
from trainer_client.spec import JobSpec, SpecError, load_spec


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


def _print_event(event: Event, bar: ProgressBar, spec: JobSpec) -> None:
    if event.kind == "step":
        value = event.mae if spec.step_metric == "mae" else event.accuracy
        bar.update(event.step, event.loss, spec.step_metric, value, event.steps_per_second)
        return
    if bar.tty and event.kind != "result":
        bar.out.write("\r\033[K")
    if event.kind == "eval":
        values = "  ".join(f"{k} {v:.4f}" for k, v in event.values.items())
        print(f"step {event.step} {event.split}: {values}", file=sys.stderr)
    elif event.kind == "checkpoint":
        print(f"step {event.step}: checkpoint {event.path}", file=sys.stderr)
    elif event.kind == "log":
        print(event.message, file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    try:
        from trainer_service.datasets import DataPaths
        from trainer_service.errors import TrainerError
        from trainer_service.trainer import train
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer", description="Model-training service.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a job file (no TensorFlow needed)")
    p.add_argument("file")
    p.set_defaults(func=_validate)
    p = sub.add_parser("train", help="run a job file on this machine with a progress bar")
    p.add_argument("file")
    p.add_argument("--workdir", default="runs", help="where models and checkpoints go")
    p.add_argument("--data-dir", default=None, help="looked in first for datasets")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.set_defaults(func=_train)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SpecError as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
