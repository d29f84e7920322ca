"""The event tail: one store read for many watchers, bounded buffers, gauges from events."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from trainer_service.metrics import Metrics
from trainer_service.store import JobState, NewEvent, Store
from trainer_service.tail import BUFFER_LIMIT, EventTail


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
    job, _ = store.create_job(name="n", spec={}, spec_hash="h", labels={})
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
