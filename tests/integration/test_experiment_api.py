"""The experiment RPCs over real gRPC, on each store engine: CreateExperiment's validation,
Get/List/Cancel, tenants, and WatchExperiment resuming by seq; the `trainer experiment` commands
against the same server.

The server runs no workers, so no trial's job ever trains, and its experiment controller is
told to wait an hour before its first look: the trials here are the ones the tests write into
the store (a second Store on the server's database), and every change a test makes is the only
one. Nothing asserted depends on that, though: a controller that did run could only add trials.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import threading
import time

import grpc
import pytest

from stepstream.cli import main
from stepstream.cli.errors import field_violations
from stepstream.client import TrainingClient
from stepstream.kernel.experiment import ExperimentSpec
from stepstream.kernel.states import ExperimentState, TrialState
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc
from stepstream_service.store import NewJob, Store
from stepstream_service.store.errors import ExperimentFinished
from tests.conftest import ENGINES

from .conftest import ServiceProcess

pytestmark = pytest.mark.slow

TOKENS = {"alice": "trn_alice-experiments", "bob": "trn_bob-experiments"}

JOB = {
    "name": "tiny",
    "dataset": {
        "name": "synthetic_classification",
        "num_samples": 64,
        "num_features": 4,
        "num_classes": 2,
    },
    "model": {"architecture": "mlp", "hidden_units": [8]},
    "training": {"steps": 20, "batch_size": 16},
}
SWEEP = {
    "name": "tiny-sweep",
    "job": JOB,
    "space": {
        "optimizer.learning_rate": {"loguniform": [0.001, 0.1]},
        "model.hidden_units": {"choice": [[4], [8]]},
    },
    "sampler": "random",
    "objective": "loss",
    "max_trials": 3,
}


@pytest.fixture(scope="module", params=ENGINES)
def api(request, tmp_path_factory):
    """A server with two tenants, no workers and an idle experiment controller, and a Store on
    its database."""
    folder = tmp_path_factory.mktemp("exp")
    tokens = folder / "tokens"
    lines = [f"{t} sha256:{hashlib.sha256(k.encode()).hexdigest()}" for t, k in TOKENS.items()]
    tokens.write_text("\n".join(lines) + "\n")
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'trainer.db'}"
    else:
        url = request.getfixturevalue("postgres").create()
    svc = ServiceProcess(
        folder / "data", workers=0, store=url, tokens_file=tokens, experiment_poll_seconds=3600
    )
    store = Store(url)
    yield svc, store
    store.close()
    svc.stop()
    if request.param == "postgresql":
        request.getfixturevalue("postgres").drop(url)


@pytest.fixture
def server(api):
    return api[0]


@pytest.fixture
def store(api):
    return api[1]


@pytest.fixture
def alice(server):
    with TrainingClient(server.address, token=TOKENS["alice"]) as c:
        yield c


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield trainer_pb2_grpc.TrainerServiceStub(channel)


def as_alice() -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS['alice']}")]


def sweep(**changes) -> dict:
    return {**copy.deepcopy(SWEEP), **changes}


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def trial_job(exp_id: str, number: int) -> NewJob:
    return NewJob(
        name="tiny",
        spec=JOB,
        labels={"experiment": exp_id, "trial": str(number)},
        tenant="alice",
    )


def test_a_bad_space_is_invalid_argument_naming_its_path(stub):
    bad = sweep(space={"optimizer.learning_rate": {"loguniform": [0, 0.1]}})
    request = pb.CreateExperimentRequest(spec_json=json.dumps(bad), request_id="bad-space")
    error = refused(lambda: stub.CreateExperiment(request, metadata=as_alice(), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [f for f, _ in field_violations(error)]
    assert fields == ["spec.space.optimizer.learning_rate"], field_violations(error)


def test_every_problem_of_a_request_comes_back_at_once(stub):
    bad = sweep(space={"optimizer.nope": {"choice": [1, 2]}})
    request = pb.CreateExperimentRequest(spec_json=json.dumps(bad), priority=5000)
    error = refused(lambda: stub.CreateExperiment(request, metadata=as_alice(), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {f for f, _ in field_violations(error)}
    assert fields == {"spec.space.optimizer.nope", "priority"}
    for text in ("", "{", "[1]", '{"job": "other.yaml"}'):
        request = pb.CreateExperimentRequest(spec_json=text)
        error = refused(lambda r=request: stub.CreateExperiment(r, metadata=as_alice(), timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, text
        assert field_violations(error), text


def test_an_uploaded_file_of_another_tenant_is_refused_in_a_choice(stub):
    space = {"dataset": {"choice": [{"name": "npz", "path": "uploads/bob/data.npz"}]}}
    request = pb.CreateExperimentRequest(spec_json=json.dumps(sweep(space=space)))
    error = refused(lambda: stub.CreateExperiment(request, metadata=as_alice(), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = field_violations(error)
    assert violation[0] == "spec.space.dataset" and "uploads/alice/" in violation[1]


def test_a_job_naming_another_tenants_upload_is_still_refused(stub):
    # CreateJob and CreateExperiment share the check of a tenant's dataset paths.
    job = {**JOB, "dataset": {"name": "npz", "path": "uploads/bob/data.npz"}}
    request = pb.CreateJobRequest(spec_json=json.dumps(job))
    error = refused(lambda: stub.CreateJob(request, metadata=as_alice(), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(error)] == ["spec.dataset.path"]


def test_created_got_and_listed_with_its_spec_as_sent(alice, stub):
    info = alice.submit_experiment(sweep(), request_id="round-trip", priority=7)
    assert info.id.startswith("exp-") and info.name == f"experiments/{info.id}"
    assert info.display_name == "tiny-sweep" and info.priority == 7
    assert info.objective == "loss" and info.direction == "minimize" and info.max_trials == 3
    assert info.state in (ExperimentState.RUNNING, ExperimentState.SUCCEEDED)  # see the header
    assert info.spec == ExperimentSpec.parse(sweep()).to_dict()
    assert not info.cancel_requested and info.create_time is not None
    assert isinstance(info.study_storage, str) and "password" not in info.study_storage
    # The same request again is the same experiment; a different spec under it is refused.
    assert alice.submit_experiment(sweep(), request_id="round-trip", priority=7).id == info.id
    error = refused(lambda: alice.submit_experiment(sweep(max_trials=2), request_id="round-trip"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    for name in (info.id, info.name):
        got = alice.get_experiment(name)
        assert got.id == info.id and got.spec == info.spec
    assert info.id in [e.id for e in alice.experiments()]
    assert info.id in [e.id for e in alice.experiments(state="RUNNING", name="tiny-sweep")]
    assert info.id not in [e.id for e in alice.experiments(state="CANCELLED")]
    bad = pb.GetExperimentRequest(name="experiments/../jobs")
    error = refused(lambda: stub.GetExperiment(bad, metadata=as_alice(), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown = pb.GetExperimentRequest(name="exp-" + "0" * 20)
    error = refused(lambda: stub.GetExperiment(unknown, metadata=as_alice(), timeout=30))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_trial_priority_of_the_spec_wins_over_the_request(alice):
    info = alice.submit_experiment(sweep(trial_priority=-3), priority=9)
    assert info.priority == -3


def test_listing_pages_through_every_experiment_once_newest_first(alice, stub):
    made = [alice.submit_experiment(sweep(name=f"paged-{i}")).id for i in range(3)]
    seen, token = [], ""
    while True:
        request = pb.ListExperimentsRequest(page_size=1, page_token=token)
        page = stub.ListExperiments(request, metadata=as_alice(), timeout=30)
        assert len(page.experiments) <= 1
        seen += [e.name.removeprefix("experiments/") for e in page.experiments]
        assert all(not e.trials for e in page.experiments)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i in made] == made[::-1]
    for request in (
        pb.ListExperimentsRequest(page_token="garbage"),
        pb.ListExperimentsRequest(page_token=base64.urlsafe_b64encode(b"nan|exp-1").decode()),
        pb.ListExperimentsRequest(filter="state=DONE"),
        pb.ListExperimentsRequest(filter="label.a=b"),
        pb.ListExperimentsRequest(page_size=5000),
    ):
        error = refused(lambda r=request: stub.ListExperiments(r, metadata=as_alice(), timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request


def test_cancel_marks_it_and_a_finished_one_is_failed_precondition(alice, store):
    info = alice.submit_experiment(sweep(name="to-cancel"))
    cancelled = alice.cancel_experiment(info.id)
    assert cancelled.cancel_requested
    assert cancelled.state in (ExperimentState.RUNNING, ExperimentState.CANCELLED)
    with_trials = alice.get_experiment(info.id)
    assert with_trials.cancel_requested
    with contextlib.suppress(ExperimentFinished):  # a controller may have ended it first
        store.update_experiment(info.id, state="CANCELLED", message="cancelled")
    error = refused(lambda: alice.cancel_experiment(info.id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert alice.get_experiment(info.id).state == ExperimentState.CANCELLED


def test_another_tenants_experiment_is_not_found(alice, server):
    info = alice.submit_experiment(sweep(name="private"))
    with TrainingClient(server.address, token=TOKENS["bob"]) as bob:
        for call in (
            lambda: bob.get_experiment(info.id),
            lambda: bob.cancel_experiment(info.id),
            lambda: next(iter(bob.watch_experiment(info.id))),
        ):
            assert refused(call).code() == grpc.StatusCode.NOT_FOUND
        assert info.id not in [e.id for e in bob.experiments()]
    with TrainingClient(server.address) as nobody:
        assert refused(lambda: nobody.get_experiment(info.id)).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_watch_sends_changes_and_resumes_after_a_seq(alice, store):
    info = alice.submit_experiment(sweep(name="watched", max_trials=2))
    exp_id = info.id
    first, _ = store.add_trial(exp_id, 0, {"optimizer.learning_rate": 0.01}, trial_job(exp_id, 0))
    updates = alice.watch_experiment(exp_id)
    u = next(updates)
    assert not u.experiment.terminal and not u.experiment.trials
    assert [t.number for t in u.trials] == [0] and u.trials[0].job_id == first.job_id
    assert u.trials[0].params == {"optimizer.learning_rate": 0.01}
    assert u.experiment.trial_counts == {"RUNNING": 1} and u.seq >= u.trials[0].seq
    store.update_trial(exp_id, 0, value=0.7, step=10)
    u = next(updates)
    assert [(t.number, t.value, t.step) for t in u.trials] == [(0, 0.7, 10)]
    seen = u.seq
    updates.close()  # the watcher goes away; what follows is told to the next one
    store.add_trial(exp_id, 1, {"optimizer.learning_rate": 0.02}, trial_job(exp_id, 1))
    store.update_trial(exp_id, 0, state="PRUNED", value=0.9, step=12, reason="pruned")
    resumed = alice.watch_experiment(exp_id, after_seq=seen)
    u = next(resumed)
    assert sorted(t.number for t in u.trials) == [0, 1]
    assert all(t.seq > seen for t in u.trials)
    assert u.experiment.trial_counts == {"PRUNED": 1, "RUNNING": 1}
    pruned = next(t for t in u.trials if t.number == 0)
    assert pruned.state == TrialState.PRUNED and pruned.reason == "pruned" and pruned.terminal
    resumed.close()
    # Nothing changed after that message: resuming after it sends the experiment alone.
    quiet = alice.watch_experiment(exp_id, after_seq=u.seq)
    assert next(quiet).trials == []
    quiet.close()

    def finish() -> None:
        time.sleep(0.5)
        store.update_trial(exp_id, 1, state="SUCCEEDED", value=0.4, step=20)
        store.update_experiment(exp_id, state="SUCCEEDED", best_trial=1, best_value=0.4)

    threading.Thread(target=finish).start()
    last = list(alice.watch_experiment(exp_id, after_seq=u.seq))
    assert last[-1].experiment.state == ExperimentState.SUCCEEDED
    assert [t.number for u in last for t in u.trials] == [1]
    final = alice.wait_experiment(exp_id, timeout=30)
    assert final.best_trial == 1 and final.best_value == 0.4
    assert final.best_job_id == final.trials[1].job_id and final.end_time is not None
    # An ended experiment's stream is one message.
    again = list(alice.watch_experiment(exp_id))
    assert len(again) == 1 and len(again[0].trials) == 2


def test_the_experiment_commands(alice, server, store, tmp_path, capsys):
    flags = ["--address", server.address, "--token", TOKENS["alice"]]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep(name="from-cli")))
    assert main(["experiment", "submit", str(path), *flags]) == 0
    exp_id = capsys.readouterr().out.strip()
    assert exp_id.startswith("exp-")
    store.add_trial(exp_id, 0, {"optimizer.learning_rate": 0.01, "model.hidden_units": [4]},
                    trial_job(exp_id, 0))  # fmt: skip
    store.update_trial(exp_id, 0, state="SUCCEEDED", value=0.25, step=20)
    store.update_experiment(exp_id, best_trial=0, best_value=0.25)
    assert main(["experiment", "show", exp_id[4:10], *flags]) == 0
    shown = capsys.readouterr().out
    assert f"Experiment: {exp_id}" in shown and "trial 0: loss 0.2500" in shown
    assert "hidden_units=[4] learning_rate=0.01" in shown
    assert main(["experiment", "show", "from-cli", "-o", "json", *flags]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["id"] == exp_id and record["trials"][0]["state"] == "SUCCEEDED"
    assert main(["experiment", "list", "--name", "from-cli", *flags]) == 0
    assert exp_id in capsys.readouterr().out
    assert main(["experiment", "plot", exp_id, "-o", str(tmp_path / "p.png"), *flags]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    def finish() -> None:
        time.sleep(0.5)
        store.update_experiment(exp_id, state="CANCELLED", message="cancelled")

    threading.Thread(target=finish).start()
    assert main(["experiment", "watch", exp_id, *flags]) == 3  # like a cancelled job
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("trial 0  SUCCEEDED  hidden_units=[4] learning_rate=0.01")
    assert lines[-1].startswith(f"{exp_id} CANCELLED")
    assert main(["experiment", "cancel", exp_id, *flags]) == 4  # FAILED_PRECONDITION
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
