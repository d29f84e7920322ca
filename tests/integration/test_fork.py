"""Forks against a real server, on each store engine: `trainer fork` starts a job from a finished
job's last checkpoint with a new learning rate and `--steps +N`, and the server refuses a fork
of a job that is unknown, another tenant's, without a checkpoint, or of another shape."""

from __future__ import annotations

import asyncio
import hashlib
import statistics

import grpc
import pytest

from stepstream.aio import AsyncTrainingClient
from stepstream.cli import main
from stepstream.cli.errors import field_violations
from stepstream.client import TrainingClient
from stepstream.kernel.states import JobState
from tests.conftest import ENGINES

from .conftest import ServiceProcess

pytestmark = pytest.mark.slow

SOURCE = {
    "name": "fork-source",
    "labels": {"team": "a"},
    "dataset": {
        "name": "synthetic_classification",
        "num_samples": 512,
        "num_features": 8,
        "num_classes": 3,
    },
    "model": {"architecture": "mlp", "hidden_units": [16]},
    "optimizer": {"name": "adam", "learning_rate": 0.01},
    "training": {"steps": 300, "batch_size": 32, "checkpoint_every": 100},
    "runtime": {"steps_per_execution": 10},
}
TOKENS = {"alice": "trn_alice-forks", "bob": "trn_bob-forks"}


def steps_of(events) -> list:
    return [e for e in events if e.kind == "step"]


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def fork_of(job_id: str, **training) -> dict:
    return {
        **SOURCE,
        "name": "fork",
        "init_from": {"job": job_id},
        "training": {**SOURCE["training"], "steps": 400, **training},
    }


@pytest.fixture(scope="module")
def finished(service):
    """The source: a job of 300 steps that checkpoints every 100, run to its end; its events."""
    with TrainingClient(service.address) as c:
        job = c.submit(SOURCE)
        info = job.wait(timeout=300)
        assert info.state == JobState.SUCCEEDED, info.failure
        return info, list(job.stream())


def test_trainer_fork_goes_on_from_the_last_step_with_a_new_learning_rate(
    service, client, finished, capsys
):
    source, source_events = finished
    code = main(
        [
            "fork",
            source.id,
            "--address",
            service.address,
            "--set",
            "optimizer.learning_rate=1e-4",
            "--steps",
            "+100",
            "--follow",
        ]
    )
    assert code == 0, capsys.readouterr().err
    name = capsys.readouterr().out.splitlines()[0]
    job = client.job(name)
    info, events = job.info(), list(job.stream())
    assert info.state == JobState.SUCCEEDED and info.display_name == "fork-source-fork"
    assert info.labels == {"team": "a", "forked_from": source.id}
    assert info.spec["init_from"] == {"job": source.id, "step": "latest"}
    assert info.spec["training"]["steps"] == 400 and info.total_steps == 400

    steps = steps_of(events)
    assert [e.step for e in steps] == list(range(301, 401))
    assert [e.learning_rate for e in steps] == pytest.approx([1e-4] * 100)
    # Where it started, in its own words: the rate read back from the optimizer after the
    # restore, which brought back the source's.
    (said,) = [e.message for e in events if e.kind == "log" and "forked from" in e.message]
    assert said == (
        f"forked from {source.id} at step 300 (checkpoint step-000000300.keras); "
        "learning rate 0.0001 (it was 0.01)"
    )
    # It started from the source's weights: its first losses are the source's last ones, not
    # those of an untrained model.
    first = statistics.mean(e.loss for e in steps[:20])
    untrained = statistics.mean(e.loss for e in steps_of(source_events)[:20])
    trained = statistics.mean(e.loss for e in steps_of(source_events)[-20:])
    assert first < 0.5 * untrained, (first, trained, untrained)
    assert abs(first - trained) < 0.25 * untrained, (first, trained, untrained)
    forks = list(client.jobs(labels={"forked_from": source.id}))
    assert job.id in [f.id for f in forks]


def test_the_clients_fork(service, client, finished):
    source, _ = finished
    job = client.fork(source.id, {"model.dropout": 0.1}, steps="+20", name="with-dropout")
    info = job.wait(timeout=120)
    assert info.state == JobState.SUCCEEDED, info.failure
    assert (info.display_name, info.step, info.spec["model"]["dropout"]) == (
        "with-dropout",
        320,
        0.1,
    )

    async def fork_async():
        async with AsyncTrainingClient(service.address) as c:
            forked = await c.fork(source.id, steps=310)
            return await forked.wait(timeout=120)

    info = asyncio.run(fork_async())
    assert info.state == JobState.SUCCEEDED and info.step == 310, info.failure


