# PYTHON_ARGCOMPLETE_OK  (argcomplete's global completion looks for this marker)
"""The `trainer` command's client side: submit, jobs, show, watch, cancel, download, plot,
health, validate (no server, no TensorFlow) and completion. The server's commands (serve,
worker, migrate, train, ...) are added by the service package through the `stepstream.commands`
entry points, and on a client-only install say which extra to install.

Data goes to stdout (`-o table|json|yaml` on the commands that read); progress, messages and
errors go to stderr. Jobs are named by id, a unique id prefix, or a unique display name."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

from stepstream.kernel.events import Event
from stepstream.kernel.spec import JobSpec, Problem, SpecError

DEFAULT_ADDRESS = "localhost:50051"
STATE_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 3}
# Exit codes: 0 done, 1 the job failed, 2 bad input, 3 the job was cancelled, 4 the server
# refused or could not be reached, 5 the store's schema (server side), 130 interrupted.
EXIT_USAGE, EXIT_SERVER, EXIT_INTERRUPTED = 2, 4, 130
FORMATS = ("table", "json", "yaml")


class CliError(Exception):
    """A failure the command explains in its own words: printed as is, no traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- human times


def human_duration(seconds: float | None, parts: int = 2) -> str:
    """'42s', '3m 12s', '2h 5m', '3d 4h' (at most `parts` units, consecutive ones); under ten
    seconds '4.2s' or '13ms' when `parts` > 1; '-' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(seconds, 0.0)
    if parts > 1 and seconds < 10:
        return f"{seconds:.1f}s" if seconds >= 0.1 else f"{seconds * 1000:.0f}ms"
    left, pieces = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or pieces:
            pieces.append((left // size, unit))
            left %= size
            if len(pieces) == parts:
                break
    if not pieces:
        return "0s"
    return " ".join(f"{n}{u}" for i, (n, u) in enumerate(pieces) if n or i == 0)


def human_age(t: float | None, now: float | None = None) -> str:
    """How long ago `t` (unix seconds) was: 'just now', '3m ago', '2h ago', or a date."""
    if t is None:
        return "-"
    now = time.time() if now is None else now
    age = now - t
    if age < 5:
        return "just now"
    if age >= 30 * 86400:
        return datetime.fromtimestamp(t).strftime("%Y-%m-%d")
    return f"{human_duration(age, parts=1)} ago"


def iso_time(t: float | None) -> str | None:
    """Unix seconds as ISO-8601 UTC with milliseconds: 2026-11-30T12:34:56.789Z."""
    if t is None:
        return None
    return (
        datetime.fromtimestamp(t, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _local_time(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def run_seconds(info: Any, now: float | None = None) -> float | None:
    """How long a job has run: start to end, or start to now while it runs."""
    if info.start_time is None:
        return None
    end = info.end_time if info.end_time is not None else (time.time() if now is None else now)
    return end - info.start_time


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


# ---------------------------------------------------------------- output formats


def plain(value: Any) -> Any:
    """A JSON/YAML-ready copy: enums as names, dataclasses (failures) as mappings, NaN and
    infinities as null, no Python reprs."""
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        if to_dict is not None:
            return plain(to_dict())
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def job_record(info: Any) -> dict[str, Any]:
    """One job as `-o json|yaml` print it: every JobInfo field, states as names, times
    (`*_time`) as ISO-8601 UTC, plus `run_seconds` once it has ended."""
    record = plain(info)
    for key in record:
        if key.endswith("_time"):
            record[key] = iso_time(getattr(info, key))
    ended = info.end_time is not None and info.start_time is not None
    record["run_seconds"] = plain(info.end_time - info.start_time) if ended else None
    return record


def dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, allow_nan=False)
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip("\n")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[str] = ()) -> str:
    """Columns as wide as their widest cell, two spaces apart; `right` ones right-aligned."""
    rows = [list(r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    right = set(right)

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if h in right else c.ljust(w)
            for c, w, h in zip(cells, widths, headers, strict=True)
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def jobs_table(infos: Sequence[Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = []
    for j in infos:
        step = f"{j.step}/{j.total_steps}" if j.total_steps else str(j.step)
        started = j.step > 0
        rows.append(
            [
                j.id,
                j.display_name,
                str(j.state),
                step,
                _num(j.loss) if started else "-",
                _num(j.accuracy) if started else "-",
                _num(j.mae) if started else "-",
                human_age(j.create_time, now),
                human_duration(run_seconds(j, now)),
            ]
        )
    headers = ["ID", "NAME", "STATE", "STEP", "LOSS", "ACC", "MAE", "CREATED", "DURATION"]
    return table(headers, rows, right=("STEP", "LOSS", "ACC", "MAE", "DURATION"))


def job_view(info: Any, now: float | None = None) -> str:
    """`trainer show -o table`: a job for people to read."""
    now = time.time() if now is None else now
    rows: list[tuple[str, str]] = [
        ("Job", info.id),
        ("Name", info.display_name),
        ("State", str(info.state)),
    ]
    if info.labels:
        rows.append(("Labels", ", ".join(f"{k}={v}" for k, v in sorted(info.labels.items()))))
    step = f"{info.step}/{info.total_steps}" if info.total_steps else str(info.step)
    rows.append(("Step", step))
    if info.step:
        rows.append(("Loss", _num(info.loss)))
        if info.accuracy is not None:
            rows.append(("Accuracy", _num(info.accuracy)))
        if info.mae is not None:
            rows.append(("MAE", _num(info.mae)))
    if info.test_metrics:
        rows.append(("Test", "  ".join(f"{k} {_num(v)}" for k, v in info.test_metrics.items())))
    if info.failure is not None:
        at = f" at step {info.failure.step}" if info.failure.step is not None else ""
        rows.append(("Failure", f"{info.failure.reason}{at}: {info.failure.message}"))
    rows.append(("Attempts", f"{info.attempts}/{info.max_attempts}"))
    rows.append(("Priority", str(info.priority)))
    if info.worker:
        rows.append(("Worker", info.worker))
    if info.create_time is not None:
        rows.append(
            ("Created", f"{_local_time(info.create_time)} ({human_age(info.create_time, now)})")
        )
    if info.start_time is not None:
        waited = info.start_time - info.create_time if info.create_time is not None else None
        queued = f" (queued {human_duration(waited)})" if waited is not None else ""
        rows.append(("Started", f"{_local_time(info.start_time)}{queued}"))
    if info.end_time is not None:
        rows.append(("Ended", f"{_local_time(info.end_time)} ({human_age(info.end_time, now)})"))
    if info.start_time is not None:
        running = "" if info.end_time is not None else " so far"
        rows.append(("Duration", human_duration(run_seconds(info, now)) + running))
    if info.model_available:
        rows.append(("Model", f"available: trainer download {info.id}"))
    if info.spec:
        rows.append(("Spec", _spec_summary(info.spec) + "  (all of it: -o yaml)"))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k + ':':<{width}}{v}" for k, v in rows)


def _spec_summary(spec: dict[str, Any]) -> str:
    def name(value: Any, key: str) -> str:
        return str(value.get(key, "?")) if isinstance(value, dict) else str(value or "?")

    parts = [
        name(spec.get("model"), "architecture"),
        name(spec.get("loss"), "name"),
        name(spec.get("optimizer"), "name"),
        name(spec.get("dataset"), "name"),
    ]
    return ", ".join(parts)


# ---------------------------------------------------------------- progress

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
            "stats": f" loss {_num(loss)} {self.metric} {_num(value)}",
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


# ---------------------------------------------------------------- job files


@dataclasses.dataclass(frozen=True)
class FileProblem:
    """A problem of a job file, where it is: line and column count from 1 (0: not known)."""

    file: str
    field: str
    message: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        if self.field in ("", "<root>", "<file>"):
            return f"{where}: {self.message}"
        return f"{where}: {self.field}: {self.message}"


class SpecFileError(CliError):
    def __init__(self, problems: list[FileProblem]):
        super().__init__("\n".join(str(p) for p in problems), EXIT_USAGE)
        self.problems = problems


def locate(node: Any, field: str) -> tuple[int, int] | None:
    """(line, column), from 1, of the deepest key or item of YAML `node` on `field`'s path
    ("training.steps", "model.layers.2.units"); None when not even its first part is there."""
    import yaml

    where = None
    for part in field.split("."):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    where, node = key.start_mark, value
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and part.isdigit():
            if int(part) >= len(node.value):
                break
            node = node.value[int(part)]
            where = node.start_mark
        else:
            break
    return (where.line + 1, where.column + 1) if where is not None else None


def read_spec_file(
    path: str, stdin: TextIO | None = None
) -> tuple[JobSpec | None, list[FileProblem]]:
    """Parse and validate a job file (`-` for stdin): the spec, or every problem at its line."""
    import yaml

    name = "<stdin>" if path == "-" else path
    try:
        text = (stdin or sys.stdin).read() if path == "-" else Path(path).read_text("utf-8")
    except OSError as exc:
        return None, [FileProblem(name, "<file>", f"cannot read: {exc.strerror}")]
    except UnicodeDecodeError as exc:
        return None, [FileProblem(name, "<file>", f"not UTF-8 text: {exc.reason}")]
    node = None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, [
                FileProblem(name, "<file>", f"invalid JSON: {exc.msg}", exc.lineno, exc.colno)
            ]
        try:  # JSON is (nearly all) YAML: its nodes give the lines of the fields
            node = _compose(text, name)
        except yaml.YAMLError:
            node = None
    else:
        loader = yaml.SafeLoader(text)
        loader.name = name  # marks name the file, not "<unicode string>"
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = exc.problem or exc.context or "cannot be read"
            if exc.context and exc.problem:
                start = exc.context_mark
                at = f" that starts at line {start.line + 1}" if start else ""
                what = f"{exc.problem} ({exc.context}{at})"
            line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
            return None, [FileProblem(name, "<file>", f"invalid YAML: {what}", line, col)]
        except yaml.YAMLError as exc:
            return None, [FileProblem(name, "<file>", f"invalid YAML: {exc}")]
        finally:
            loader.dispose()
    try:
        return JobSpec.parse(data if data is not None else {}), []
    except SpecError as exc:
        placed = [_placed(name, node, p) for p in exc.problems]
        return None, sorted(placed, key=lambda p: p.line)  # in the file's order


def _compose(text: str, name: str) -> Any:
    import yaml

    loader = yaml.SafeLoader(text)
    loader.name = name
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _placed(name: str, node: Any, problem: Problem) -> FileProblem:
    where = locate(node, problem.field) if node is not None and problem.field != "<root>" else None
    line, col = where or (0, 0)
    return FileProblem(name, problem.field, problem.message, line, col)


def load_spec_file(path: str) -> JobSpec:
    """The spec in a job file, or SpecFileError naming the file and line of every problem."""
    spec, problems = read_spec_file(path)
    if spec is None:
        raise SpecFileError(problems)
    return spec


# ---------------------------------------------------------------- naming jobs

FULL_ID = re.compile(r"^(jobs/.+|job-[0-9a-f]{20})$")
_ID_PREFIX = re.compile(r"^(job-)?[0-9a-f]+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def match_jobs(text: str, infos: Iterable[Any]) -> list[Any]:
    """The jobs whose id starts with `text` (with or without its 'job-') or whose display name
    is `text`, each once, in the order given."""
    prefix = text if text.startswith("job-") else f"job-{text}"
    id_like = bool(_ID_PREFIX.match(text))
    out, seen = [], set()
    for info in infos:
        if info.id in seen:
            continue
        if info.display_name == text or (id_like and info.id.startswith(prefix)):
            seen.add(info.id)
            out.append(info)
    return out


def resolve_job(client: Any, text: str) -> str:
    """The full id `text` names: a full id as is; else a unique id prefix or display name
    (found with ListJobs). None found, or several, is a CliError that lists them."""
    if FULL_ID.match(text):
        return text.removeprefix("jobs/")
    candidates: Iterable[Any] = []
    if _ID_PREFIX.match(text):  # every job: ListJobs cannot filter by id
        candidates = client.jobs(page_size=1000)
    elif _NAME.match(text):
        candidates = client.jobs(name=text, page_size=1000)
    found = match_jobs(text, candidates)
    if len(found) == 1:
        return found[0].id
    if not found:
        raise CliError(f"no job has the id or the name {text!r} (see `trainer jobs`)", EXIT_SERVER)
    shown = found[:10]
    rows = [[j.id, j.display_name, str(j.state), human_age(j.create_time)] for j in shown]
    lines = table(["ID", "NAME", "STATE", "CREATED"], rows).splitlines()
    more = [f"... and {len(found) - len(shown)} more"] if len(found) > len(shown) else []
    listing = "\n".join(f"  {line}" for line in lines + more)
    raise CliError(f"{text!r} names {len(found)} jobs; give more of the id:\n{listing}")


# ---------------------------------------------------------------- gRPC errors

_UNREACHABLE = (
    "failed to connect to all addresses",
    "errors resolving",
    "dns resolution failed",
    "connections to all backends failing",
    "connection refused",
)


def unreachable(details: str) -> bool:
    """Does an UNAVAILABLE status's text say that no server could be reached at all?"""
    text = details.lower()
    return any(marker in text for marker in _UNREACHABLE)


