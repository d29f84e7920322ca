"""A fork in the engine: it starts from another job's checkpoint (weights, optimizer state and
step) under its own hyperparameters; one that does not fit fails, never starts from scratch;
and a job that checkpoints keeps its last step's state for forks to start from."""

from __future__ import annotations

import keras
import pytest

from stepstream.kernel.spec import JobSpec
from stepstream_service.engine import trainer
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.engine.trainer import ForkFailed, ForkSource, train

SOURCE = "job-0123456789abcdef0123"
SPEC = {
    "dataset": {
        "name": "synthetic_classification",
        "num_samples": 64,
        "num_features": 6,
        "num_classes": 3,
    },
    "model": {"architecture": "mlp", "hidden_units": [8]},
    "optimizer": {"name": "adam", "learning_rate": 0.01},
    "training": {"steps": 40, "batch_size": 8, "checkpoint_every": 20},
    "runtime": {"steps_per_execution": 5},
}


def spec_with(**changes) -> dict:
    spec = {key: dict(value) if isinstance(value, dict) else value for key, value in SPEC.items()}
    for section, value in changes.items():
        spec[section] = {**spec[section], **value}
    return spec


def run(spec: dict, workdir, **options):
    events = []
    result = train(
        JobSpec.parse(spec),
        events.append,
        workdir=workdir,
        paths=DataPaths(download=False),
        tensorboard=False,
        **options,
    )
    return result, events


def steps_of(events):
    return [e for e in events if e.kind == "step"]


def logs_of(events, level="info"):
    return [e.message for e in events if e.kind == "log" and e.level == level]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished job of 40 steps, checkpointing every 20, that kept its last step's state."""
    folder = tmp_path_factory.mktemp("source")
    result, events = run(SPEC, folder, final_checkpoint=True)
    assert result.outcome == "succeeded"
    return folder, events


