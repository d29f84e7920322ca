"""A job's training progress through tqdm.auto (`ProgressBar`), and how each event of a job's
stream shows around it (`print_event`)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from stepstream.cli.output import human_number
from stepstream.kernel.events import Event

_PROGRESS_CLASS: type | None = None


def _progress_class() -> type:
    """tqdm.auto's class (a widget in notebooks, a line elsewhere), taught our own fields:
    `describe()` gives them at each redraw, `fit()` the width to draw in."""
    global _PROGRESS_CLASS
    if _PROGRESS_CLASS is None:
        from tqdm.auto import tqdm

        class Progress(tqdm):  # type: ignore[misc,valid-type]
            fit: Callable[[], int] | None = None
            describe: Callable[[], dict[str, str]] = staticmethod(  # type: ignore[assignment]
                lambda: {"speed": "? steps/s", "left": "?", "stats": ""}
            )

            @property
            def format_dict(self):  # type: ignore[override]
                if self.fit is not None:
                    self.ncols = self.fit()
                return {**super().format_dict, **self.describe()}

        _PROGRESS_CLASS = Progress
    return _PROGRESS_CLASS


class _Lines:
    """A file for tqdm when nobody watches a terminal (a log, a pipe, CI): each redraw becomes
    one plain line, with no carriage returns and no padding."""

    def __init__(self, out: TextIO):
        self.out = out
        self.last = ""
        self.muted = True  # until the first step: a log needs no "0/N, ? steps/s" line

    @property
    def encoding(self) -> str | None:
        return getattr(self.out, "encoding", None)

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last and not self.muted:
            self.last = line
            self.out.write(line + "\n")

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return False


def terminal_width(out: TextIO) -> int:
    """Columns of the terminal `out` writes to ($COLUMNS first), 80 when unknown."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        columns = os.get_terminal_size(out.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 80
    return columns if columns > 0 else 80  # a pty nobody sized says 0


class ProgressBar:
    """A job's training progress through tqdm.auto: step/total, elapsed and time left, the
    worker's steps/s, loss, and accuracy or mae. On a terminal one line redraws itself, never
    wider than the terminal less a column (nor MAX_WIDTH), padded so that a shorter line leaves
    nothing stale; elsewhere (a log, a pipe) a plain line every LOG_INTERVAL seconds and the
    last one; in a notebook a widget. `total` 0 means unknown (an epoch-based job): the step
    count, without a bar."""

    MAX_WIDTH = 100
    LOG_INTERVAL = 5.0

    def __init__(
        self,
        total: int,
        metric: str = "accuracy",
        out: TextIO | None = None,
        *,
        tty: bool | None = None,
        width: int | None = None,
    ):
        self.out = out if out is not None else sys.stderr
        self.tty = bool(self.out.isatty()) if tty is None else tty
        self.total = total or 0
        self.metric = "mae" if metric == "mae" else "acc"
        self.numbers: tuple[float, float | None, float] | None = None  # loss, metric, steps/s
        cls = _progress_class()
        self.notebook = any(c.__module__ == "tqdm.notebook" for c in cls.__mro__)
        if self.total:
            fmt = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{left}, {speed}]{stats}"
        else:
            fmt = "step {n_fmt} [{elapsed}, {speed}]{stats}"

        def fit() -> int:
            columns = width if width is not None else terminal_width(self.out)
            # One column short of the edge: a full-width line wraps on some terminals.
            return max(min(columns, self.MAX_WIDTH) - 1, 10)

        self.lines = None if self.tty or self.notebook else _Lines(self.out)
        self.bar = cls(
            total=self.total or None,
            file=self.lines or self.out,
            unit="step",
            bar_format=fmt,
            ncols=None if self.notebook else (fit() if self.tty else 80),
            nrows=None if self.notebook else 20,  # one bar: tqdm hides it on a 0-row pty
            ascii=None if self.tty else True,
            mininterval=0.1 if self.tty else self.LOG_INTERVAL,
            miniters=0,
            leave=True,
            disable=False,
            dynamic_ncols=False,
        )
        self.bar.describe = self._fields
        if self.tty and not self.notebook:
            self.bar.fit = fit

    def _fields(self) -> dict[str, str]:
        if self.numbers is None:
            return {"speed": "? steps/s", "left": "?", "stats": ""}
        loss, value, sps = self.numbers
        return {
            "speed": _speed(sps),
            "left": _left(self.total, int(self.bar.n), sps),
            "stats": f" loss {human_number(loss)} {self.metric} {human_number(value)}",
        }

    def update(self, step: int, loss: float, value: float | None, sps: float) -> None:
        """The newest step's numbers; drawn when the bar's interval has passed."""
        self.numbers = (loss, value, sps)
        if self.lines is not None:
            self.lines.muted = False
        delta = step - self.bar.n
        if delta >= 0:
            self.bar.update(delta)
        else:  # a retry resumed from an earlier checkpoint
            self.bar.n = step
            self.bar.refresh()

    def step_event(self, event: Any) -> None:
        value = event.mae if self.metric == "mae" else event.accuracy
        self.update(event.step, event.loss, value, event.steps_per_second)

    def write(self, text: str) -> None:
        """A message line above the bar (on a terminal the bar redraws below it)."""
        if self.tty or self.notebook:
            self.bar.write(text, file=self.out)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def close(self) -> None:
        self.bar.close()
        self.out.flush()


def _speed(sps: float) -> str:
    if not sps or not math.isfinite(sps):
        return "? steps/s"
    return f"{sps:,.0f} steps/s" if sps >= 10 else f"{sps:.2f} steps/s"


def _left(total: int, step: int, sps: float) -> str:
    from tqdm import tqdm

    if not total or not sps or not math.isfinite(sps):
        return "?"
    return tqdm.format_interval(max(total - step, 0) / sps)


def print_event(event: Event, bar: ProgressBar) -> None:
    """Steps move the bar; evaluations, checkpoints and log lines print above it."""
    if event.kind == "step":
        bar.step_event(event)
    elif event.kind == "eval":
        values = "  ".join(f"{k} {v:.4f}" for k, v in event.values.items())
        bar.write(f"step {event.step} {event.split}: {values}")
    elif event.kind == "checkpoint":
        bar.write(f"step {event.step}: checkpoint {event.path}".rstrip())
    elif event.kind == "log":
        bar.write(event.message)
