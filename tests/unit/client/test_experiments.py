"""Experiments on the client's side without a server: the answers decoded, the programs run
against a scripted fake (stepstream.experiments), and the pure parts of `trainer experiment`:
trial tables, the header, the live view, experiment files, names, and the plot's data."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import grpc
import pytest

from stepstream import experiments as ops
from stepstream.cli import experiments as commands
from stepstream.cli.commands import build_parser, main
from stepstream.cli.errors import CliError
from stepstream.cli.experiment_plot import Curve, draw, objective_curve, parallel_coordinates
from stepstream.cli.experiment_views import (
    LiveTrials,
    by_objective,
    counts_text,
    experiment_record,
    experiment_view,
    experiments_table,
    short_params,
    trial_line,
    trials_table,
)
from stepstream.cli.names import match_experiments, resolve_experiment
from stepstream.cli.spec_files import SpecFileError, load_experiment_file, read_spec_file
from stepstream.experiments import ExperimentInfo, ExperimentUpdate, TrialInfo
from stepstream.kernel.events import EvalEvent
from stepstream.kernel.experiment import ExperimentSpec
from stepstream.kernel.spec import SpecError
from stepstream.kernel.states import ExperimentState, TrialState
from stepstream.kernel.wire import experiment_state_to_proto, timestamp, trial_state_to_proto
from stepstream.protocol import Operations
from stepstream.v1 import trainer_pb2 as pb

from .test_protocol import UNAVAILABLE, FakeClock, FakeServer, RpcFailure, drive

NOW = 1_800_000_000.0
ID = "exp-3f2a0c1b2d3e4f5a6b7c"
JOB = {
    "name": "tiny",
    "model": "linear",
    "dataset": {"name": "linear"},
    "training": {"steps": 100, "batch_size": 10, "eval_every": 20},
}
SWEEP = {
    "name": "sweep",
    "job": JOB,
    "space": {
        "optimizer.learning_rate": {"loguniform": [0.001, 0.1]},
        "training.batch_size": {"choice": [10, 20, 40]},
    },
    "sampler": "random",
    "objective": "loss",
    "max_trials": 4,
}


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(ops, "time", fake)
    return fake


def trial_pb(number: int, state: str = "RUNNING", value: float | None = None, **fields) -> pb.Trial:
    return pb.Trial(
        number=number,
        job=f"jobs/job-{number:020d}",
        state=trial_state_to_proto(state),
        params_json=json.dumps({"optimizer.learning_rate": 0.01 * (number + 1)}),
        value=value,
        seq=fields.pop("seq", number + 2),
        **fields,
    )


def experiment_pb(state: str = "RUNNING", last_seq: int = 5, **fields) -> pb.Experiment:
    return pb.Experiment(
        name=f"experiments/{ID}",
        display_name="sweep",
        state=experiment_state_to_proto(state),
        objective="loss",
        direction="minimize",
        max_trials=4,
        last_seq=last_seq,
        **fields,
    )


def update_pb(state: str = "RUNNING", seq: int = 5, trials=()) -> pb.WatchExperimentResponse:
    return pb.WatchExperimentResponse(
        experiment=experiment_pb(state, seq), trials=list(trials), seq=seq
    )


def trial(number: int, state=TrialState.SUCCEEDED, value: float | None = 0.5, **changes):
    fields = {
        "number": number,
        "job_id": f"job-{number:020d}",
        "state": state,
        "params": {"optimizer.learning_rate": 0.001 * (number + 1), "training.batch_size": 20},
        "value": value,
        "step": 100 if value is not None else 0,
        "reason": "",
        "seq": number + 2,
        "create_time": NOW - 100,
        "end_time": NOW - 10 if state != TrialState.RUNNING else None,
    }
    return TrialInfo(**{**fields, **changes})


def info(trials=(), **changes) -> ExperimentInfo:
    trials = list(trials)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.value] = counts.get(t.state.value, 0) + 1
    fields = {
        "name": f"experiments/{ID}",
        "id": ID,
        "display_name": "sweep",
        "state": ExperimentState.RUNNING,
        "objective": "loss",
        "direction": "minimize",
        "max_trials": 4,
        "best_trial": None,
        "best_value": None,
        "trial_counts": counts,
        "cancel_requested": False,
        "priority": 0,
        "message": "",
        "study_storage": "",
        "last_seq": 9,
        "create_time": NOW - 120,
        "end_time": None,
        "trials": trials,
        "spec": ExperimentSpec.parse(SWEEP).to_dict(),
    }
    return ExperimentInfo(**{**fields, **changes})


# ---------------------------------------------------------------- answers and requests


def test_an_experiment_decodes_every_field_and_leaves_unset_ones_none():
    message = experiment_pb(
        "SUCCEEDED",
        last_seq=12,
        spec_json=json.dumps({"name": "sweep"}),
        trials=[
            trial_pb(0, "PRUNED", 0.9, step=40, reason="pruned"),
            trial_pb(1, "SUCCEEDED", 0.3),
        ],
        best_trial=1,
        best_value=0.3,
        trial_counts={"PRUNED": 1, "SUCCEEDED": 1},
        study_storage="sqlite:///optuna.db",
        create_time=timestamp(100.5),
        priority=3,
    )
    got = ExperimentInfo.from_proto(message)
    assert got.id == ID and got.state == ExperimentState.SUCCEEDED and got.terminal
    assert (
        got.best_trial == 1 and got.best_value == 0.3 and got.best_job_id == "job-" + "0" * 19 + "1"
    )
    assert got.finished_trials == 2 and got.spec == {"name": "sweep"} and got.priority == 3
    assert got.create_time == 100.5 and got.end_time is None
    pruned = got.trials[0]
    assert pruned.state == TrialState.PRUNED and pruned.terminal and pruned.step == 40
    assert pruned.params == {"optimizer.learning_rate": 0.01} and pruned.reason == "pruned"
    bare = ExperimentInfo.from_proto(experiment_pb())
    assert bare.best_trial is None and bare.best_value is None and bare.best_job_id is None
    assert bare.trials == [] and not bare.terminal
    assert TrialInfo.from_proto(trial_pb(2)).value is None


def test_an_experiment_is_validated_here_before_it_is_sent(tmp_path):
    request = ops.experiment_request(SWEEP, "req-1", priority=4)
    assert request.request_id == "req-1" and request.priority == 4
    assert json.loads(request.spec_json) == ExperimentSpec.parse(SWEEP).to_dict()
    assert ops.experiment_request(SWEEP).request_id != ops.experiment_request(SWEEP).request_id
    with pytest.raises(SpecError, match=r"space\.optimizer\.nope"):
        ops.experiment_request({**SWEEP, "space": {"optimizer.nope": {"choice": [1]}}})
    # A file whose job is a file beside it.
    (tmp_path / "job.json").write_text(json.dumps(JOB))
    (tmp_path / "sweep.json").write_text(json.dumps({**SWEEP, "job": "job.json"}))
    sent = json.loads(ops.experiment_request(tmp_path / "sweep.json").spec_json)
    assert sent["job"]["name"] == "tiny"
    assert ops.experiment_name(ID) == ops.experiment_name(f"experiments/{ID}")
    assert ops.list_filter("RUNNING", "sweep") == "state=RUNNING name=sweep"
    assert ops.list_filter() == ""


# ---------------------------------------------------------------- the programs


def test_submit_retries_with_the_same_request():
    replies = iter([RpcFailure(UNAVAILABLE)])
    server = FakeServer(CreateExperiment=lambda request: next(replies, experiment_pb()))
    request = ops.experiment_request(SWEEP)
    got, _ = drive(ops.submit(Operations(), request), server)
    assert got.id == ID and server.sleeps() == [0.5]
    assert {r.request_id for r in server.calls("CreateExperiment")} == {request.request_id}
    bad = FakeServer(CreateExperiment=lambda r: RpcFailure(grpc.StatusCode.INVALID_ARGUMENT))
    with pytest.raises(RpcFailure):
        drive(ops.submit(Operations(), request), bad)


def test_unary_calls_name_the_experiment_and_carry_the_timeout():
    server = FakeServer(
        GetExperiment=lambda r: experiment_pb(), CancelExperiment=lambda r: experiment_pb()
    )
    drive(ops.get(Operations(timeout=7), ID), server)
    drive(ops.cancel(Operations(timeout=7), ID), server)
    assert [op.request.name for op in server.log] == [f"experiments/{ID}"] * 2
    assert {op.timeout for op in server.log} == {7}


def test_listing_follows_pages():
    pages = {
        "": pb.ListExperimentsResponse(experiments=[experiment_pb()], next_page_token="p2"),
        "p2": pb.ListExperimentsResponse(experiments=[experiment_pb("FAILED")]),
    }
    server = FakeServer(ListExperiments=lambda request: pages[request.page_token])
    _, listed = drive(ops.listing(Operations(), "state=RUNNING", 1), server)
    assert [i.state for i in listed] == ["RUNNING", "FAILED"]
    assert {r.filter for r in server.calls("ListExperiments")} == {"state=RUNNING"}


def test_watch_resumes_after_the_last_seq_and_ends_with_the_experiment(clock):
    streams = iter(
        [
            [update_pb(seq=4, trials=[trial_pb(0)]), RpcFailure(UNAVAILABLE)],
            [RpcFailure(UNAVAILABLE)],
            [update_pb(seq=6, trials=[trial_pb(0, "SUCCEEDED", 0.5)]), update_pb("SUCCEEDED", 7)],
        ]
    )
    server = FakeServer(clock, WatchExperiment=lambda request: next(streams))
    _, updates = drive(ops.watch(Operations(), ID, after_seq=2), server)
    assert [u.seq for u in updates] == [4, 6, 7] and updates[-1].experiment.terminal
    assert [r.after_seq for r in server.calls("WatchExperiment")] == [2, 4, 4]
    assert server.sleeps() == [0.5, 0.5]
    assert isinstance(updates[1], ExperimentUpdate) and updates[1].trials[0].value == 0.5


def test_wait_rides_the_stream_then_asks_once_more(clock):
    gets = iter([experiment_pb(last_seq=40), experiment_pb("CANCELLED", 44)])
    stream = [update_pb(seq=42), update_pb("CANCELLED", 44)]
    server = FakeServer(clock, GetExperiment=lambda r: next(gets), WatchExperiment=lambda r: stream)
    got, emitted = drive(ops.wait(Operations(), ID), server)
    assert got.state == ExperimentState.CANCELLED and emitted == []
    assert [r.after_seq for r in server.calls("WatchExperiment")] == [40]
    assert len(server.calls("GetExperiment")) == 2


def test_wait_times_out_naming_the_experiment(clock):
    def never_ends(request):
        clock.now += 5
        return RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED)

    server = FakeServer(clock, GetExperiment=lambda r: experiment_pb(), WatchExperiment=never_ends)
    with pytest.raises(TimeoutError, match=f"experiments/{ID} still RUNNING after 3"):
        drive(ops.wait(Operations(), ID, timeout=3), server)


# ---------------------------------------------------------------- tables and views


def test_params_read_short_by_their_last_part():
    params = {"optimizer.learning_rate": 0.000123456, "model.hidden_units": [64, 32], "x.a": True}
    assert short_params(params, 60) == "learning_rate=0.0001235 hidden_units=[64,32] a=true"
    both = {"model.units": 1, "head.units": 2}
    assert short_params(both) == "model.units=1 head.units=2"  # one last part for two paths
    cut = short_params({"a": "x" * 100}, width=10)
    assert cut == "a=xxxxxxx…" and len(cut) == 10


def test_trials_sort_best_first_with_the_unvalued_last():
    trials = [trial(0, value=0.5), trial(1, value=None), trial(2, value=0.2), trial(3, value=0.9)]
    assert [t.number for t in by_objective(trials, "minimize")] == [2, 0, 3, 1]
    assert [t.number for t in by_objective(trials, "maximize")] == [3, 0, 2, 1]
    nan = trial(4, value=math.nan)
    assert by_objective([nan, trials[0]], "minimize")[-1] is nan


def test_the_trials_table_stars_the_best():
    text = trials_table([trial(1, value=0.25), trial(0, TrialState.RUNNING, None)], "loss", best=1)
    lines = text.splitlines()
    assert lines[0].split() == ["TRIAL", "STATE", "PARAMS", "LOSS", "STEP", "JOB"]
    assert lines[1].split()[:2] == ["1*", "SUCCEEDED"] and "0.2500" in lines[1]
    assert lines[2].split()[:2] == ["0", "RUNNING"] and lines[2].split()[-3:-1] == ["-", "-"]
    assert "JOB" not in trials_table([trial(0)], "loss", jobs=False)


def test_counts_read_in_the_states_order():
    assert counts_text({"PRUNED": 3, "RUNNING": 2, "SUCCEEDED": 10}) == (
        "2 running, 10 succeeded, 3 pruned"
    )
    assert counts_text({}) == "no trials yet"


def test_the_header_then_every_trial_best_first():
    trials = [
        trial(0, value=0.5),
        trial(1, TrialState.PRUNED, 0.9, reason="pruned"),
        trial(2, value=0.1),
    ]
    shown = info(
        trials,
        best_trial=2,
        best_value=0.1,
        study_storage="sqlite:////data/optuna.db",
        cancel_requested=True,
    )
    text = experiment_view(shown, now=NOW)
    assert f"Experiment: {ID}" in text and "State:      RUNNING (cancel requested)" in text
    assert "Objective:  loss (minimize)" in text
    assert "Best:       trial 2: loss 0.1000, job job-00000000000000000002" in text
    assert "Trials:     3 of 4: 2 succeeded, 1 pruned" in text
    assert "Study:      optuna-dashboard sqlite:////data/optuna.db" in text
    rows = text.split("\n\n")[1].splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["2*", "0", "1"]
    assert experiment_view(info(), now=NOW).count("\n\n") == 0  # no trials, no table


def test_a_record_has_iso_times_and_the_best_job():
    record = experiment_record(info([trial(0)], best_trial=0, best_value=0.5))
    assert record["best_job_id"] == "job-00000000000000000000"
    assert record["create_time"] == "2027-01-15T07:58:00.000Z" and record["end_time"] is None
    assert record["state"] == "RUNNING" and record["trials"][0]["state"] == "SUCCEEDED"
    assert record["trials"][0]["end_time"] == "2027-01-15T07:59:50.000Z"
    json.dumps(record)  # every value a JSON value


def test_the_list_of_experiments():
    text = experiments_table(
        [info([trial(0), trial(1, TrialState.RUNNING, None)], best_trial=0, best_value=0.5)],
        now=NOW,
    )
    header, row = text.splitlines()
    assert header.split() == [
        "ID",
        "NAME",
        "STATE",
        "TRIALS",
        "OBJECTIVE",
        "BEST",
        "TRIAL",
        "CREATED",
    ]
    assert row.split()[:7] == [ID, "sweep", "RUNNING", "1/4", "loss", "0.5000", "0"]


def test_a_trial_as_a_log_line():
    line = trial_line(trial(3, TrialState.PRUNED, 0.75, step=40, reason="pruned at 40"), "loss")
    assert line == (
        "trial 3  PRUNED  learning_rate=0.004 batch_size=20  loss 0.7500  step 40  (pruned at 40)"
    )


def update(trials, **changes) -> ExperimentUpdate:
    return ExperimentUpdate(info(**changes), list(trials), 9)


def test_the_live_view_prints_lines_when_nobody_watches_a_terminal():
    out = io.StringIO()
    live = LiveTrials(out, tty=False)
    live.update(update([trial(0, TrialState.RUNNING, None), trial(1, TrialState.RUNNING, None)]))
    live.update(update([trial(0, TrialState.RUNNING, 0.6, step=20)]))  # a value: no line
    live.update(
        update(
            [trial(0, TrialState.SUCCEEDED, 0.5)],
            trial_counts={"SUCCEEDED": 1, "RUNNING": 1},
            best_trial=0,
            best_value=0.5,
        )
    )
    lines = out.getvalue().splitlines()
    assert lines == [
        "trial 0  RUNNING  learning_rate=0.001 batch_size=20",
        "trial 1  RUNNING  learning_rate=0.002 batch_size=20",
        f"{ID} RUNNING: no trials yet",
        "trial 0  SUCCEEDED  learning_rate=0.001 batch_size=20  loss 0.5000  step 100",
        f"{ID} RUNNING: 1 running, 1 succeeded; best trial 0, loss 0.5000",
    ]


def test_the_live_view_redraws_in_place_on_a_terminal_and_keeps_to_its_rows():
    out = io.StringIO()
    live = LiveTrials(out, tty=True, rows=8, width=80)
    live.update(update([trial(0, TrialState.RUNNING, None)]))
    first = out.getvalue()
    assert first.startswith("\x1b[J") and first.count("\n") == 3  # summary, header, one trial
    out.seek(0), out.truncate()
    live.update(update([trial(n, TrialState.RUNNING, None) for n in range(1, 10)]))
    second = out.getvalue()
    assert second.startswith("\x1b[3F\x1b[J")  # back over the last drawing, cleared below
    lines = second.split("\x1b[J", 1)[1].splitlines()
    assert len(lines) <= 8 and lines[1] == "(6 earlier trials not shown)"
    assert [line.split()[0] for line in lines[3:]] == ["6", "7", "8", "9"]
    assert all(len(line) <= 80 for line in lines)


# ---------------------------------------------------------------- the plot's data


def metrics(steps=(), loss=(), accuracy=(), evals=()):
    return SimpleNamespace(
        steps=list(steps),
        loss=list(loss),
        accuracy=list(accuracy),
        mae=[math.nan] * len(steps),
        evals=list(evals),
    )


def test_an_objective_curve_is_its_evaluations_or_its_steps():
    evals = [
        EvalEvent(10, "validation", {"accuracy": 0.5, "loss": 1.0}, 0.0),
        EvalEvent(20, "validation", {"accuracy": 0.7, "loss": 0.8}, 0.0),
        EvalEvent(20, "test", {"accuracy": 0.65}, 0.0),
    ]
    m = metrics([1, 2, 3], [0.9, math.nan, 0.7], [0.1, 0.2, 0.3], evals)
    assert objective_curve(m, "val_accuracy") == Curve(
        [10, 20], [0.5, 0.7], "accuracy (validation evaluations)"
    )
    # A test metric comes once, at the end: its curve is the validation's.
    assert objective_curve(m, "test_accuracy").values == [0.5, 0.7]
    only_test = metrics(evals=[EvalEvent(5, "test", {"mean_absolute_error": 0.3}, 0.0)])
    assert objective_curve(only_test, "val_mae").values == [0.3]
    assert objective_curve(m, "loss") == Curve([1, 3], [0.9, 0.7], "step loss")
    assert objective_curve(m, "accuracy").values == [0.1, 0.2, 0.3]


def test_parallel_coordinates_place_each_value_on_its_axis():
    space = {
        "optimizer.learning_rate": {"float": [0.001, 0.1], "log": True},
        "training.steps": {"int": [10, 110]},
        "model.hidden_units": {"choice": [[8], [16], [32]]},
    }
    trials = [
        trial(0, value=0.2, params={"optimizer.learning_rate": 0.01, "training.steps": 60,
                                    "model.hidden_units": [32]}),
        trial(1, value=0.6, params={"optimizer.learning_rate": 0.001, "training.steps": 10,
                                    "model.hidden_units": [8]}),
        trial(2, TrialState.RUNNING, None, params={"model.hidden_units": [64]}),
    ]  # fmt: skip
    axes, lines = parallel_coordinates(space, trials, "loss")
    assert [a.name for a in axes] == [*space, "loss"]
    assert [a.scale for a in axes] == ["log", "linear", "categorical", "linear"]
    assert [label for _, label in axes[2].ticks] == ["[8]", "[16]", "[32]"]
    first, second, unvalued = (spots for spots, _, _ in lines)
    assert first == pytest.approx([0.5, 0.5, 1.0, 0.0])
    assert second == pytest.approx([0.0, 0.0, 0.0, 1.0])
    assert unvalued == [None, None, None, None]  # a choice it has not, no value: unplaced


def test_the_plot_draws_pruned_and_unvalued_trials(tmp_path):
    pytest.importorskip("matplotlib")
    trials = [
        trial(0, value=0.2),
        trial(1, TrialState.PRUNED, 0.9),
        trial(2, TrialState.RUNNING, None),
    ]
    curves = {
        0: Curve([20, 40], [0.5, 0.2], "step loss"),
        1: Curve([20], [0.9], "step loss"),
        2: Curve([], [], "step loss"),
    }
    path = tmp_path / "p.png"
    draw(info(trials), curves, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- files, names, commands


def test_validate_reads_an_experiment_and_places_its_problems(tmp_path, capsys):
    good = tmp_path / "sweep.json"
    good.write_text(json.dumps(SWEEP))
    assert isinstance(read_spec_file(str(good), experiments=True)[0], ExperimentSpec)
    spec, problems = read_spec_file(str(good))  # as a job: refused, saying what it is
    assert spec is None and "trainer experiment submit" in problems[0].message
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: s\njob: {model: linear, dataset: linear}\nspace:\n  nope.x: {int: [1, 2]}\n"
        "objective: loss\nmax_trials: 2\n"
    )
    assert main(["validate", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert f"{good}: valid experiment (2 fields, random, 4 trials, minimize loss)" in captured.out
    assert f"{bad}:4:3: space.nope.x: nope.x is not a field of the job spec" in captured.err
    job = tmp_path / "job.json"
    job.write_text(json.dumps(JOB))
    with pytest.raises(SpecFileError, match="a job, not an experiment"):
        load_experiment_file(str(job))
    assert load_experiment_file(str(good)).name == "sweep"


EXPERIMENTS = [
    info(id="exp-3f2a0c1b2d3e4f5a6b7c", display_name="sweep"),
    info(id="exp-3f2b999999999999aaaa", display_name="twice"),
    info(id="exp-aaaa00000000000000aa", display_name="twice"),
]


class FakeClient:
    def __init__(self, infos):
        self.infos, self.asked = infos, []

    def experiments(self, name=None, page_size=50, state=None):
        self.asked.append(name)
        return iter([i for i in self.infos if name is None or i.display_name == name])


def test_an_experiment_is_named_by_id_prefix_or_name():
    assert resolve_experiment(FakeClient([]), f"experiments/{ID}") == ID
    assert resolve_experiment(FakeClient(EXPERIMENTS), "3f2a") == "exp-3f2a0c1b2d3e4f5a6b7c"
    assert resolve_experiment(FakeClient(EXPERIMENTS), "exp-3f2b") == "exp-3f2b999999999999aaaa"
    client = FakeClient(EXPERIMENTS)
    assert resolve_experiment(client, "sweep") == ID and client.asked == ["sweep"]
    with pytest.raises(CliError, match="'twice' names 2 experiments"):
        resolve_experiment(FakeClient(EXPERIMENTS), "twice")
    with pytest.raises(CliError, match="no experiment has the id or the name 'nope'"):
        resolve_experiment(FakeClient(EXPERIMENTS), "nope")
    assert len(match_experiments("3f2", EXPERIMENTS + EXPERIMENTS)) == 2


def test_the_experiment_commands_are_on_the_parser():
    parser = build_parser()
    args = parser.parse_args(["experiment", "submit", "s.yaml", "-f", "--priority", "3"])
    assert args.func is commands._submit and args.follow and args.priority == 3
    args = parser.parse_args(["experiment", "show", "3f2a", "-o", "json"])
    assert args.func is commands._show and args.output == "json" and args.address
    for words in (["list"], ["cancel", "x"], ["watch", "x"], ["plot", "x", "-o", "p.png"]):
        assert parser.parse_args(["experiment", *words]).func.__module__ == commands.__name__
    with pytest.raises(SystemExit):
        parser.parse_args(["experiment"])


class WatchingClient:
    def __init__(self, states):
        self.states = states

    def watch_experiment(self, exp_id, after_seq=0):
        for n, state in enumerate(self.states):
            yield ExperimentUpdate(info(state=ExperimentState(state)), [trial(n)], n + 3)

    def get_experiment(self, exp_id):
        return info(state=ExperimentState(self.states[-1]))


@pytest.mark.parametrize(
    ("states", "code"),
    [(["RUNNING", "SUCCEEDED"], 0), (["FAILED"], 1), (["RUNNING", "CANCELLED"], 3), ([], 1)],
)
def test_following_exits_with_the_experiments_state(states, code, capsys):
    args = SimpleNamespace(address="localhost:50051")
    client = WatchingClient(states or ["FAILED"])
    if not states:  # the stream said nothing: the experiment's state is asked for
        client.watch_experiment = lambda exp_id, after_seq=0: iter([])
    assert commands._follow(client, ID, args) == code


def test_a_follow_detached_by_ctrl_c_says_how_to_come_back(capsys):
    class Interrupted(WatchingClient):
        def watch_experiment(self, exp_id, after_seq=0):
            raise KeyboardInterrupt
            yield

    args = SimpleNamespace(address="host:1")
    assert commands._follow(Interrupted(["RUNNING"]), ID, args) == 130
    assert f"trainer experiment watch {ID} --address host:1" in capsys.readouterr().err


def test_replace_keeps_an_info_frozen():
    with pytest.raises(AttributeError):
        info().state = ExperimentState.FAILED  # type: ignore[misc]
    assert replace(info(), state=ExperimentState.FAILED).terminal
