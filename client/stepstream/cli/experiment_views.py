"""Experiments for people and for scripts: trials as a table (sorted by the objective, or by
number), an experiment's header, the list of experiments, and the live view that
`trainer experiment submit --follow` keeps: redrawn in place on a terminal, lines elsewhere."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from stepstream.cli.output import human_age, human_number, iso_time, plain, table

PARAMS_WIDTH = 48
STATE_ORDER = ("RUNNING", "SUCCEEDED", "PRUNED", "FAILED", "CANCELLED")


def short_value(value: Any) -> str:
    """A sampled value as short as it reads: 0.004, 1.2e-05, [150], adam."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def short_params(params: dict[str, Any], width: int = PARAMS_WIDTH) -> str:
    """'learning_rate=0.004 hidden_units=[150]': each path by its last part (the whole path where
    two share one), cut to `width` with an ellipsis."""
    lasts = [path.rsplit(".", 1)[-1] for path in params]
    names = [
        last if lasts.count(last) == 1 else path for path, last in zip(params, lasts, strict=True)
    ]
    text = " ".join(
        f"{name}={short_value(v)}" for name, v in zip(names, params.values(), strict=True)
    )
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def better(direction: str) -> int:
    """+1 when larger objective values are better, -1 when smaller are."""
    return 1 if direction == "maximize" else -1


def by_objective(trials: Iterable[Any], direction: str) -> list[Any]:
    """Best first; trials without a value after them, by number."""
    sign = better(direction)

    def key(t: Any) -> tuple[int, float, int]:
        if t.value is None or not math.isfinite(t.value):
            return (1, 0.0, t.number)
        return (0, -sign * t.value, t.number)

    return sorted(trials, key=key)


def trials_table(
    trials: Sequence[Any],
    objective: str,
    *,
    best: int | None = None,
    width: int = PARAMS_WIDTH,
    jobs: bool = True,
) -> str:
    """TRIAL, STATE, PARAMS, the objective, STEP (and JOB), one row per trial as given; the
    best trial's number is starred."""
    rows = []
    for t in trials:
        row = [
            f"{t.number}*" if t.number == best else str(t.number),
            str(t.state),
            short_params(t.params, width),
            human_number(t.value),
            str(t.step) if t.step else "-",
        ]
        rows.append([*row, t.job_id] if jobs else row)
    headers = ["TRIAL", "STATE", "PARAMS", objective.upper() or "VALUE", "STEP"]
    headers += ["JOB"] if jobs else []
    return table(headers, rows, right=("TRIAL", objective.upper() or "VALUE", "STEP"))


def counts_text(counts: dict[str, int]) -> str:
    """'2 running, 10 succeeded, 3 pruned' in the states' order; 'no trials yet' when empty."""
    known = [s for s in STATE_ORDER if counts.get(s)]
    known += sorted(s for s in counts if s not in STATE_ORDER and counts[s])
    return ", ".join(f"{counts[s]} {s.lower()}" for s in known) or "no trials yet"


def best_text(info: Any) -> str:
    if info.best_trial is None:
        return "-"
    text = f"trial {info.best_trial}: {info.objective} {human_number(info.best_value)}"
    job = getattr(info, "best_job_id", None)
    return f"{text}, job {job}" if job else text


def experiment_view(info: Any, now: float | None = None) -> str:
    """`trainer experiment show -o table`: the header, then every trial, best first."""
    now = time.time() if now is None else now
    state = str(info.state)
    if info.cancel_requested and not info.terminal:
        state += " (cancel requested)"
    rows: list[tuple[str, str]] = [
        ("Experiment", info.id),
        ("Name", info.display_name),
        ("State", state),
        ("Objective", f"{info.objective} ({info.direction})"),
        ("Best", best_text(info)),
        ("Trials", f"{sum(info.trial_counts.values())} of {info.max_trials or '?'}: "
                   f"{counts_text(info.trial_counts)}"),
    ]  # fmt: skip
    if info.message:
        rows.append(("Message", info.message))
    if info.study_storage:
        rows.append(("Study", f"optuna-dashboard {info.study_storage}"))
    if info.create_time is not None:
        rows.append(("Created", human_age(info.create_time, now)))
    if info.end_time is not None:
        rows.append(("Ended", human_age(info.end_time, now)))
    width = max(len(k) for k, _ in rows) + 2
    head = "\n".join(f"{k + ':':<{width}}{v}" for k, v in rows)
    if not info.trials:
        return head
    ordered = by_objective(info.trials, info.direction)
    return head + "\n\n" + trials_table(ordered, info.objective, best=info.best_trial)