def _why_unreachable(details: str) -> str:
    text = details.lower()
    if "connection refused" in text:
        return "connection refused"
    if "resolv" in text or "domain name not found" in text:
        return "the host name does not resolve"
    if "handshake" in text or "ssl" in text or "tls" in text:
        return "the TLS handshake failed; check --tls and the certificates"
    return details.rsplit(": ", 1)[-1].strip() or "no connection"


def no_server_hint(address: str, details: str = "") -> str:
    reason = f" ({_why_unreachable(details)})" if details else ""
    return (
        f"error: no server answers at {address}{reason}: start one with `trainer serve`, "
        "or pass --address / set TRAINER_ADDRESS"
    )


def field_violations(exc: Any) -> list[tuple[str, str]]:
    """(field, description) of each google.rpc.BadRequest field violation an RPC error carries."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(exc)
    except Exception:  # no details, or a status that does not match the call's
        return []
    out = []
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


def rpc_error_text(exc: Any, address: str) -> str:
    """What to print for a failed RPC: the no-server hint, or the code, the message and (for
    INVALID_ARGUMENT) one line per field violation."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = (exc.details() if callable(getattr(exc, "details", None)) else None) or ""
    name = getattr(code, "name", "UNKNOWN")
    if name == "UNAVAILABLE" and unreachable(details):
        return no_server_hint(address, details)
    violations = field_violations(exc) if name == "INVALID_ARGUMENT" else []
    if not violations:
        return f"error: {name}: {details}" if details else f"error: {name}"
    lines = [f"{f}: {d}" for f, d in violations]
    head = details.splitlines()[0] if details else ""
    if head in lines:  # a violation that is the message itself
        if len(lines) == 1:
            return f"error: {name}: {head}"
        head = ""
    first = f"error: {name}: {head}" if head else f"error: {name}"
    return "\n".join([first, *(f"  {line}" for line in lines)])