@pytest.fixture
def seen(monkeypatch):
    """The optimizer as training starts: its learning rate and step counter."""
    found = {}
    fit = trainer._Run._fit

    def spy(self, start):
        optimizer = self.model.optimizer
        found["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        found["iterations"] = int(keras.ops.convert_to_numpy(optimizer.iterations))
        return fit(self, start)

    monkeypatch.setattr(trainer._Run, "_fit", spy)
    return found


def test_a_job_that_checkpoints_keeps_its_last_state_unannounced(source):
    folder, events = source
    kept = sorted(p.name for p in (folder / "checkpoints").glob("step-*.keras"))
    assert kept == ["step-000000020.keras", "step-000000040.keras"]
    # The events tell of the periodic checkpoints only, as before.
    assert [e.step for e in events if e.kind == "checkpoint"] == [20]


def test_no_last_state_without_checkpoints_or_unasked(tmp_path):
    quiet = spec_with(training={"checkpoint_every": None})
    run(quiet, tmp_path / "none", final_checkpoint=True)
    assert not (tmp_path / "none" / "checkpoints").exists()
    run(SPEC, tmp_path / "unasked")
    kept = sorted(p.name for p in (tmp_path / "unasked" / "checkpoints").glob("step-*.keras"))
    assert kept == ["step-000000020.keras"]


def test_a_fork_with_the_same_values_goes_on_as_the_job_would_have(source, tmp_path):
    """Weights, optimizer state and step all come back: the fork's steps are the steps the
    source would have taken next, to the float."""
    folder, _ = source
    longer = spec_with(training={"steps": 60})
    _, whole = run(longer, tmp_path / "whole")
    fork = {**longer, "init_from": {"job": SOURCE}}
    result, events = run(fork, tmp_path / "fork", start_from=ForkSource(SOURCE, folder))
    assert result.outcome == "succeeded"
    assert [e.step for e in steps_of(events)] == list(range(41, 61))
    expected = [e.loss for e in steps_of(whole)][40:]
    assert [e.loss for e in steps_of(events)] == pytest.approx(expected, rel=1e-5)
    said = f"forked from {SOURCE} at step 40 (checkpoint step-000000040.keras)"
    assert f"{said}; learning rate 0.01 (it was 0.01)" in logs_of(events)


def test_the_new_learning_rate_replaces_the_one_restored(source, tmp_path, seen):
    folder, _ = source
    fork = spec_with(optimizer={"learning_rate": 1e-4}, training={"steps": 50})
    fork["init_from"] = {"job": SOURCE}
    _, events = run(fork, tmp_path, start_from=ForkSource(SOURCE, folder))
    assert seen["learning_rate"] == pytest.approx(1e-4) and seen["iterations"] == 40
    rates = [e.learning_rate for e in steps_of(events)]
    assert len(rates) == 10 and rates == pytest.approx([1e-4] * 10)
    said = [m for m in logs_of(events) if m.startswith("forked from")]
    assert said == [
        f"forked from {SOURCE} at step 40 (checkpoint step-000000040.keras); "
        "learning rate 0.0001 (it was 0.01)"
    ]


def test_a_schedule_takes_up_from_the_restored_step(tmp_path, seen):
    schedule = {"name": "exponential_decay", "decay_steps": 10, "decay_rate": 0.5}
    scheduled = spec_with(optimizer={"schedule": schedule})
    run(scheduled, tmp_path / "source", final_checkpoint=True)
    changed = {**schedule, "decay_rate": 0.9}
    fork = spec_with(optimizer={"schedule": changed}, training={"steps": 45})
    fork["init_from"] = {"job": SOURCE}
    _, events = run(fork, tmp_path / "fork", start_from=ForkSource(SOURCE, tmp_path / "source"))
    assert seen["iterations"] == 40
    first = steps_of(events)[0]
    # Step 41 is iteration 40 of the new schedule: 0.01 * 0.9 ** (40 / 10).
    assert (first.step, first.learning_rate) == (41, pytest.approx(0.01 * 0.9**4, rel=1e-5))
    assert seen["learning_rate"] == pytest.approx(0.01 * 0.9**4, rel=1e-5)


def test_an_older_checkpoint_by_its_step(source, tmp_path):
    folder, _ = source
    fork = {**spec_with(training={"steps": 30}), "init_from": {"job": SOURCE, "step": 20}}
    _, events = run(fork, tmp_path, start_from=ForkSource(SOURCE, folder, step=20))
    assert [e.step for e in steps_of(events)] == list(range(21, 31))


def test_a_damaged_newest_checkpoint_is_passed_over_and_said(source, tmp_path):
    folder, _ = source
    copy = tmp_path / "copy" / "checkpoints"
    copy.mkdir(parents=True)
    for path in (folder / "checkpoints").iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    newest = copy / "step-000000040.keras"
    newest.write_bytes(newest.read_bytes()[:1000])
    fork = {**spec_with(training={"steps": 50}), "init_from": {"job": SOURCE}}
    _, events = run(fork, tmp_path / "fork", start_from=ForkSource(SOURCE, tmp_path / "copy"))
    assert steps_of(events)[0].step == 21
    (warning,) = logs_of(events, "warning")
    assert warning.startswith(
        "checkpoint at step 40 is damaged (sha256 mismatch); forked from "
        f"{SOURCE} at step 20 (checkpoint step-000000020.keras)"
    )


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        (
            {"model": {"hidden_units": [16]}},
            f"the checkpoint of {SOURCE} at step 40 does not fit this job's model (ValueError)",
        ),
        (
            {"optimizer": {"name": "sgd", "learning_rate": 0.1}},
            f"the optimizer state in the checkpoint of {SOURCE} at step 40 does not fit this "
            "job's optimizer (sgd)",
        ),
    ],
    ids=["model", "optimizer"],
)
def test_a_checkpoint_that_does_not_fit_fails_the_fork(source, tmp_path, changes, phrase):
    """Never a silent start from scratch: the server refuses these at submit, and the
    worker's own check is the last word."""
    folder, _ = source
    fork = {**spec_with(training={"steps": 50}, **changes), "init_from": {"job": SOURCE}}
    with pytest.raises(ForkFailed, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        run(fork, tmp_path, start_from=ForkSource(SOURCE, folder))


def test_no_intact_checkpoint_fails_the_fork(source, tmp_path):
    folder, _ = source
    fork = {**spec_with(training={"steps": 50}), "init_from": {"job": SOURCE}}
    with pytest.raises(ForkFailed, match=f"{SOURCE} has no intact checkpoint to start from"):
        run(fork, tmp_path / "a", start_from=ForkSource(SOURCE, tmp_path / "nothing"))
    with pytest.raises(ForkFailed, match=f"{SOURCE} has no intact checkpoint at step 30 to"):
        run(fork, tmp_path / "b", start_from=ForkSource(SOURCE, folder, step=30))


def test_a_resume_of_the_fork_uses_its_own_checkpoint_not_the_source(source, tmp_path):
    folder, _ = source
    fork = {**spec_with(training={"steps": 80}), "init_from": {"job": SOURCE}}
    stops = []
    stopped, _ = run(
        fork,
        tmp_path,
        start_from=ForkSource(SOURCE, folder),
        should_stop=lambda: stops.append(1) or len(stops) >= 6,
    )
    assert stopped.outcome == "cancelled"
    _, events = run(fork, tmp_path, start_from=ForkSource(SOURCE, folder), resume=True)
    assert steps_of(events)[0].step == 61
    assert not [m for m in logs_of(events) if m.startswith("forked from")]
