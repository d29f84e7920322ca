"""The experiment spec: the example, the space checked against the job, a table of refusals,
trials made with apply, the grid, shorthands, and the wire form."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from stepstream.kernel.experiment import (
    ExperimentError,
    ExperimentSpec,
    apply,
    experiment_schema,
    load_experiment,
)
from stepstream.kernel.spec import JobSpec, SpecError, SpecLimits, load_spec

ROOT = Path(__file__).resolve().parents[3]
SWEEP = ROOT / "examples" / "experiments" / "sweep.yaml"
JOB = {
    "model": {"architecture": "mlp", "hidden_units": [32]},
    "dataset": "mnist",
    "training": {"steps": 1000, "eval_every": 100},
}
# A small valid experiment; each case below changes one part of it.
BASE = {
    "job": JOB,
    "space": {"optimizer.learning_rate": {"loguniform": [1e-4, 1e-1]}},
    "sampler": "tpe",
    "objective": "val_accuracy",
    "max_trials": 8,
}


def experiment(**changes) -> dict:
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


# (case id, changes to BASE, the field the error must name, a phrase the message must contain)
BAD = [
    (
        "unknown-path",
        {"space": {"model.hidden_unit": {"choice": [[8]]}}},
        "space.model.hidden_unit",
        "model.hidden_unit is not a field of the job spec; model has: activation, architecture, "
        "batch_normalization, dropout, hidden_units, output_activation",
    ),
    (
        "unknown-section",
        {"space": {"optimiser.learning_rate": {"uniform": [0.1, 0.2]}}},
        "space.optimiser.learning_rate",
        "the top has: dataset, export, init_from, labels, loss, metrics, model, name, optimizer, "
        "runtime, training",
    ),
    (
        "index-past-the-list",
        {"space": {"model.hidden_units.1": {"int": [8, 64]}}},
        "space.model.hidden_units.1",
        "a list of 1",
    ),
    (
        "path-into-a-value",
        {"space": {"training.steps.max": {"int": [8, 64]}}},
        "space.training.steps.max",
        "is a value, not a section",
    ),
    (
        "empty-choice",
        {"space": {"training.batch_size": {"choice": []}}},
        "space.training.batch_size",
        "at least one value",
    ),
    (
        "duplicate-choice",
        {"space": {"model.hidden_units": {"choice": [[64], [128], [64]]}}},
        "space.model.hidden_units",
        "choice lists [64] twice",
    ),
    (
        "inverted-range",
        {"space": {"optimizer.learning_rate": {"uniform": [0.1, 0.01]}}},
        "space.optimizer.learning_rate",
        "low must be below high",
    ),
    (
        "equal-range",
        {"space": {"training.batch_size": {"int": [32, 32]}}},
        "space.training.batch_size",
        "low must be below high",
    ),
    (
        "loguniform-from-zero",
        {"space": {"optimizer.learning_rate": {"loguniform": [0, 0.1]}}},
        "space.optimizer.learning_rate",
        "a log scale needs low > 0",
    ),
    (
        "step-does-not-fit",
        {"space": {"training.batch_size": {"int": [10, 100], "step": 7}}},
        "space.training.batch_size",
        "step 7 does not fit the range",
    ),
    (
        "float-step-does-not-fit",
        {"space": {"model.dropout": {"float": [0.0, 0.5], "step": 0.3}}},
        "space.model.dropout",
        "does not fit the range",
    ),
    (
        "log-and-step",
        {"space": {"optimizer.learning_rate": {"float": [0.01, 0.1], "step": 0.01, "log": True}}},
        "space.optimizer.learning_rate",
        "a log scale takes no step",
    ),
    (
        "int-range-of-fractions",
        {"space": {"training.batch_size": {"int": [8.5, 64]}}},
        "space.training.batch_size",
        "whole numbers",
    ),
    (
        "unknown-option",
        {"space": {"training.batch_size": {"int": [8, 64], "stride": 8}}},
        "space.training.batch_size",
        "int does not take stride; it takes: step, log",
    ),
    (
        "two-kinds",
        {"space": {"training.batch_size": {"int": [8, 64], "choice": [8]}}},
        "space.training.batch_size",
        "give one distribution",
    ),
    (
        "value-the-job-refuses",
        {"space": {"optimizer.learning_rate": {"uniform": [-0.1, 0.1]}}},
        "space.optimizer.learning_rate",
        "low -0.1 makes the job invalid: Input should be greater than 0",
    ),
    (
        "float-range-over-an-int-field",
        {"space": {"training.batch_size": {"float": [16, 128]}}},
        "space.training.batch_size",
        "valid integer",
    ),
    (
        "option-the-optimizer-does-not-take",
        {"space": {"optimizer.momentum": {"uniform": [0.1, 0.9]}}},
        "space.optimizer.momentum",
        "adam does not take momentum",
    ),
    (
        "choice-the-job-refuses",
        {"space": {"model.activation": {"choice": ["relu", "tanhh"]}}},
        "space.model.activation",
        'choice "tanhh" makes the job invalid: unknown activation',
    ),
    (
        "empty-space",
        {"space": {}},
        "space",
        "at least one field",
    ),
    (
        "grid-with-a-continuous-range",
        {"sampler": "grid", "max_trials": None},
        "sampler",
        "grid needs every distribution to be a choice or an int/float range with step; "
        "space.optimizer.learning_rate is a continuous range",
    ),
    (
        "unknown-sampler",
        {"sampler": "bayes"},
        "sampler.name",
        "valid sampler names: cma, cma_es, cmaes, grid, random, tpe",
    ),
    (
        "unknown-pruner",
        {"pruner": {"name": "hyperbandit"}},
        "pruner.name",
        "valid pruner names: asha, hyperband, median, none, successive_halving",
    ),
    (
        "option-of-another-pruner",
        {"pruner": {"name": "median", "min_steps": 100}},
        "pruner.min_steps",
        "pruner median does not take min_steps; it takes: startup_trials, warmup_steps",
    ),
    (
        "pruner-min-steps-past-the-job",
        {"pruner": {"name": "asha", "min_steps": 1000}},
        "pruner.min_steps",
        "is not below the job's steps (1000)",
    ),
    (
        "val-metric-without-evaluations",
        {"job": {**JOB, "training": {"steps": 1000}}},
        "objective.metric",
        "val_accuracy is reported by evaluations; set job.training.eval_every",
    ),
    (
        "metric-the-job-does-not-compute",
        {"objective": "val_auc"},
        "objective.metric",
        "valid: accuracy, loss, test_accuracy, test_loss, val_accuracy, val_loss",
    ),
    (
        "accuracy-of-a-regression",
        {"job": {"dataset": "linear", "model": "linear"}, "objective": "accuracy"},
        "objective.metric",
        "this regression job streams loss and mae",
    ),
    (
        "test-metric-without-a-test",
        {
            "job": {
                **JOB,
                "dataset": {"name": "mnist", "evaluate_on_test": False, "validation_split": 0.1},
            },
            "objective": "test_accuracy",
        },
        "objective.metric",
        "this job reports no test metrics",
    ),
    (
        "mode-neither",
        {"objective": {"metric": "loss", "mode": "up"}},
        "objective.mode",
        "mode is min or max",
    ),
    (
        "max-trials-missing",
        {"max_trials": None},
        "max_trials",
        "required with sampler tpe",
    ),
    (
        "more-concurrent-than-trials",
        {"max_concurrent_trials": 9},
        "max_concurrent_trials",
        "at most max_trials (8)",
    ),
    ("empty-budget", {"budget": {}}, "budget", "give steps, seconds, or both"),
    ("bad-duration", {"budget": {"seconds": "soon"}}, "budget.seconds", "not a duration"),
    ("bad-job", {"job": {"epochz": 3}}, "job.epochz", "unknown field"),
    ("job-as-a-path", {"job": "mnist_mlp.yaml"}, "job", "give the job inline"),
    ("unknown-field", {"trials": 3}, "trials", "unknown field"),
    ("bad-name", {"name": "a sweep"}, "name", "1-63 letters"),
]


def test_the_table_is_big_enough():
    assert len(BAD) >= 30
    assert len({case[0] for case in BAD}) == len(BAD)


@pytest.mark.parametrize(
    ("changes", "field", "phrase"), [c[1:] for c in BAD], ids=[c[0] for c in BAD]
)
def test_a_bad_experiment_is_refused_naming_the_field(changes, field, phrase):
    with pytest.raises(SpecError) as caught:
        ExperimentSpec.parse(experiment(**changes))
    problems = {p.field: p.message for p in caught.value.problems}
    assert field in problems, f"expected {field} among {problems}"
    assert phrase in problems[field], problems[field]
    assert "invalid experiment spec" in str(caught.value)


def test_every_problem_is_reported_not_only_the_first():
    with pytest.raises(ExperimentError) as caught:
        ExperimentSpec.parse(
            experiment(
                space={
                    "model.width": {"int": [8, 64]},
                    "training.batch_size": {"choice": []},
                    "optimizer.learning_rate": {"uniform": [0.1, 0.01]},
                },
                objective="val_auc",
            )
        )
    assert {
        "space.model.width",
        "space.training.batch_size",
        "space.optimizer.learning_rate",
    } <= set(caught.value.fields)


def test_the_example_loads_as_a_grid_of_27():
    spec = load_experiment(SWEEP)
    assert spec.grid_size() == 27 == spec.max_trials == len(spec.grid_points())
    assert spec.sampler.name == "grid" and spec.pruner.name == "asha"
    assert spec.pruner.min_steps == 300  # the job's eval_every
    assert (spec.objective.metric, spec.objective.mode) == ("test_accuracy", "max")
    assert spec.max_concurrent_trials == 2
    assert spec.grid_search_space()["model.hidden_units"] == [[64], [150], [300]]
    # Every grid point is a job the service would accept.
    for point in spec.grid_points():
        apply(spec.job, point)
    assert jsonschema.Draft202012Validator(experiment_schema()).is_valid(
        yaml.safe_load(SWEEP.read_text())
    )


def test_apply_sets_the_value_and_leaves_the_base_alone():
    spec = ExperimentSpec.parse(BASE)
    before = spec.job.to_dict()
    trial = apply(spec.job, {"optimizer.learning_rate": 0.02, "model.hidden_units": [64, 32]})
    assert isinstance(trial, JobSpec)
    assert trial.optimizer.learning_rate == 0.02
    assert trial.model.hidden_units == [64, 32]
    assert spec.job.to_dict() == before
    assert spec.job.optimizer.learning_rate is None
    # An unset section is filled from its own defaults around the value.
    stopped = apply(spec.job, {"training.early_stopping.patience": 2})
    assert stopped.training.early_stopping.patience == 2
    assert stopped.training.early_stopping.monitor == "val_loss"
    with pytest.raises(SpecError) as caught:
        apply(spec.job, {"model.dropout": 1.5})
    assert caught.value.fields == ["model.dropout"]
    with pytest.raises(SpecError, match="not a field of the job spec"):
        apply(spec.job, {"model.width": 3})


def test_a_servers_limits_reach_every_value_of_the_space():
    data = experiment(space={"model.hidden_units": {"choice": [[64], [5000]]}})
    ExperimentSpec.parse(data)
    with pytest.raises(SpecError) as caught:
        ExperimentSpec.parse(data, SpecLimits(max_units=1000))
    assert caught.value.fields == ["space.model.hidden_units"]
    assert "max_units" in caught.value.problems[0].message


def test_shorthands_and_their_long_forms_are_the_same_spec():
    short = ExperimentSpec.parse(
        experiment(sampler="random", pruner="successive_halving", objective="val_acc")
    )
    long = ExperimentSpec.parse(
        experiment(
            sampler={"name": "random"},
            pruner={"name": "asha"},
            objective={"metric": "val_accuracy", "mode": "max"},
        )
    )
    assert short == long
    assert short.pruner.name == "asha"
    assert (short.pruner.min_steps, short.pruner.reduction_factor) == (100, 3)
    assert short.objective.metric == "val_accuracy" and short.objective.direction == "maximize"
    assert ExperimentSpec.parse(experiment(objective="val_loss")).objective.mode == "min"
    cma = ExperimentSpec.parse(experiment(sampler="CMA-ES", pruner=None))
    assert (cma.sampler.name, cma.pruner.name) == ("cmaes", "none")


def test_distribution_forms():
    spec = ExperimentSpec.parse(
        experiment(
            space={
                "optimizer.learning_rate": {"loguniform": [1e-4, 1e-1]},
                "model.dropout": {"uniform": [0.0, 0.5]},
                "training.batch_size": {"int": [16, 256], "log": True},
                "training.steps": {"int": [500, 2000], "step": 500},
                "model.hidden_units": {"choice": [[64], [150, 150], [300]]},
                "optimizer.name": {"choice": ["adam", "sgd"]},
                "optimizer.clipnorm": {"choice": [None, 1.0]},
            }
        )
    )
    lr, dropout, batch, steps = (spec.space[k] for k in list(spec.space)[:4])
    assert (lr.kind, lr.log, dropout.kind, dropout.log) == ("float", True, "float", False)
    assert (batch.kind, batch.log, batch.low, batch.high) == ("int", True, 16, 256)
    assert steps.values() == [500, 1000, 1500, 2000]
    assert spec.grid_size() is None
    hidden = spec.space["model.hidden_units"]
    assert hidden.optuna_choices() == ["[64]", "[150, 150]", "[300]"]
    assert hidden.decode("[150, 150]") == [150, 150]
    assert spec.space["optimizer.name"].optuna_choices() == ["adam", "sgd"]
    # Written back in the shorthand, with the canonical kind.
    assert spec.to_dict()["space"]["optimizer.learning_rate"] == {
        "float": [1e-4, 1e-1],
        "log": True,
    }


def test_stepped_float_ranges_make_a_grid():
    spec = ExperimentSpec.parse(
        experiment(
            space={
                "model.dropout": {"float": [0.0, 0.3], "step": 0.1},
                "training.batch_size": {"int": [32, 128], "step": 32},
            },
            sampler="grid",
            max_trials=None,
        )
    )
    assert spec.grid_search_space() == {
        "model.dropout": [0.0, 0.1, 0.2, 0.3],
        "training.batch_size": [32, 64, 96, 128],
    }
    assert spec.grid_size() == spec.max_trials == 16
    assert spec.grid_points()[1] == {"model.dropout": 0.0, "training.batch_size": 64}
    with pytest.raises(SpecError, match="the grid has only 16 points"):
        ExperimentSpec.parse({**spec.to_dict(), "max_trials": 17})


def test_round_trip_through_the_wire_form():
    spec = load_experiment(SWEEP)
    full = ExperimentSpec.parse(
        experiment(
            budget={"steps": 100_000, "seconds": "2h"},
            trial_priority=5,
            pruner={"name": "hyperband", "reduction_factor": 4},
            sampler={"name": "tpe", "seed": 7},
            space={
                "optimizer.learning_rate": {"loguniform": [1e-4, 1e-1]},
                "model.hidden_units": {"choice": [[64], [150, 150]]},
                "training.steps": {"int": [200, 1000], "step": 100},
            },
        )
    )
    assert full.budget.seconds == 7200 and full.pruner.max_steps == 1000
    for original in (spec, full):
        for wire in (original.model_dump(mode="json"), original.to_dict()):
            text = json.dumps(wire)
            assert ExperimentSpec.parse(json.loads(text)) == original
            assert ExperimentSpec.model_validate(json.loads(text)) == original


def test_a_job_path_is_read_beside_the_experiment(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "mlp.yaml").write_text(yaml.safe_dump(JOB))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**BASE, "job": "jobs/mlp.yaml"}))
    spec = load_experiment(tmp_path / "sweep.yaml")
    assert spec.job == load_spec(tmp_path / "jobs" / "mlp.yaml")
    (tmp_path / "sweep.json").write_text(json.dumps({**BASE, "job": "mlp.yaml"}))
    assert load_experiment(tmp_path / "sweep.json", base_dir=tmp_path / "jobs") == spec
    assert load_experiment({**BASE, "job": "mlp.yaml"}, base_dir=tmp_path / "jobs") == spec
    # The wire form carries the job inline.
    assert spec.to_dict()["job"] == spec.job.to_dict()
    with pytest.raises(SpecError) as caught:
        load_experiment({**BASE, "job": "missing.yaml"}, base_dir=tmp_path)
    assert caught.value.fields == ["job"] and "cannot read" in caught.value.problems[0].message
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(SpecError) as caught:
        load_experiment({**BASE, "job": "bad.yaml"}, base_dir=tmp_path)
    assert caught.value.fields == ["job.epochz"]


def test_the_schema_is_valid_and_knows_the_shorthands():
    schema = experiment_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(experiment(pruner="asha", budget={"seconds": "2h"}))
    assert not validator.is_valid(experiment(sampler="bayes"))
    assert not validator.is_valid(experiment(space={"model.dropout": {"uniform": [0.1]}}))
    assert not validator.is_valid(experiment(job={"epochz": 3}))


def test_the_experiment_module_does_not_import_tensorflow_or_optuna():
    code = (
        "import sys, stepstream.kernel.experiment; "
        "print('tensorflow' in sys.modules, 'optuna' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
