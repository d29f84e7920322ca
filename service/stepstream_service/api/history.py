"""A job's metric history, as GetJobMetrics answers it: one value per step.

A retry resumes from a checkpoint, so the steps after it were streamed by the attempt that
died and again by the one that went on. Within one attempt steps only increase; a step event
that does not (a "span" begins) supersedes every earlier value from that step on. The history
keeps, for each step, the value of the latest span that reached it: the attempt that finished.

It is read from the store in pages. Points are kept only while they fit in the answer
(`max_points`; all of them when 0); past that, a first pass learns the spans and how many
points there are, and a second pass picks the evenly spread ones, so memory follows the
answer, never the length of the job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from stepstream_service.api.convert import downsample
from stepstream_service.store import EventRow, Store

PAGE = 10_000
# step, loss, accuracy, mae, learning rate
Point = tuple[int, float, float, float, float]


@dataclass
class _Span:
    """Step events of one attempt (or what followed a resume): increasing steps."""

    first: int
    last: int
    missing: list[tuple[int, int]] = field(default_factory=list)  # gaps, both ends included
    cutoff: float = math.inf  # the later spans own every step past this one

    def kept(self) -> int:
        """How many of this span's steps stay in the history."""
        high = min(self.last, self.cutoff)
        if high < self.first:
            return 0
        gaps = sum(min(b, high) - a + 1 for a, b in self.missing if a <= high)
        return int(high - self.first + 1 - gaps)


@dataclass
class History:
    points: list[Point]
    evals: list[dict[str, Any]]
    total: int  # points in the whole history, before any downsampling


def history(store: Store, job_id: str, max_points: int = 0) -> History:
    spans: list[_Span] = []
    evals: list[tuple[int, dict[str, Any]]] = []
    buffer: list[Point] | None = []  # None once more than max_points are kept
    end = 0
    for row in _rows(store, job_id):
        end = row.seq
        if row.kind == "eval":
            evals.append((len(spans) - 1, row.payload))
            continue
        if row.kind != "step":
            continue
        step = row.payload["step"]
        if spans and step > spans[-1].last:
            span = spans[-1]
            if step > span.last + 1:
                span.missing.append((span.last + 1, step - 1))
            span.last = step
        else:
            spans.append(_Span(step, step))
            if buffer:
                while buffer and buffer[-1][0] >= step:
                    buffer.pop()
        if buffer is not None:
            buffer.append(_point(row.payload))
            if 0 < max_points < len(buffer):
                buffer = None
    later = math.inf
    for span in reversed(spans):
        span.cutoff = later - 1
        later = min(later, span.first)
    kept_evals = [e for i, e in evals if i < 0 or e["step"] <= spans[i].cutoff]
    total = sum(span.kept() for span in spans)
    if buffer is not None:
        return History(buffer, kept_evals, len(buffer))
    return History(_pick(store, job_id, spans, end, total, max_points), kept_evals, total)


def _pick(
    store: Store, job_id: str, spans: list[_Span], end: int, total: int, max_points: int
) -> list[Point]:
    """The second pass: the points `downsample` chooses among the `total` kept ones."""
    wanted = iter(downsample(total, max_points))
    want = next(wanted, None)
    picked: list[Point] = []
    index, span, last = 0, -1, None
    for row in _rows(store, job_id, end):
        if want is None:
            break
        if row.kind != "step":
            continue
        step = row.payload["step"]
        if last is None or step <= last:
            span += 1
        last = step
        if step > spans[span].cutoff:
            continue
        if index == want:
            picked.append(_point(row.payload))
            want = next(wanted, None)
        index += 1
    return picked


def _rows(store: Store, job_id: str, end: int | None = None) -> Iterator[EventRow]:
    cursor = 0
    while True:
        rows = store.read_events(job_id, cursor, PAGE)
        for row in rows:
            if end is not None and row.seq > end:
                return
            yield row
        if not rows:
            return
        cursor = rows[-1].seq


def _point(p: dict[str, Any]) -> Point:
    nan = math.nan
    return (
        p["step"],
        p["loss"],
        nan if p["accuracy"] is None else p["accuracy"],
        nan if p["mae"] is None else p["mae"],
        p["learning_rate"],
    )
