"""A worker's kept models: a job of a shape already trained reuses its traced program, and
trains exactly as it would have on a model of its own."""

from __future__ import annotations

import numpy as np
import pytest

from stepstream.kernel.spec import JobSpec
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.engine.model_cache import ModelCache, shape_key
from stepstream_service.engine.trainer import train

BUDGET = 64 << 20
DATA = {"name": "synthetic_classification", "num_samples": 96, "num_features": 6, "num_classes": 3}


def spec(**changes) -> JobSpec:
    base = {
        "name": "kept",
        "model": {"architecture": "mlp", "hidden_units": [8], "dropout": 0.2},
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "dataset": DATA,
        "metrics": ["accuracy"],
        "training": {"steps": 12, "batch_size": 16, "eval_every": 6, "seed": 3},
        "runtime": {"steps_per_execution": 3},
    }
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = base
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return JobSpec.parse(base)


def run(job: JobSpec, tmp_path, models: ModelCache | None):
    events = []
    result = train(
        job,
        events.append,
        workdir=tmp_path / f"w{len(list(tmp_path.iterdir()))}",
        paths=DataPaths(download=False),
        models=models,
        tensorboard=False,
    )
    assert result.outcome == "succeeded", result.failure
    return result, events


def losses(events) -> list[float]:
    return [e.loss for e in events if e.kind == "step"]


def logs(events) -> str:
    return "\n".join(e.message for e in events if e.kind == "log")


def traces(kept) -> int:
    """How many times the model's train function was traced: Keras's TensorFlow trainer wraps
    its tf.functions in a plain function, whose closure holds them."""
    cells = [c.cell_contents for c in kept.model.train_function.__closure__]
    counted = [f for f in cells if hasattr(f, "experimental_get_tracing_count")]
    assert counted, "Keras's train function no longer closes over its tf.function"
    return sum(f.experimental_get_tracing_count() for f in counted)


def test_a_reused_model_trains_as_a_model_of_its_own(tmp_path):
    cache = ModelCache(BUDGET)
    first = spec()
    run(first, tmp_path, cache)  # another job of the shape trained it before
    assert len(cache) == 1
    ((kept, _),) = cache._entries.values()
    traced = traces(kept)
    second = spec(optimizer__learning_rate=0.003, training__seed=3)
    result, events = run(second, tmp_path, cache)
    assert cache.hits == 1
    assert traces(kept) == traced  # the train function ran again without a new trace
    assert "traced program reused" in logs(events)
    # The same job on a model of its own: the same weights, dropout, optimizer state and rate.
    alone, alone_events = run(second, tmp_path, None)
    np.testing.assert_array_equal(losses(events), losses(alone_events))
    assert [e.learning_rate for e in events if e.kind == "step"] == [0.003] * 12
    assert result.test_metrics == alone.test_metrics
    assert result.final_eval == alone.final_eval


def test_adagrad_starts_from_its_initial_accumulator_again(tmp_path):
    cache = ModelCache(BUDGET)
    job = spec(optimizer__name="adagrad", optimizer__initial_accumulator_value=0.5)
    _, once = run(job, tmp_path, cache)
    _, again = run(job, tmp_path, cache)
    assert cache.hits == 1
    np.testing.assert_array_equal(losses(once), losses(again))


@pytest.mark.parametrize(
    "change",
    [
        {"model__hidden_units": [16]},
        {"model__dropout": 0.3},
        {"optimizer__name": "sgd"},
        {"optimizer__beta_1": 0.8},
        {"metrics": ["accuracy", "sparse_categorical_accuracy"]},
        {"training__batch_size": 32},
        {"optimizer__schedule": {"name": "exponential_decay", "decay_steps": 4, "decay_rate": 0.5}},
    ],
)
def test_a_different_shape_is_built_anew(tmp_path, change):
    cache = ModelCache(BUDGET)
    run(spec(), tmp_path, cache)
    _, events = run(spec(**change), tmp_path, cache)
    assert cache.hits == 0 and cache.misses == 2
    assert "reused" not in logs(events)


def test_a_kept_model_resumes_a_checkpoint_of_another_job(tmp_path):
    cache = ModelCache(BUDGET)
    run(spec(), tmp_path, cache)
    # No dropout: a checkpoint keeps no dropout seed state, kept model or not.
    job = spec(training__checkpoint_every=6, model__dropout=0.0)
    events = []
    workdir = tmp_path / "resumed"

    def stop_after_one_checkpoint():
        return any(e.kind == "checkpoint" for e in events)

    train(
        job,
        events.append,
        stop_after_one_checkpoint,
        workdir=workdir,
        models=cache,
        paths=DataPaths(download=False),
        tensorboard=False,
    )
    again = []
    result = train(
        job,
        again.append,
        workdir=workdir,
        resume=True,
        models=cache,
        paths=DataPaths(download=False),
        tensorboard=False,
    )
    assert result.outcome == "succeeded"
    assert cache.hits == 1  # the resumed attempt trained on the model the first one left
    assert [e.step for e in again if e.kind == "step"] == list(range(7, 13))
    _, alone = run(job, tmp_path, None)
    np.testing.assert_array_equal(losses(again), losses(alone)[6:])


def test_the_cache_keeps_the_most_recently_used_within_its_budget():
    cache = ModelCache(100)
    for key in "abc":
        cache.give_back(key, key, 40)
    assert cache.take("a") is None and cache.take("c") == "c"
    cache.give_back("big", "big", 101)  # larger than the whole budget: not kept
    assert cache.take("big") is None and cache.nbytes == 40
    none = ModelCache(0)
    none.give_back("a", 1, 0)
    assert none.take("a") is None


def test_a_model_over_the_budget_is_not_kept(tmp_path):
    cache = ModelCache(100)  # bytes: less than the small MLP and its Adam slots
    run(spec(), tmp_path, cache)
    assert len(cache) == 0


def test_the_key_is_a_digest_of_its_parts():
    assert shape_key({"a": [1, 2]}) == shape_key({"a": [1, 2]})
    assert shape_key({"a": [1, 2]}) != shape_key({"a": [2, 1]})