@pytest.mark.parametrize(
    ("changes", "field", "phrase"),
    [
        (
            {"init_from": {"job": "job-ffffffffffffffffffff"}},
            "spec.init_from.job",
            "job-ffffffffffffffffffff names no job",
        ),
        (
            {"model": {"architecture": "mlp", "hidden_units": [32]}},
            "spec.model.hidden_units.0",
            "32 here, 16 in job-",
        ),
        ({"optimizer": {"name": "sgd"}}, "spec.optimizer.name", "sgd here, adam in job-"),
        ({"training": {"steps": 300}}, "spec.training.steps", "300 is not past step 300 of job-"),
        (
            {"init_from": {"step": 150}},
            "spec.init_from.step",
            "keeps checkpoints at steps 200, 300 only",
        ),
    ],
    ids=["unknown", "architecture", "optimizer", "steps", "checkpoint-step"],
)
def test_a_fork_that_cannot_be_is_refused_naming_the_field(
    client, finished, changes, field, phrase
):
    source, _ = finished
    spec = fork_of(source.id)
    for section, value in changes.items():
        spec[section] = {**spec[section], **value}
    error = refused(lambda: client.submit(spec))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    violations = dict(field_violations(error))
    assert field in violations, violations
    assert phrase in violations[field], violations[field]


def test_a_fork_the_server_cannot_judge_fails_at_its_start_never_from_scratch(client, finished):
    """Another dataset gives the model other shapes, which only the worker can tell: the
    fork fails before its first step, saying why, rather than train from scratch."""
    source, _ = finished
    images = {"name": "synthetic_images", "num_samples": 64, "image_size": 8, "num_classes": 3}
    job = client.submit({**fork_of(source.id), "dataset": images})
    info = job.wait(timeout=120)
    assert info.state == JobState.FAILED and info.failure is not None
    assert info.failure.reason == "fork_failed", info.failure
    assert info.failure.message.startswith(
        f"the checkpoint of {source.id} at step 300 does not fit this job's model"
    )
    assert steps_of(job.stream()) == []


def test_a_job_that_keeps_no_checkpoint_cannot_be_forked(client):
    quiet = {**SOURCE, "training": {"steps": 20, "batch_size": 32}}
    info = client.submit(quiet).wait(timeout=120)
    assert info.state == JobState.SUCCEEDED
    error = refused(lambda: client.submit(fork_of(info.id, checkpoint_every=None)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert error.details().startswith(
        f"spec.init_from.job: {info.id} (SUCCEEDED) has no checkpoint to fork from"
    )


# ---------------------------------------------------------------- tenants


@pytest.fixture(scope="module", params=ENGINES)
def tenants(request, tmp_path_factory):
    """A server with two tenants and no workers: a job stays queued, with no checkpoint."""
    folder = tmp_path_factory.mktemp("fork-tenants")
    tokens = folder / "tokens"
    lines = [f"{t} sha256:{hashlib.sha256(k.encode()).hexdigest()}" for t, k in TOKENS.items()]
    tokens.write_text("\n".join(lines) + "\n")
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'trainer.db'}"
    else:
        url = request.getfixturevalue("postgres").create()
    svc = ServiceProcess(folder / "data", workers=0, store=url, tokens_file=tokens)
    yield svc
    svc.stop()
    if request.param == "postgresql":
        request.getfixturevalue("postgres").drop(url)


def test_another_tenants_job_reads_as_no_job_and_a_queued_one_has_no_checkpoint(tenants):
    with (
        TrainingClient(tenants.address, token=TOKENS["alice"]) as alice,
        TrainingClient(tenants.address, token=TOKENS["bob"]) as bob,
    ):
        queued = alice.submit(SOURCE)
        error = refused(lambda: bob.submit(fork_of(queued.id)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert dict(field_violations(error)) == {"spec.init_from.job": f"{queued.id} names no job"}
        mine = refused(lambda: alice.submit(fork_of(queued.id)))
        assert mine.code() == grpc.StatusCode.FAILED_PRECONDITION, mine.details()
        assert f"{queued.id} (QUEUED) has no checkpoint yet to fork from" in mine.details()
        assert [j.id for j in alice.jobs()] == [queued.id]  # nothing was created
        assert queued.info().labels == {"team": "a"}
