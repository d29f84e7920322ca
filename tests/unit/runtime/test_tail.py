"""The event tail: one store read for many watchers, bounded buffers, gauges from events."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from stepstream_service.runtime.metrics import Metrics
from stepstream_service.runtime.tail import BUFFER_LIMIT, RECENT_LIMIT, EventTail
from stepstream_service.store import JobState, NewEvent, NewJob, Store


class CountingStore(Store):
    def __init__(self, url):
        super().__init__(url)
        self.reads = 0

    def events_since(self, event_id, limit=5000):
        self.reads += 1
        return super().events_since(event_id, limit)


@pytest.fixture
def setup(tmp_path):
    store = CountingStore(f"sqlite:///{tmp_path / 'db'}")
    registry = CollectorRegistry()
    tail = EventTail(store, Metrics(registry), poll_seconds=0.01)
    job, _ = store.create_job(NewJob(name="n"))
    store.claim("w", 30)
    yield store, tail, registry, job.id
    store.close()


def steps(first: int, count: int) -> list[NewEvent]:
    return [
        NewEvent(
            "step",
            {
                "step": s,
                "loss": 1.0 / s,
                "accuracy": 0.5,
                "mae": None,
                "learning_rate": 0.1,
                "steps_per_second": 100.0,
                "examples_per_second": 1000.0,
            },
        )
        for s in range(first, first + count)
    ]


def test_many_watchers_cost_one_store_read(setup):
    store, tail, _, job_id = setup
    subs = [tail.subscribe(job_id) for _ in range(50)]
    store.append_events(job_id, "w", steps(1, 10), {})
    store.reads = 0
    assert tail.poll_once()
    assert store.reads == 1
    for sub in subs:
        rows, overflowed = sub.take(timeout=0)
        assert [r.payload["step"] for r in rows if r.kind == "step"] == list(range(1, 11))
        assert not overflowed


def test_a_slow_watcher_is_bounded_and_told_to_catch_up(setup):
    store, tail, _, job_id = setup
    slow, fast = tail.subscribe(job_id), tail.subscribe(job_id)
    for first in range(1, BUFFER_LIMIT * 2, 500):
        store.append_events(job_id, "w", steps(first, 500), {})
        tail.poll_once()
        fast.take(timeout=0)
        assert len(slow.buffer) <= BUFFER_LIMIT
    _, overflowed = slow.take(timeout=0)
    assert overflowed  # it must now read what it missed from the store, by seq


def test_gauges_follow_the_events(setup):
    store, tail, registry, job_id = setup
    store.append_events(job_id, "w", steps(1, 7), {})
    tail.poll_once()
    labels = {"job_id": job_id, "name": "n"}
    assert registry.get_sample_value("trainer_job_step", labels) == 7
    assert registry.get_sample_value("trainer_job_loss", labels) == pytest.approx(1 / 7)
    store.finish(job_id, "w", JobState.SUCCEEDED)
    tail.poll_once()
    assert registry.get_sample_value("trainer_job_completions_total", {"state": "SUCCEEDED"}) == 1
    tail.metrics.forget_ended(0)
    assert registry.get_sample_value("trainer_job_step", labels) is None


def step_numbers(rows) -> list[int]:
    return [r.payload["step"] for r in rows if r.kind == "step"]


def test_a_cut_holds_back_what_came_after_it(setup):
    store, tail, _, job_id = setup
    sub = tail.subscribe(job_id)
    store.append_events(job_id, "w", steps(1, 5), {})
    tail.poll_once()
    cut = tail.cut(job_id, tick=1)
    store.append_events(job_id, "w", steps(6, 5), {})
    tail.poll_once()
    rows, _ = sub.take(timeout=0, upto=cut)
    assert step_numbers(rows) == [1, 2, 3, 4, 5]
    rows, _ = sub.take(timeout=0, upto=cut)  # nothing left up to the cut: the rest comes now
    assert step_numbers(rows) == [6, 7, 8, 9, 10]


def test_watchers_of_one_tick_share_its_cut_and_fall_back_in_step(setup):
    store, tail, _, job_id = setup
    early, late = tail.subscribe(job_id), tail.subscribe(job_id)
    store.append_events(job_id, "w", steps(1, 5), {})
    tail.poll_once()
    early_rows, _ = early.take(timeout=0, upto=tail.cut(job_id, tick=1))
    store.append_events(job_id, "w", steps(6, 5), {})  # a push between the two wakings
    tail.poll_once()
    late_rows, _ = late.take(timeout=0, upto=tail.cut(job_id, tick=1))
    assert [r.id for r in late_rows] == [r.id for r in early_rows]
    store.append_events(job_id, "w", steps(11, 5), {})
    tail.poll_once()
    cut = tail.cut(job_id, tick=2)
    runs = [step_numbers(sub.take(timeout=0, upto=cut)[0]) for sub in (early, late)]
    assert runs == [list(range(6, 16))] * 2


def test_an_overflowed_watcher_is_told_so_whatever_its_cut(setup):
    store, tail, _, job_id = setup
    sub = tail.subscribe(job_id)
    store.append_events(job_id, "w", steps(1, BUFFER_LIMIT + 1), {})
    while tail.poll_once():
        pass
    assert sub.take(timeout=0, upto=tail.cut(job_id, tick=1)) == ([], True)
    assert sub.take(timeout=0) == ([], False)


def test_a_job_without_watchers_keeps_no_cut(setup):
    store, tail, _, job_id = setup
    sub = tail.subscribe(job_id)
    store.append_events(job_id, "w", steps(1, 5), {})
    tail.poll_once()
    tail.cut(job_id, tick=1)
    tail.unsubscribe(sub)
    assert job_id not in tail.recent and job_id not in tail.cuts


def test_a_watcher_attaching_near_the_head_starts_from_memory(setup):
    store, tail, _, job_id = setup
    first = tail.subscribe(job_id)
    store.append_events(job_id, "w", steps(1, 10), {})
    tail.poll_once()
    seq_of = {r.payload["step"]: r.seq for r in first.take(timeout=0)[0] if r.kind == "step"}
    late = tail.subscribe(job_id, after_seq=seq_of[5])
    assert late.seeded
    store.append_events(job_id, "w", steps(11, 2), {})
    tail.poll_once()
    rows, _ = late.take(timeout=0)
    assert [r.seq for r in rows] == list(range(seq_of[6], seq_of[10] + 3))  # no gap or repeat
    assert step_numbers(rows) == list(range(6, 13))
    up_to_date = tail.subscribe(job_id, after_seq=rows[-1].seq)
    assert up_to_date.seeded and up_to_date.take(timeout=0) == ([], False)


def test_a_watcher_from_before_the_recent_rows_reads_the_store(setup):
    store, tail, _, job_id = setup
    first = tail.subscribe(job_id)
    store.append_events(job_id, "w", steps(1, RECENT_LIMIT + 10), {})
    while tail.poll_once():
        pass
    oldest = tail.recent[job_id][0].seq
    assert not tail.subscribe(job_id, after_seq=oldest - 2).seeded
    assert tail.subscribe(job_id, after_seq=oldest - 1).seeded
    assert not tail.subscribe(job_id).seeded  # no seq given: nothing to seed from
    assert first.take(timeout=0)[1] is False


def test_the_recent_rows_go_with_the_last_watcher(setup):
    store, tail, _, job_id = setup
    sub = tail.subscribe(job_id)
    store.append_events(job_id, "w", steps(1, 5), {})
    tail.poll_once()
    assert len(tail.recent[job_id]) >= 5
    tail.unsubscribe(sub)
    assert job_id not in tail.recent
    assert not tail.subscribe(job_id, after_seq=0).seeded  # a new window starts empty
