"""store.experiments: experiments, their trials (each with its job), leases and seqs."""

from __future__ import annotations

import time

import pytest

from stepstream.kernel.states import ExperimentState, JobState, TrialState
from stepstream_service.store import NewExperiment, NewJob
from stepstream_service.store.errors import (
    AlreadyExists,
    ExperimentFinished,
    ExperimentNotFound,
)


def experiment(store, name="sweep", request_id=None, spec_hash="h", tenant=""):
    exp, _ = store.create_experiment(
        NewExperiment(
            name=name,
            spec={"name": name},
            spec_hash=spec_hash,
            request_id=request_id,
            tenant=tenant,
        )
    )
    return exp


def job(name="t", tenant=""):
    return NewJob(name=name, spec={"name": name}, labels={"experiment": "x"}, tenant=tenant)


def test_an_experiment_starts_running_with_a_prefixed_id(store):
    exp = experiment(store)
    assert exp.id.startswith("exp-") and exp.state == ExperimentState.RUNNING
    assert store.get_experiment(exp.id) == exp
    assert [e.id for e in store.list_experiments()] == [exp.id]


def test_a_repeated_request_id_returns_the_first_unless_the_spec_differs(store):
    first = experiment(store, request_id="r1")
    assert experiment(store, request_id="r1").id == first.id
    with pytest.raises(AlreadyExists):
        experiment(store, request_id="r1", spec_hash="other")


def test_another_tenants_experiment_is_not_found(store):
    exp = experiment(store, tenant="a")
    with pytest.raises(ExperimentNotFound):
        store.get_experiment(exp.id, tenant="b")
    assert store.list_experiments(tenant="b") == []


def test_a_trial_comes_with_its_job_and_its_number_is_used_once(store):
    exp = experiment(store)
    trial, created = store.add_trial(exp.id, 0, {"optimizer.learning_rate": 0.1}, job())
    assert created.state == JobState.QUEUED and trial.job_id == created.id
    assert trial.state == TrialState.RUNNING and trial.params == {"optimizer.learning_rate": 0.1}
    again, same = store.add_trial(exp.id, 0, {"optimizer.learning_rate": 0.2}, job())
    assert again.job_id == created.id and same.id == created.id
    assert len(store.list_jobs()) == 1


def test_every_change_raises_the_seq_a_watcher_resumes_from(store):
    exp = experiment(store)
    store.add_trial(exp.id, 0, {}, job())
    store.add_trial(exp.id, 1, {}, job())
    seen = store.get_experiment(exp.id).last_seq
    store.update_trial(exp.id, 1, value=0.5, step=100)
    changed = store.trials(exp.id, after_seq=seen)
    assert [t.number for t in changed] == [1] and changed[0].value == 0.5
    assert store.get_experiment(exp.id).last_seq > seen
    before = store.get_experiment(exp.id).last_seq
    store.update_trial(exp.id, 0, seen_seq=7)  # bookkeeping only: no one to tell
    assert store.get_experiment(exp.id).last_seq == before
    assert store.trials(exp.id)[0].seen_seq == 7


def test_a_finished_trial_keeps_its_state(store):
    exp = experiment(store)
    store.add_trial(exp.id, 0, {}, job())
    pruned = store.update_trial(exp.id, 0, state=TrialState.PRUNED, step=300, reason="asha")
    assert pruned.state == TrialState.PRUNED and pruned.finished_at is not None
    later = store.update_trial(exp.id, 0, state=TrialState.CANCELLED)
    assert later.state == TrialState.PRUNED


def test_leases_hand_an_experiment_to_one_owner_until_theirs_runs_out(store):
    exp = experiment(store)
    assert [e.id for e in store.claim_experiments("a", 30)] == [exp.id]
    assert store.claim_experiments("b", 30) == []
    assert [e.id for e in store.claim_experiments("b", 30)] == []
    assert [e.id for e in store.claim_experiments("a", 30)] == [exp.id]  # still a's
    store.update_experiment(exp.id, owner_expires_at=time.time() - 1)  # as if a died
    assert [e.id for e in store.claim_experiments("b", 30)] == [exp.id]
    store.release_experiments("b")
    assert [e.id for e in store.claim_experiments("a", 30)] == [exp.id]


def test_cancel_is_requested_then_the_end_is_final(store):
    exp = experiment(store)
    assert store.request_experiment_cancel(exp.id).cancel_requested
    done = store.update_experiment(exp.id, state=ExperimentState.CANCELLED)
    assert done.state == ExperimentState.CANCELLED and done.finished_at and done.owner is None
    with pytest.raises(ExperimentFinished):
        store.request_experiment_cancel(exp.id)
    with pytest.raises(ExperimentFinished):
        store.update_experiment(exp.id, state=ExperimentState.SUCCEEDED)
    assert store.claim_experiments("a", 30) == []


def test_a_lease_is_renewed_past_half_its_life_not_at_every_look(store):
    exp = experiment(store)
    store.claim_experiments("a", 30)
    first = store.get_experiment(exp.id).owner_expires_at
    store.claim_experiments("a", 30)
    assert store.get_experiment(exp.id).owner_expires_at == first  # a read, no write
    store.update_experiment(exp.id, owner_expires_at=time.time() + 10)  # under half of 30 left
    store.claim_experiments("a", 30)
    assert store.get_experiment(exp.id).owner_expires_at > time.time() + 25
