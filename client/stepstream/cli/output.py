"""Output for people and for scripts: durations, ages and numbers as people read them, jobs as
a table or a view, and any value as JSON or YAML (`-o table|json|yaml`)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from enum import Enum
from typing import Any

FORMATS = ("table", "json", "yaml")


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


def human_number(value: float | None) -> str:
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
                human_number(j.loss) if started else "-",
                human_number(j.accuracy) if started else "-",
                human_number(j.mae) if started else "-",
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
    if getattr(info, "pending_reason", ""):
        rows.append(("Waiting", f"#{info.queue_position} in the queue: {info.pending_reason}"))
    if info.labels:
        rows.append(("Labels", ", ".join(f"{k}={v}" for k, v in sorted(info.labels.items()))))
    step = f"{info.step}/{info.total_steps}" if info.total_steps else str(info.step)
    rows.append(("Step", step))
    if info.step:
        rows.append(("Loss", human_number(info.loss)))
        if info.accuracy is not None:
            rows.append(("Accuracy", human_number(info.accuracy)))
        if info.mae is not None:
            rows.append(("MAE", human_number(info.mae)))
    if info.test_metrics:
        rows.append(
            ("Test", "  ".join(f"{k} {human_number(v)}" for k, v in info.test_metrics.items()))
        )
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