# ---------------------------------------------------------------- commands


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


def _validate(args: argparse.Namespace) -> int:
    results = []
    for path in args.files:
        spec, problems = read_spec_file(path)
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
        if spec is not None:
            name = "<stdin>" if path == "-" else path
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
    return STATE_EXIT.get(final or "", 1)


def _submit(args: argparse.Namespace) -> int:
    spec = load_spec_file(args.file)
    with _client(args) as client:
        job = client.submit(spec, priority=args.priority, request_id=args.request_id)
        print(job.name, flush=True)
        if not args.follow:
            return 0
        return _follow(job, spec.step_metric, spec.training.steps or 0, args)


def _watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
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
    with _client(args) as client:
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
    with _client(args) as client:
        info = client.job(resolve_job(client, args.job)).info()
    print(job_view(info) if args.output == "table" else dump(job_record(info), args.output))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.job(resolve_job(client, args.job)).cancel()
    print(f"{info.id}: {info.state}")
    return 0


def _download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        path = client.job(resolve_job(client, args.job)).download_model(args.output)
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
    """Exit 0 when the server says SERVING (grpc.health.v1): for container health checks."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from stepstream.connection import Credentials

    with Credentials(**_credentials(args)).channel(args.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and unreachable(exc.details() or ""):
                print(no_server_hint(args.address, exc.details() or ""), file=sys.stderr)
            else:
                print(f"{args.address}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if args.output == "table":
        print(f"{args.address}: {status}")
    else:
        print(
            dump({"address": args.address, "service": args.service, "status": status}, args.output)
        )
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _completion(args: argparse.Namespace) -> int:
    try:
        import argcomplete
    except ImportError:
        raise CliError("shell completion needs argcomplete: pip install argcomplete") from None
    print(argcomplete.shellcode(["trainer"], shell=args.shell))
    return 0


# ---------------------------------------------------------------- completion helpers


def _complete_jobs(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """Tab completion of job arguments: the ids and names of recent jobs (quietly none when
    the server does not answer within a second or two)."""
    from stepstream.client import TrainingClient

    try:
        with TrainingClient(parsed_args.address, timeout=2, **_credentials(parsed_args)) as c:
            infos = list(itertools.islice(c.jobs(page_size=200), 200))
    except Exception:
        return []
    words = {i.id for i in infos} | {i.display_name for i in infos}
    return sorted(w for w in words if w.startswith(prefix))


def _complete_states(prefix: str, **_: Any) -> list[str]:
    from stepstream.kernel.states import JobState

    return [s.value for s in JobState if s.value.startswith(prefix.upper())]


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
    "download": "examples:\n  trainer download 3f2a\n  trainer download seed-mlp -o model.keras\n",
    "plot": "examples:\n  trainer plot 3f2a -o curves.png --max-points 500\n",
    "health": "examples:\n  trainer health --address trainer.internal:50051 || restart-it\n",
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
        name: str, func, help: str, remote: bool = True, *, epilog: str | None = None
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
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
        action.completer = _complete_jobs  # type: ignore[attr-defined]

    p = command("validate", _validate, "check job files (no server, no TensorFlow)", remote=False)
    p.add_argument("files", nargs="+", metavar="FILE", help="YAML or JSON job files; - for stdin")
    output(p, "table")
    p = command("health", _health, "exit 0 if the server is SERVING (grpc.health.v1)")
    p.add_argument("--service", default="", help="a service name; the server as a whole if empty")
    output(p, "table")
    p = command("submit", _submit, "submit a job file")
    p.add_argument("file", help="a YAML or JSON job file; - for stdin")
    p.add_argument("--follow", "-f", action="store_true", help="stream it with a progress bar")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--request-id", default=None, help="makes retries idempotent")
    p = command("jobs", _jobs, "list jobs, newest first")
    state = p.add_argument("--state", default=None, help="QUEUED, RUNNING, SUCCEEDED, ...")
    state.completer = _complete_states  # type: ignore[attr-defined]
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
    p = command("plot", _plot, "plot a job's loss and accuracy curves")
    job_arg(p)
    p.add_argument("-o", "--output", default="curves.png")
    p.add_argument("--max-points", type=int, default=2000)
    p = command("completion", _completion, "print a shell's tab-completion script", False)
    p.add_argument("shell", choices=("bash", "zsh", "fish"))

    # Commands that run the server side (serve, worker, migrate, ...) come from the packages
    # that provide them, so this module never imports the service.
    for plugin in importlib.metadata.entry_points(group="stepstream.commands"):
        plugin.load()(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions: answer, then exit
        try:
            import argcomplete
        except ImportError:
            pass
        else:
            argcomplete.autocomplete(parser)
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
        print(rpc_error_text(exc, getattr(args, "address", DEFAULT_ADDRESS)), file=sys.stderr)
        return EXIT_SERVER


def _rpc_error() -> type[Exception]:
    import grpc

    return grpc.RpcError


if __name__ == "__main__":
    sys.exit(main())