def experiment_record(info: Any) -> dict[str, Any]:
    """An experiment as `-o json|yaml` print it: every field, times as ISO-8601 UTC, the best
    trial's job, each trial with its times the same way."""
    record = plain(info)
    for key in list(record):
        if key.endswith("_time"):
            record[key] = iso_time(getattr(info, key))
    record["best_job_id"] = getattr(info, "best_job_id", None)
    for out, trial in zip(record.get("trials", []), info.trials, strict=True):
        out["create_time"], out["end_time"] = iso_time(trial.create_time), iso_time(trial.end_time)
    return record


def experiments_table(infos: Sequence[Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = [
        [
            e.id,
            e.display_name,
            str(e.state),
            f"{e.finished_trials}/{e.max_trials or '?'}",
            e.objective,
            human_number(e.best_value),
            str(e.best_trial) if e.best_trial is not None else "-",
            human_age(e.create_time, now),
        ]
        for e in infos
    ]
    headers = ["ID", "NAME", "STATE", "TRIALS", "OBJECTIVE", "BEST", "TRIAL", "CREATED"]
    return table(headers, rows, right=("TRIALS", "BEST", "TRIAL"))


def trial_line(trial: Any, objective: str) -> str:
    """One trial as a log line: 'trial 3 PRUNED lr=0.004 test_accuracy 0.8123 step 600'."""
    parts = [f"trial {trial.number}", str(trial.state), short_params(trial.params)]
    if trial.value is not None:
        parts.append(f"{objective} {human_number(trial.value)}")
    if trial.step:
        parts.append(f"step {trial.step}")
    if trial.reason and trial.terminal:
        parts.append(f"({trial.reason})")
    return "  ".join(p for p in parts if p)


def summary_line(info: Any) -> str:
    """The experiment in one line: its state, its trials per state, its best."""
    text = f"{info.id} {info.state}: {counts_text(info.trial_counts)}"
    if info.best_trial is not None:
        text += f"; best trial {info.best_trial}, {info.objective} {human_number(info.best_value)}"
    if info.cancel_requested and not info.terminal:
        text += "; cancel requested"
    return text


class LiveTrials:
    """The trials of an experiment as its watch updates come. On a terminal: a summary line and
    the table by trial number, redrawn in place, the newest trials when they outgrow the
    screen. Elsewhere: a line each time a trial starts or ends, and each time the experiment's
    summary changes."""

    def __init__(self, out: TextIO, tty: bool, *, rows: int = 24, width: int = 100):
        self.out, self.tty, self.rows, self.width = out, tty, rows, width
        self.trials: dict[int, Any] = {}
        self.info: Any = None
        self.drawn = 0  # lines the last redraw left on the screen
        self.printed: dict[int, str] = {}  # trial number -> the state last printed
        self.last_summary = ""

    def update(self, update: Any) -> None:
        self.info = update.experiment
        for trial in update.trials:
            self.trials[trial.number] = trial
        if self.tty:
            self.redraw()
        else:
            self.lines(update.trials)

    def lines(self, changed: Iterable[Any]) -> None:
        objective = self.info.objective
        for trial in sorted(changed, key=lambda t: t.number):
            if self.printed.get(trial.number) != trial.state:
                self.printed[trial.number] = trial.state
                self.out.write(trial_line(trial, objective) + "\n")
        summary = summary_line(self.info)
        if summary != self.last_summary:
            self.last_summary = summary
            self.out.write(summary + "\n")
        self.out.flush()

    def render(self) -> list[str]:
        """The lines a redraw shows: the summary, then the table of the newest trials that fit."""
        info = self.info
        head = [summary_line(info)[: self.width]]
        trials = [self.trials[n] for n in sorted(self.trials)]
        room = max(self.rows - 4, 1)  # the summary, the table's header, a "more" line, a spare
        hidden = len(trials) - room if len(trials) > room else 0
        if not trials:
            return head
        params = max(min(PARAMS_WIDTH, self.width - 50), 12)
        body = trials_table(
            trials[hidden:], info.objective, best=info.best_trial, width=params, jobs=False
        )
        lines = [line[: self.width] for line in body.splitlines()]
        more = [f"({hidden} earlier trials not shown)"] if hidden else []
        return head + more + lines

    def redraw(self) -> None:
        lines = self.render()
        # Back to where the last redraw started, then clear below: a line that got shorter
        # leaves nothing stale.
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.out.write(up + "\x1b[J" + "\n".join(lines) + "\n")
        self.out.flush()
        self.drawn = len(lines)
