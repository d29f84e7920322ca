"""runtime.experiments: the controller in a real server, on both engines. Experiments go in
through the store here; their jobs run on the server's real workers."""

from __future__ import annotations

import signal
import time
import urllib.request
from typing import Any

import optuna
import pytest
from optuna_dashboard._storage_url import get_storage

from stepstream.kernel.experiment import ExperimentSpec
from stepstream.kernel.states import ExperimentState, JobState, TrialState
from stepstream_service.config import Settings
from stepstream_service.runtime.experiments import study_storage
from stepstream_service.store import NewExperiment, Store


def linear_experiment(name: str = "lin", **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "job": {
            "name": name,
            "model": "linear",
            "loss": "mse",
            "optimizer": {"name": "gradient_descent", "learning_rate": 0.5},
            "dataset": {"name": "linear", "num_samples": 100},
            "training": {"steps": 200, "batch_size": 100, "eval_every": 50, "seed": 1},
        },
        "space": {"optimizer.learning_rate": {"choice": [0.01, 0.1, 0.5]}},
        "sampler": "grid",
        "objective": {"metric": "val_loss"},
        "max_concurrent_trials": 2,
    }
    spec.update(overrides)
    return ExperimentSpec.parse(spec).to_dict()


def submit(store: Store, spec: dict[str, Any]) -> str:
    exp, _ = store.create_experiment(NewExperiment(name=spec["name"], spec=spec, spec_hash="t"))
    return exp.id


def metrics(service) -> str:
    with urllib.request.urlopen(service.metrics_url, timeout=10) as reply:
        return reply.read().decode()


