"""api.watch: runs without holes, shared ticks, messages built once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from stepstream.v1 import trainer_pb2 as pb
from stepstream_service.api import watch as api
from stepstream_service.store import EventRow


def test_event_conversion():
    row = EventRow(
        1,
        "job-1",
        4,
        "step",
        {
            "step": 7,
            "loss": 0.5,
            "accuracy": None,
            "mae": 0.1,
            "learning_rate": 0.01,
            "steps_per_second": 9.0,
            "examples_per_second": 90.0,
        },
        1000.5,
    )
    ev = api.row_to_proto(row)
    assert ev.seq == 4 and ev.step.step == 7 and not ev.step.HasField("accuracy")
    assert ev.step.mae == pytest.approx(0.1) and ev.time.seconds == 1000
    state = api.row_to_proto(
        EventRow(
            2,
            "job-1",
            5,
            "state",
            {
                "state": "FAILED",
                "attempt": 1,
                "error": {"reason": "non_finite_loss", "message": "m", "step": 3},
            },
            1.0,
        )
    )
    # A row written before the failure had one shape still reads (its key was "error").
    assert state.state_change.state == pb.JOB_STATE_FAILED
    assert state.state_change.failure.step == 3
    assert api.is_terminal(EventRow(3, "job-1", 6, "state", {"state": "CANCELLED"}, 1.0))


@pytest.mark.parametrize(
    ("now", "pace", "wait"),
    [
        (10.25, 0.5, 0.25),
        (10.5, 0.5, 0.0),
        # ceil(now / pace) * pace lands a hair below `now` here: time.sleep would refuse it.
        (1317.8400000000001, 0.01, 0.0),
    ],
)
def test_watchers_wake_on_shared_ticks(now, pace, wait):
    assert api.until_tick(now, pace) == pytest.approx(wait, abs=1e-9)
    assert api.until_tick(now, pace) >= 0.0


def rows(*seqs: int, terminal_at: int | None = None) -> list[EventRow]:
    return [
        EventRow(100 + s, "job-1", s, "state", {"state": "SUCCEEDED"}, 1.0)
        if s == terminal_at
        else EventRow(100 + s, "job-1", s, "step", {"step": s}, 1.0)
        for s in seqs
    ]


@pytest.mark.parametrize(
    ("given", "cursor", "run", "hole"),
    [
        (rows(1, 2, 3, 4), 2, [3, 4], False),  # already seen ones are dropped
        (rows(1, 2, 3), 3, [], False),
        (rows(), 0, [], False),
        (rows(5, 6), 2, [], True),  # 3 and 4 are missing: read them from the store
        (rows(3, 4, 6, 7), 2, [3, 4], True),
        (rows(3, 4, 5, 7, terminal_at=5), 2, [3, 4, 5], False),
    ],
)
def test_a_watcher_sends_the_run_after_its_cursor_and_never_across_a_hole(given, cursor, run, hole):
    got, found_hole = api.next_run(given, cursor)
    assert [r.seq for r in got] == run and found_hole is hole


def test_watchers_waking_together_build_a_message_once(monkeypatch):
    built = []

    def slow_event_to_proto(row):
        built.append(row.id)
        time.sleep(0.001)  # long enough for every thread to arrive while the first builds
        return pb.JobEvent(seq=row.seq)

    monkeypatch.setattr(api, "row_to_proto", slow_event_to_proto)
    rows = [
        EventRow(id=i, job_id="job-x", seq=i, kind="log", payload={}, time=0.0) for i in (1, 2, 3)
    ]
    cache, start = api.ProtoCache(), threading.Barrier(20)

    def watcher() -> bytes:
        start.wait()
        return cache.response(rows)

    with ThreadPoolExecutor(20) as pool:
        sent = list(pool.map(lambda _: watcher(), range(20)))
    assert built == [1, 2, 3]
    assert all(message is sent[0] for message in sent)


def test_runs_that_overlap_convert_each_event_once(monkeypatch):
    built = []

    def counting_event_to_proto(row):
        built.append(row.id)
        return pb.JobEvent(seq=row.seq)

    monkeypatch.setattr(api, "row_to_proto", counting_event_to_proto)
    rows = [
        EventRow(id=i, job_id="job-x", seq=i, kind="log", payload={}, time=0.0) for i in range(1, 7)
    ]
    cache = api.ProtoCache()
    late = pb.WatchJobResponse.FromString(cache.response(rows[2:]))  # caught up further along
    early = pb.WatchJobResponse.FromString(cache.response(rows))
    assert sorted(built) == [1, 2, 3, 4, 5, 6]
    assert [e.seq for e in early.batch.events] == [1, 2, 3, 4, 5, 6]
    assert [e.seq for e in late.batch.events] == [3, 4, 5, 6]
