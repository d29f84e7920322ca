"""api.history: one value per step after resumes, read in pages, with or without a limit on
the points answered."""

from __future__ import annotations

import random
import time

import pytest

from stepstream.kernel.events import EvalEvent, LogEvent, StepEvent
from stepstream_service.api import history as module
from stepstream_service.api.convert import downsample
from stepstream_service.api.history import history
from stepstream_service.store import NewEvent, NewJob, Store


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'trainer.db'}")
    yield s
    s.close()


def job_with(store: Store, attempts: list[list[int]], evals=()) -> str:
    """A job whose attempts streamed these steps (loss = attempt number + step / 10000), and
    evaluations given as (attempt, step)."""
    store.create_job(NewJob(name="j"))
    job = store.claim("w1", 60.0)
    for n, steps in enumerate(attempts, start=1):
        events = [NewEvent.of(LogEvent(f"attempt {n}", time.time()))]
        for step in steps:
            events.append(NewEvent.of(StepEvent(step, n + step / 1e4, 0.5, None, 0.1, 1, 1, 0)))
            if (n, step) in evals:
                events.append(NewEvent.of(EvalEvent(step, "validation", {"loss": n}, 0)))
        store.append_events(job.id, "w1", events, {})
    return job.id


def reference(attempts: list[list[int]]) -> list[tuple[int, float]]:
    """The history as plainly as it can be said: a step at or below the last one kept starts
    again from there, dropping what the dead attempt streamed from that step on."""
    kept: list[tuple[int, float]] = []
    for n, steps in enumerate(attempts, start=1):
        for step in steps:
            while kept and kept[-1][0] >= step:
                kept.pop()
            kept.append((step, n + step / 1e4))
    return kept


def answer(store, job_id, max_points=0):
    found = history(store, job_id, max_points)
    return [(p[0], p[1]) for p in found.points], found


def test_one_attempt_is_its_own_history(store):
    job = job_with(store, [list(range(1, 101))])
    points, found = answer(store, job)
    assert points == reference([list(range(1, 101))]) and found.total == 100
    points, found = answer(store, job, 10)
    assert [p[0] for p in points] == [i + 1 for i in downsample(100, 10)]
    assert found.total == 100


@pytest.mark.parametrize("max_points", [0, 7, 80, 1000])
def test_a_resume_keeps_the_later_attempts_values_once(store, max_points):
    attempts = [list(range(1, 61)), list(range(41, 101))]
    job = job_with(store, attempts, evals={(1, 40), (1, 50), (2, 50)})
    points, found = answer(store, job, max_points)
    whole = reference(attempts)
    assert found.total == 100 == len(whole)
    assert points == [whole[i] for i in downsample(100, max_points)]
    assert dict(points).get(50, 2.005) == 2.005  # the second attempt's value
    # The eval at 40 preceded the checkpoint resumed from; the first attempt's one at 50 was
    # superseded.
    assert [(e["step"], e["values"]["loss"]) for e in found.evals] == [(40, 1), (50, 2)]


@pytest.mark.parametrize("max_points", [0, 5])
def test_restarts_gaps_and_short_last_attempts(store, max_points):
    attempts = [
        list(range(1, 31)),  # restarted from 0: all of it superseded
        [*range(1, 11), *range(13, 21)],  # a gap (events given up during an outage)
        list(range(15, 26)),  # resumed from 14, then stopped at 25
    ]
    job = job_with(store, attempts)
    points, found = answer(store, job, max_points)
    whole = reference(attempts)
    assert found.total == len(whole) == 10 + 2 + 11
    assert points == [whole[i] for i in downsample(len(whole), max_points)]


def test_random_histories_match_the_plain_reading(store, monkeypatch):
    monkeypatch.setattr(module, "PAGE", 7)  # many pages, spans across their edges
    rng = random.Random(14)
    for _ in range(20):
        attempts, step = [], 0
        for _ in range(rng.randint(1, 4)):
            start = rng.randint(0, step)
            step = start + rng.randint(1, 40)
            attempts.append(list(range(start + 1, step + 1)))
        job = job_with(store, attempts)
        whole = reference(attempts)
        for max_points in (0, 3, len(whole)):
            points, found = answer(store, job, max_points)
            assert found.total == len(whole)
            assert points == [whole[i] for i in downsample(len(whole), max_points)]


def test_a_long_history_is_answered_without_holding_it(store, monkeypatch):
    """Past max_points, only the answer is held: the points kept never exceed it."""
    attempts = [list(range(1, 3001)), list(range(2001, 5001))]
    job = job_with(store, attempts)
    largest = 0
    real = module._point

    def counting(payload):
        nonlocal largest
        largest += 1
        return real(payload)

    monkeypatch.setattr(module, "_point", counting)
    points, found = answer(store, job, 50)
    assert found.total == 5000 and len(points) == 50
    assert largest <= 50 + 51  # the first pass stops keeping at max_points + 1