def wait_end(store: Store, exp_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = store.get_experiment(exp_id)
        if exp.terminal:
            return exp
        time.sleep(0.2)
    raise AssertionError(f"{exp_id} still {exp.state}: {store.trials(exp_id)}")


def test_an_experiment_runs_every_trial_and_names_the_best(start_service):
    service = start_service(workers=2)
    store = Store(service.store_url)
    try:
        exp_id = submit(store, linear_experiment())
        exp = wait_end(store, exp_id)
        trials = store.trials(exp_id)
        assert exp.state == ExperimentState.SUCCEEDED, (exp, trials)
        assert sorted(t.params["optimizer.learning_rate"] for t in trials) == [0.01, 0.1, 0.5]
        assert all(t.state == TrialState.SUCCEEDED for t in trials), trials
        best = min(trials, key=lambda t: t.value)
        assert exp.best_trial == best.number and exp.best_value == best.value
        assert best.params["optimizer.learning_rate"] == 0.5
        for t in trials:
            job = store.get_job(t.job_id)
            assert job.state == JobState.SUCCEEDED
            assert job.labels == {"experiment": exp_id, "trial": str(t.number)}
        # optuna-dashboard's own loader opens the study beside the service's database.
        settings = Settings(store=service.store_url, data_dir=service.data_dir)
        storage = get_storage(study_storage(settings, hide_password=False))
        study = optuna.load_study(study_name=exp_id, storage=storage)
        assert len(study.trials) == 3
        assert study.best_trial.number == best.number
        assert study.best_value == pytest.approx(best.value)
    finally:
        store.close()


# The pruner and cancellation are the controller's, the same on either engine: one is enough.
@pytest.mark.parametrize("engine", ["sqlite"])
def test_asha_prunes_a_trial_that_falls_behind_and_its_job_stops_at_once(start_service):
    service = start_service(workers=1)
    store = Store(service.store_url)
    try:
        spec = linear_experiment(
            space={"optimizer.learning_rate": {"choice": [0.5, 0.002]}},
            pruner={"name": "asha", "min_steps": 100, "reduction_factor": 2},
            sampler={"name": "grid", "seed": 1},  # this seed tries 0.5 first
            max_concurrent_trials=1,
        )
        spec["job"]["training"].update(steps=5000, eval_every=100)
        exp_id = submit(store, ExperimentSpec.parse(spec).to_dict())
        exp = wait_end(store, exp_id, timeout=180)
        trials = store.trials(exp_id)
        assert exp.state == ExperimentState.SUCCEEDED, (exp, trials)
        good, bad = sorted(trials, key=lambda t: -t.params["optimizer.learning_rate"])
        assert good.state == TrialState.SUCCEEDED, trials
        assert bad.state == TrialState.PRUNED, trials
        assert bad.step > 0 and f"pruned at step {bad.step} by asha" in bad.reason
        deadline = time.monotonic() + 10
        while not (job := store.get_job(bad.job_id)).terminal and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.state == JobState.CANCELLED
        assert job.step < 5000, "the pruned trial's job ran on"
        # Decided when the trial was marked pruned; stopped when its job ended.
        assert job.finished_at - bad.finished_at < 1.0, (job.finished_at, bad.finished_at)
    finally:
        store.close()


@pytest.mark.parametrize("engine", ["sqlite"])
def test_a_cancelled_experiment_cancels_its_running_trials(start_service):
    service = start_service(workers=1)
    store = Store(service.store_url)
    try:
        spec = linear_experiment(max_concurrent_trials=2)
        spec["job"]["training"]["steps"] = 200_000
        exp_id = submit(store, spec)
        deadline = time.monotonic() + 60
        while len(store.trials(exp_id)) < 2:
            assert time.monotonic() < deadline, "no trials started"
            time.sleep(0.1)
        running = f'trainer_experiment_trials{{experiment_id="{exp_id}",state="RUNNING"}} 2.0'
        deadline = time.monotonic() + 10
        while running not in (page := metrics(service)):
            assert time.monotonic() < deadline, page
            time.sleep(0.1)
        store.request_experiment_cancel(exp_id)
        exp = wait_end(store, exp_id, timeout=60)
        assert exp.state == ExperimentState.CANCELLED
        time.sleep(0.5)  # the controller's next look, after the end it wrote
        assert f'experiment_id="{exp_id}"' not in metrics(service), "series of an ended one"
        trials = store.trials(exp_id)
        assert len(trials) == 2 and all(t.state == TrialState.CANCELLED for t in trials)
        deadline = time.monotonic() + 30
        while not all(store.get_job(t.job_id).terminal for t in trials):
            assert time.monotonic() < deadline, [store.get_job(t.job_id) for t in trials]
            time.sleep(0.1)
        assert {store.get_job(t.job_id).state for t in trials} == {JobState.CANCELLED}
    finally:
        store.close()


def test_a_server_killed_mid_experiment_resumes_it_without_running_a_trial_twice(
    start_service, tmp_path
):
    quick = {"lease_seconds": 2}
    service = start_service(workers=2, **quick)
    store = Store(service.store_url)
    try:
        spec = linear_experiment(
            space={"optimizer.learning_rate": {"loguniform": [0.01, 0.5]}},
            sampler={"name": "random", "seed": 3},
            max_trials=5,
            max_concurrent_trials=2,
        )
        spec["job"]["training"]["steps"] = 1000
        exp_id = submit(store, ExperimentSpec.parse(spec).to_dict())
        deadline = time.monotonic() + 60
        while not any(store.get_job(t.job_id).state == JobState.RUNNING
                      for t in store.trials(exp_id)):  # fmt: skip
            assert time.monotonic() < deadline, "no trial started running"
            time.sleep(0.05)
        service.stop(signal.SIGKILL)
        again = start_service(tmp_path / "data2", workers=2, **quick)
        exp = wait_end(store, exp_id, timeout=240)
        trials = store.trials(exp_id)
        assert exp.state == ExperimentState.SUCCEEDED, (exp, trials, again.log_path.read_text())
        assert [t.number for t in trials] == [0, 1, 2, 3, 4]
        assert len({t.job_id for t in trials}) == 5
        jobs = [j for j in store.list_jobs() if j.labels.get("experiment") == exp_id]
        assert len(jobs) == 5, "a trial got a second job"
        assert all(j.state == JobState.SUCCEEDED for j in jobs), jobs
        assert all(t.state == TrialState.SUCCEEDED for t in trials), trials
        settings = Settings(store=service.store_url, data_dir=service.data_dir)
        study = optuna.load_study(
            study_name=exp_id, storage=study_storage(settings, hide_password=False)
        )
        assert len(study.trials) == 5
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    finally:
        store.close()
