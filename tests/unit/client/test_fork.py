"""`trainer fork`'s pure parts, no server: --set values as YAML, --steps +N and N, the spec a
fork submits (fork_spec), and the command run against a fake client."""

from __future__ import annotations

import pytest

from stepstream.cli import main
from stepstream.cli.commands import build_parser
from stepstream.cli.errors import CliError
from stepstream.cli.fork import parse_sets, parse_value
from stepstream.client import JobInfo, fork_spec
from stepstream.kernel.spec import SpecError
from stepstream.kernel.states import JobState

SOURCE_ID = "job-3f2a0c1b2d3e4f5a6b7c"
SPEC = {
    "name": "seed-mlp",
    "labels": {"team": "vision", "experiment": "exp-1", "trial": "4"},
    "dataset": {"name": "synthetic_classification", "num_features": 8, "num_classes": 3},
    "model": {"architecture": "mlp", "hidden_units": [64]},
    "optimizer": {"name": "adam", "learning_rate": 0.001},
    "training": {"steps": 3000, "batch_size": 32, "checkpoint_every": 500},
}


def source(**changes) -> JobInfo:
    fields = {
        "name": f"jobs/{SOURCE_ID}",
        "id": SOURCE_ID,
        "display_name": "seed-mlp",
        "state": JobState.SUCCEEDED,
        "step": 3000,
        "total_steps": 3000,
        "loss": 0.1,
        "accuracy": 0.9,
        "mae": None,
        "attempts": 1,
        "max_attempts": 3,
        "priority": 0,
        "labels": SPEC["labels"],
        "test_metrics": {},
        "model_available": True,
        "failure": None,
        "create_time": None,
        "start_time": None,
        "end_time": None,
        "last_seq": 3010,
        "spec": SPEC,
    }
    return JobInfo(**{**fields, **changes})


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-4", 1e-4),  # text to YAML 1.1, whose floats need a dot
        ("-2.5E+3", -2500.0),
        ("1e3", 1000),
        ("0.5", 0.5),
        ("64", 64),
        ("[64]", [64]),
        ("[64, 32]", [64, 32]),
        ("true", True),
        ("null", None),
        ("", None),
        ("adam", "adam"),
        ("{name: cosine_decay, decay_steps: 100}", {"name": "cosine_decay", "decay_steps": 100}),
        ("[unclosed", "[unclosed"),  # not YAML: the text, for the spec's check to judge
    ],
)
def test_set_values_are_read_as_yaml_numbers_as_numbers(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_sets_are_paths_and_values_the_last_one_winning():
    assert parse_sets(["a.b=1", "c=x=y", " d = 2 ", "a.b=3"]) == {"a.b": 3, "c": "x=y", "d": 2}
    with pytest.raises(CliError, match="--set takes PATH=VALUE") as caught:
        parse_sets(["optimizer.learning_rate"])
    assert caught.value.code == 2
    with pytest.raises(CliError, match="PATH=VALUE"):
        parse_sets(["=3"])


def test_the_fork_command_line_parses():
    args = build_parser().parse_args(
        [
            "fork",
            "3f2a",
            "--set",
            "optimizer.learning_rate=1e-4",
            "--set",
            "model.hidden_units=[64]",
            "--steps",
            "+2000",
            "--name",
            "lower-lr",
            "-f",
        ]
    )
    assert args.job == "3f2a" and args.steps == "+2000" and args.name == "lower-lr"
    assert args.set == ["optimizer.learning_rate=1e-4", "model.hidden_units=[64]"]
    assert args.follow and args.func.__module__ == "stepstream.cli.fork"
    plain = build_parser().parse_args(["fork", "seed-mlp"])
    assert (plain.set, plain.steps, plain.name, plain.follow) == ([], None, None, False)


def test_a_fork_changes_what_it_is_told_and_links_to_its_source():
    spec = fork_spec(source(), {"optimizer.learning_rate": 1e-4}, steps="+2000")
    assert spec.init_from is not None
    assert (spec.init_from.job, spec.init_from.step) == (SOURCE_ID, "latest")
    assert spec.optimizer.learning_rate == 1e-4 and spec.optimizer.name == "adam"
    assert spec.training.steps == 5000 and spec.training.checkpoint_every == 500
    # The link is a label; a fork is no trial of its source's experiment.
    assert spec.labels == {"team": "vision", "forked_from": SOURCE_ID}
    assert spec.name == "seed-mlp-fork"
    assert fork_spec(source(), steps=4000, name="longer").training.steps == 4000
    assert fork_spec(source(), steps="4000").name == "seed-mlp-fork"
    long = source(spec={**SPEC, "name": "n" * 63})
    assert fork_spec(long, steps="+1").name == "n" * 58 + "-fork"


def test_steps_plus_n_counts_from_where_the_fork_starts():
    running = source(state=JobState.RUNNING, step=1234)
    assert fork_spec(running, steps="+100").training.steps == 1334
    older = fork_spec(source(), {"init_from.step": 1500}, steps="+100")
    assert older.init_from.step == 1500 and older.training.steps == 1600
    by_epochs = source(spec={**SPEC, "training": {"epochs": 3, "checkpoint_every": 10}}, step=30)
    spec = fork_spec(by_epochs, steps="+10")
    assert (spec.training.steps, spec.training.epochs) == (40, None)


@pytest.mark.parametrize(
    ("changes", "steps", "field", "phrase"),
    [
        ({"optimizer.learning_rat": 1e-4}, "+1", "optimizer.learning_rat", "learning_rate"),
        ({"optimiser.learning_rate": 1e-4}, "+1", "optimiser.learning_rate", "optimizer"),
        ({"optimizer.learning_rate": -1}, "+1", "optimizer.learning_rate", "greater than 0"),
        ({"model.hidden_units": [128]}, "+1", "model.hidden_units.0", "128 here, 64 in job-"),
        ({"optimizer.name": "sgd"}, "+1", "optimizer.name", "only the same optimizer"),
        ({}, None, "training.steps", "3000 is not past step 3000 of job-"),
        ({}, "2000", "training.steps", "give steps as +N"),
        ({}, "+two", "training.steps", "a number of steps, or +N"),
        ({}, "-5", "training.steps", "a number of steps, or +N"),
    ],
)
def test_a_fork_that_cannot_be_is_refused_naming_the_field(changes, steps, field, phrase):
    with pytest.raises(SpecError) as caught:
        fork_spec(source(), changes, steps=steps)
    problems = {p.field: p.message for p in caught.value.problems}
    assert field in problems, problems
    assert phrase in problems[field], problems[field]


def test_an_unknown_path_lists_the_fields_there():
    with pytest.raises(SpecError) as caught:
        fork_spec(source(), {"training.stepz": 5}, steps="+1")
    (problem,) = caught.value.problems
    assert "training.stepz is not a field of the job spec; training has: " in problem.message
    assert "batch_size, checkpoint_every" in problem.message


class FakeJob:
    def __init__(self, name: str, info: JobInfo | None = None):
        self.name, self._info = name, info

    def info(self) -> JobInfo:
        assert self._info is not None
        return self._info


class FakeClient:
    def __init__(self):
        self.submitted: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def jobs(self, **_):
        return iter([source()])

    def job(self, name: str) -> FakeJob:
        assert name == SOURCE_ID
        return FakeJob(f"jobs/{name}", source())

    def submit(self, spec, **options):
        self.submitted.append((spec, options))
        return FakeJob("jobs/job-99990000111122223333")


def test_trainer_fork_submits_the_fork_and_prints_its_name(monkeypatch, capsys):
    client = FakeClient()
    monkeypatch.setattr("stepstream.cli.fork.connect", lambda args: client)
    argv = ["fork", "3f2a", "--set", "optimizer.learning_rate=1e-4", "--steps", "+2000"]
    code = main([*argv, "--request-id", "fork-1"])
    assert code == 0
    assert capsys.readouterr().out == "jobs/job-99990000111122223333\n"
    ((spec, options),) = client.submitted
    assert spec.optimizer.learning_rate == 1e-4 and spec.training.steps == 5000
    assert spec.init_from.job == SOURCE_ID
    assert options == {"priority": 0, "request_id": "fork-1"}


def test_trainer_fork_says_what_is_wrong_and_submits_nothing(monkeypatch, capsys):
    client = FakeClient()
    monkeypatch.setattr("stepstream.cli.fork.connect", lambda args: client)
    assert main(["fork", "seed-mlp", "--set", "model.hidden_units=[32]", "--steps", "+5"]) == 2
    err = capsys.readouterr().err
    assert "model.hidden_units.0: 32 here, 64 in job-3f2a0c1b2d3e4f5a6b7c" in err
    assert main(["fork", "seed-mlp", "--set", "optimizer.learning_rate"]) == 2
    assert "--set takes PATH=VALUE" in capsys.readouterr().err
    assert client.submitted == []
