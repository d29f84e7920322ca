"""The engine end to end on small data: what it emits, how it stops, what it leaves behind."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from stepstream.kernel import names
from stepstream.kernel.spec import JobSpec, load_spec
from stepstream_service.engine import trainer
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.engine.trainer import NoGPU, gpu_available, latest_checkpoint, train
from stepstream_service.store.artifacts import record_checkpoint
from tests.conftest import EXAMPLES


def run(spec: dict | JobSpec, tmp_path, should_stop=lambda: False, resume=False, workdir=None):
    events = []
    result = train(
        JobSpec.parse(spec),
        events.append,
        should_stop,
        workdir=workdir or tmp_path / "work",
        paths=DataPaths(download=False),
        resume=resume,
    )
    return result, events


def steps_of(events):
    return [e for e in events if e.kind == "step"]


QUICK = {"training": {"steps": 6, "batch_size": 16}, "runtime": {"steps_per_execution": 3}}
CLASSES = {
    "name": "synthetic_classification",
    "num_samples": 64,
    "num_features": 6,
    "num_classes": 3,
}
REGRESSION = {"name": "synthetic_regression", "num_samples": 64, "num_features": 4}


def assert_trained(result, events, steps=6):
    assert result.outcome == "succeeded", result.failure
    emitted = steps_of(events)
    assert [e.step for e in emitted] == list(range(1, steps + 1))
    assert all(math.isfinite(e.loss) for e in emitted)
    assert events[-1] is result


def test_linear_regression_reproduces_the_seed(tmp_path):
    result, events = run(load_spec(EXAMPLES / "linear_regression.yaml"), tmp_path)
    assert_trained(result, events, 200)
    w, b = keras.models.load_model(result.model_path).get_weights()
    assert abs(float(w[0, 0]) - 0.1) < 1e-3 and abs(float(b[0]) - 0.3) < 1e-3
    assert all(e.mae is not None and e.accuracy is None for e in steps_of(events))


@pytest.mark.parametrize("loss", sorted(names.LOSSES))
def test_every_loss_trains(loss, tmp_path):
    info = names.LOSSES[loss]
    if info.labels == "dense":
        data = REGRESSION
    else:
        data = {**CLASSES, "num_classes": 2 if info.labels == "binary" else 3}
    result, events = run({"loss": loss, "dataset": data, **QUICK}, tmp_path)
    assert_trained(result, events)


@pytest.mark.parametrize("activation", names.ACTIVATIONS)
def test_every_activation_trains(activation, tmp_path):
    model = {"architecture": "mlp", "hidden_units": [8], "activation": activation}
    result, events = run({"model": model, "dataset": CLASSES, **QUICK}, tmp_path)
    assert_trained(result, events)


@pytest.mark.parametrize("optimizer", sorted(names.OPTIMIZERS))
def test_every_optimizer_trains(optimizer, tmp_path):
    result, events = run({"optimizer": optimizer, "dataset": CLASSES, **QUICK}, tmp_path)
    assert_trained(result, events)


SCHEDULE_OPTIONS = {
    "piecewise_constant_decay": {"boundaries": [2, 4], "values": [0.1, 0.05, 0.01]},
    "exponential_decay": {"decay_steps": 2, "decay_rate": 0.5},
    "inverse_time_decay": {"decay_steps": 2, "decay_rate": 0.5},
}


@pytest.mark.parametrize("schedule", sorted(names.SCHEDULES))
def test_every_schedule_trains_and_streams_its_rate(schedule, tmp_path):
    options = SCHEDULE_OPTIONS.get(schedule, {"decay_steps": 4})
    opt = {"name": "sgd", "learning_rate": 0.1, "schedule": {"name": schedule, **options}}
    result, events = run({"optimizer": opt, "dataset": CLASSES, **QUICK}, tmp_path)
    assert_trained(result, events)
    rates = [e.learning_rate for e in steps_of(events)]
    assert rates[0] == pytest.approx(0.1, rel=1e-5) and rates[-1] < rates[0]


def test_exponential_decay_rates_are_the_ones_used(tmp_path):
    opt = {
        "name": "sgd",
        "learning_rate": 0.1,
        "schedule": {"name": "exponential_decay", "decay_steps": 1, "decay_rate": 0.5},
    }
    _, events = run({"optimizer": opt, "dataset": CLASSES, **QUICK}, tmp_path)
    expected = [0.1 * 0.5**i for i in range(6)]
    assert [e.learning_rate for e in steps_of(events)] == pytest.approx(expected, rel=1e-5)


IMAGES = {"name": "synthetic_images", "num_samples": 64, "image_size": 8}
SEQUENCES = {"name": "synthetic_sequence", "num_samples": 64, "sequence_length": 6}
TWO_BRANCHES = [
    {"type": "dense", "units": 4, "name": "a"},
    {"type": "dense", "units": 4, "name": "b", "inputs": ["input"]},
]
LAYER_CASES = {
    "batch_normalization": (IMAGES, [{"type": "flatten"}, {"type": "batch_normalization"}]),
    "conv2d": (IMAGES, [{"type": "conv2d", "filters": 4}]),
    "dense": (CLASSES, [{"type": "dense", "units": 5}]),
    "dropout": (CLASSES, [{"type": "dense", "units": 5}, {"type": "dropout", "rate": 0.3}]),
    "embedding": (
        {**SEQUENCES, "vocab_size": 12},
        [{"type": "embedding", "output_dim": 4}, {"type": "lstm", "units": 4}],
    ),
    "flatten": (IMAGES, [{"type": "flatten"}]),
    "gru": (SEQUENCES, [{"type": "gru", "units": 4}, {"type": "gru", "units": 3}]),
    "lstm": (SEQUENCES, [{"type": "lstm", "units": 4}]),
    "max_pool2d": (IMAGES, [{"type": "conv2d", "filters": 4}, {"type": "max_pool2d"}]),
    "simple_rnn": (SEQUENCES, [{"type": "simple_rnn", "units": 4}]),
    # Each added layer in the smallest model that reads what it needs.
    "activation": (
        CLASSES,
        [{"type": "dense", "units": 5}, {"type": "activation", "activation": "tanh"}],
    ),
    "add": (CLASSES, [*TWO_BRANCHES, {"type": "add", "inputs": ["a", "b"]}]),
    "average_pool1d": (SEQUENCES, [{"type": "average_pool1d"}]),
    "average_pool2d": (IMAGES, [{"type": "average_pool2d", "padding": "same"}]),
    "bidirectional": (SEQUENCES, [{"type": "bidirectional", "cell": "gru", "units": 3}]),
    "concatenate": (CLASSES, [*TWO_BRANCHES, {"type": "concatenate", "inputs": ["a", "b"]}]),
    "conv1d": (SEQUENCES, [{"type": "conv1d", "filters": 4, "padding": "causal"}]),
    "conv2d_transpose": (IMAGES, [{"type": "conv2d_transpose", "filters": 3, "strides": 2}]),
    "depthwise_conv1d": (SEQUENCES, [{"type": "depthwise_conv1d", "depth_multiplier": 2}]),
    "depthwise_conv2d": (IMAGES, [{"type": "depthwise_conv2d"}]),
    "global_average_pool1d": (SEQUENCES, [{"type": "global_average_pool1d"}]),
    "global_average_pool2d": (IMAGES, [{"type": "global_average_pool2d"}]),
    "global_max_pool1d": (SEQUENCES, [{"type": "global_max_pool1d"}]),
    "global_max_pool2d": (IMAGES, [{"type": "global_max_pool2d"}]),
    "group_normalization": (
        IMAGES,
        [{"type": "conv2d", "filters": 4}, {"type": "group_normalization", "groups": 2}],
    ),
    "layer_normalization": (
        CLASSES,
        [{"type": "dense", "units": 5}, {"type": "layer_normalization"}],
    ),
    "max_pool1d": (SEQUENCES, [{"type": "max_pool1d"}]),
    "multi_head_attention": (
        {**SEQUENCES, "vocab_size": 12},
        [
            {"type": "embedding", "output_dim": 8, "positional": True},
            {"type": "multi_head_attention", "num_heads": 2, "key_dim": 4, "dropout": 0.1},
        ],
    ),
    "multiply": (CLASSES, [*TWO_BRANCHES, {"type": "multiply", "inputs": ["a", "b"]}]),
    "position_embedding": (
        SEQUENCES,
        [{"type": "dense", "units": 4}, {"type": "position_embedding"}],
    ),
    "random_contrast": (IMAGES, [{"type": "random_contrast", "factor": 0.2}]),
    "random_crop": (IMAGES, [{"type": "random_crop", "height": 6, "width": 5}]),
    "random_flip": (IMAGES, [{"type": "random_flip"}]),
    "random_rotation": (IMAGES, [{"type": "random_rotation", "factor": 0.1}]),
    "random_zoom": (IMAGES, [{"type": "random_zoom", "factor": 0.2}]),
    "rescaling": (IMAGES, [{"type": "rescaling", "scale": 2.0, "offset": -1.0}]),
    "reshape": (
        IMAGES,
        [{"type": "reshape", "target_shape": [16, -1]}, {"type": "conv1d", "filters": 2}],
    ),
    "separable_conv1d": (SEQUENCES, [{"type": "separable_conv1d", "filters": 4}]),
    "separable_conv2d": (IMAGES, [{"type": "separable_conv2d", "filters": 4}]),
    "upsampling1d": (SEQUENCES, [{"type": "upsampling1d"}]),
    "upsampling2d": (IMAGES, [{"type": "upsampling2d", "interpolation": "bilinear"}]),
}


def test_layer_cases_cover_every_layer():
    assert set(LAYER_CASES) == set(names.LAYERS)


@pytest.mark.parametrize("layer", sorted(LAYER_CASES))
def test_every_layer_trains(layer, tmp_path):
    data, layers = LAYER_CASES[layer]
    result, events = run(
        {"model": {"architecture": "layers", "layers": layers}, "dataset": data, **QUICK}, tmp_path
    )
    assert_trained(result, events)


@pytest.mark.parametrize(
    ("architecture", "data"),
    [
        ("linear", CLASSES),
        ("mlp", CLASSES),
        ("cnn", IMAGES),
        ("rnn", SEQUENCES),
        ("rnn", {**SEQUENCES, "vocab_size": 10}),
    ],
)
def test_every_architecture_trains(architecture, data, tmp_path):
    result, events = run({"model": architecture, "dataset": data, **QUICK}, tmp_path)
    assert_trained(result, events)


def test_metrics_are_reported_under_their_names(tmp_path):
    spec = {
        "dataset": {**CLASSES, "validation_split": 0.25},
        "loss": "categorical_crossentropy",
        "metrics": ["accuracy", "auc", "precision", "recall", "top_k_categorical_accuracy"],
        "training": {"steps": 6, "batch_size": 16, "eval_every": 3},
    }
    result, events = run(spec, tmp_path)
    evals = [e for e in events if e.kind == "eval"]
    assert [e.step for e in evals] == [3, 6]
    assert all(e.split == "validation" for e in evals)
    assert set(evals[0].values) == {
        "loss",
        "accuracy",
        "auc",
        "precision",
        "recall",
        "top_k_categorical_accuracy",
    }
    assert set(result.test_metrics) == set(evals[0].values)


def test_step_values_are_the_batch_loss_and_accuracy(tmp_path):
    """With a zero learning rate the weights never move, so each step's streamed loss and
    accuracy can be recomputed from the saved model and the same batch."""
    spec = JobSpec.parse(
        {
            "dataset": CLASSES,
            "optimizer": {"name": "sgd", "learning_rate": 1e-30},
            "training": {"steps": 8, "batch_size": 16, "shuffle": False},
            "runtime": {"steps_per_execution": 3},
        }
    )
    result, events = run(spec, tmp_path)
    from stepstream_service.engine import datasets

    data = datasets.load(spec, DataPaths())
    model = keras.models.load_model(result.model_path)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    for event in steps_of(events):
        i = ((event.step - 1) * 16) % len(data.x_train)
        x, y = data.x_train[i : i + 16], data.y_train[i : i + 16]
        pred = model.predict_on_batch(x)
        assert event.loss == pytest.approx(float(loss_fn(y, pred)), rel=1e-4)
        assert event.accuracy == pytest.approx(float(np.mean(pred.argmax(-1) == y)))


def test_non_finite_loss_fails_naming_the_step(tmp_path):
    spec = {
        "dataset": {"name": "linear", "noise": 10.0},
        "model": "linear",
        "optimizer": {"name": "sgd", "learning_rate": 1e6},
        "training": {"steps": 200, "batch_size": 100},
    }
    result, events = run(spec, tmp_path)
    assert result.outcome == "failed" and result.failure.reason == "non_finite_loss"
    last = steps_of(events)[-1]
    assert not math.isfinite(last.loss) and result.failure.step == last.step
    assert f"step {last.step}" in result.failure.message
    assert all(math.isfinite(e.loss) for e in steps_of(events)[:-1])


def test_should_stop_is_honoured_within_one_window(tmp_path):
    seen = []
    spec = {
        "dataset": CLASSES,
        "training": {"steps": 600, "batch_size": 8},
        "runtime": {"steps_per_execution": 10},
    }

    def should_stop():
        seen.append(True)
        return len(seen) >= 2

    result, events = run(spec, tmp_path, should_stop)
    assert result.outcome == "cancelled" and result.stop_reason == "cancelled"
    assert result.steps == 20 and len(steps_of(events)) == 20
    assert result.model_path is None


def test_max_duration_fails_with_a_timeout(tmp_path):
    spec = {"dataset": CLASSES, "training": {"steps": 100000, "batch_size": 8, "max_duration": 0.5}}
    result, _ = run(spec, tmp_path)
    assert result.outcome == "failed" and result.failure.reason == "max_duration_exceeded"
    assert 0 < result.steps < 100000


@pytest.mark.parametrize(
    "model", ["cnn", {"architecture": "mlp", "dropout": 0.3}], ids=["cnn", "mlp-xla-dropout"]
)
def test_same_seed_same_run(model, tmp_path):
    spec = {
        "dataset": {**IMAGES, "validation_split": 0.2},
        "model": model,
        "training": {"steps": 12, "batch_size": 8, "seed": 5},
    }
    _, first = run(spec, tmp_path, workdir=tmp_path / "a")
    _, second = run(spec, tmp_path, workdir=tmp_path / "b")
    assert [e.loss for e in steps_of(first)] == [e.loss for e in steps_of(second)]
    spec["training"]["seed"] = 6
    _, third = run(spec, tmp_path, workdir=tmp_path / "c")
    assert [e.loss for e in steps_of(first)] != [e.loss for e in steps_of(third)]


def test_resume_from_a_checkpoint_continues_the_same_run(tmp_path):
    spec = {
        "dataset": CLASSES,
        "optimizer": "adam",
        "training": {"steps": 40, "batch_size": 8, "checkpoint_every": 10},
        # Windows of 10 steps whatever the machine's speed ("auto" sizes them by time).
        "runtime": {"steps_per_execution": 10},
    }
    whole, whole_events = run(spec, tmp_path, workdir=tmp_path / "whole")
    assert [e.step for e in whole_events if e.kind == "checkpoint"] == [10, 20, 30]

    calls = []  # windows are 10 steps: the third stop check comes after the step-20 checkpoint
    stopped, _ = run(
        spec, tmp_path, lambda: calls.append(1) or len(calls) >= 3, workdir=tmp_path / "split"
    )
    assert stopped.outcome == "cancelled" and latest_checkpoint(tmp_path / "split")[0] == 20
    resumed, resumed_events = run(spec, tmp_path, resume=True, workdir=tmp_path / "split")
    assert [e.step for e in steps_of(resumed_events)] == list(range(21, 41))
    expected = [e.loss for e in steps_of(whole_events)][20:]
    assert [e.loss for e in steps_of(resumed_events)] == pytest.approx(expected, rel=1e-5)
    assert resumed.test_metrics == pytest.approx(whole.test_metrics, rel=1e-5)


RESUMABLE = {
    "dataset": CLASSES,
    "optimizer": "adam",
    "training": {"steps": 30, "batch_size": 8, "checkpoint_every": 10},
}


def warnings_of(events):
    return [e.message for e in events if e.kind == "log" and e.level == "warning"]


def test_a_damaged_newest_checkpoint_is_passed_over_and_said(tmp_path):
    _, whole_events = run(RESUMABLE, tmp_path)
    folder = tmp_path / "work" / "checkpoints"
    newest = folder / "step-000000020.keras"
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed, events = run(RESUMABLE, tmp_path, resume=True)
    assert warnings_of(events) == [
        "checkpoint at step 20 is damaged (sha256 mismatch); resumed from checkpoint at step 10"
    ]
    assert [e.step for e in steps_of(events)] == list(range(11, 31))
    expected = [e.loss for e in steps_of(whole_events)][10:]
    assert [e.loss for e in steps_of(events)] == pytest.approx(expected, rel=1e-5)
    assert resumed.outcome == "succeeded"


def test_checkpoints_that_will_not_load_leave_a_fresh_start_said(tmp_path):
    """Whole by their checksums yet not models: each is passed over, and training starts
    from step 0 as a fresh run would, not from weights half loaded."""
    _, whole_events = run(RESUMABLE, tmp_path)
    folder = tmp_path / "work" / "checkpoints"
    for step in (10, 20):
        (folder / f"step-{step:09d}.keras").write_bytes(b"not a model")
        record_checkpoint(folder, step)
    resumed, events = run(RESUMABLE, tmp_path, resume=True)
    (said,) = warnings_of(events)
    assert said.startswith("checkpoint at step 20 could not be loaded (")
    assert "; checkpoint at step 10 could not be loaded (" in said
    assert said.endswith("; no intact checkpoint is left, so training starts from step 0")
    expected = [e.loss for e in steps_of(whole_events)]
    assert [e.loss for e in steps_of(events)] == pytest.approx(expected, rel=1e-5)
    assert resumed.outcome == "succeeded"


def test_a_resume_without_any_checkpoint_starts_quietly(tmp_path):
    _, events = run(QUICK | {"dataset": CLASSES}, tmp_path, resume=True)
    assert warnings_of(events) == []
    assert not [e for e in events if e.kind == "log" and "checkpoint" in e.message]


def test_only_the_latest_checkpoints_are_kept(tmp_path):
    spec = {"dataset": CLASSES, "training": {"steps": 50, "batch_size": 8, "checkpoint_every": 10}}
    run(spec, tmp_path)
    kept = sorted(p.name for p in (tmp_path / "work" / "checkpoints").glob("step-*"))
    assert kept == [
        "step-000000030.keras",
        "step-000000030.keras.sha256",
        "step-000000040.keras",
        "step-000000040.keras.sha256",
    ]


def test_early_stopping(tmp_path):
    spec = {
        "dataset": CLASSES,
        "training": {
            "steps": 300,
            "batch_size": 8,
            "eval_every": 5,
            "early_stopping": {"monitor": "val_loss", "patience": 1, "min_delta": 100.0},
        },
    }
    result, _ = run(spec, tmp_path)
    assert result.outcome == "succeeded" and result.stop_reason == "early_stopping"
    assert result.steps == 10 and result.model_path


def test_target_metric_stops_the_run(tmp_path):
    spec = {
        "dataset": {**CLASSES, "noise": 0.1},
        "training": {
            "steps": 2000,
            "batch_size": 16,
            "eval_every": 20,
            "target": {"metric": "val_accuracy", "value": 0.9},
        },
    }
    result, _ = run(spec, tmp_path)
    assert result.stop_reason == "target_reached" and result.final_eval["accuracy"] >= 0.9
    assert result.steps < 2000


def test_saved_model_loads_and_predicts(tmp_path):
    result, _ = run({"dataset": IMAGES, "model": "cnn", **QUICK}, tmp_path)
    model = keras.models.load_model(result.model_path)
    probs = model.predict(np.zeros((3, 8, 8, 1), "float32"), verbose=0)
    assert probs.shape == (3, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_epochs_cover_the_data(tmp_path):
    spec = {"dataset": CLASSES, "training": {"epochs": 3, "batch_size": 10}}
    result, events = run(spec, tmp_path)
    assert result.steps == 3 * math.ceil(64 / 10) == len(steps_of(events))


@pytest.mark.skipif(gpu_available(), reason="checks the refusal on a machine with no GPU")
def test_a_gpu_job_is_refused_on_a_cpu_worker(tmp_path):
    with pytest.raises(NoGPU, match="has none"):
        run({**QUICK, "dataset": CLASSES, "runtime": {"device": "gpu"}}, tmp_path)


def test_mixed_bfloat16_trains_and_restores_the_policy(tmp_path):
    before = keras.config.dtype_policy().name
    result, events = run(
        {
            "dataset": CLASSES,
            "runtime": {"precision": "mixed_bfloat16", "steps_per_execution": 3},
            "training": {"steps": 6, "batch_size": 16},
        },
        tmp_path,
    )
    assert_trained(result, events)
    assert keras.config.dtype_policy().name == before


def built(events) -> str:
    return next(e.message for e in events if e.kind == "log" and e.message.startswith("built"))


@pytest.mark.parametrize(
    ("data", "model", "jit", "xla"),
    [
        (CLASSES, "mlp", "auto", True),  # dense layers: XLA trains them faster on the CPU
        (CLASSES, "linear", "auto", True),
        (IMAGES, "cnn", "auto", False),  # XLA's CPU convolutions are slower than TensorFlow's
        (SEQUENCES, "rnn", "auto", False),
        (CLASSES, "mlp", False, False),
        (IMAGES, "cnn", True, True),
    ],
)
def test_xla_is_used_where_it_is_faster_on_the_cpu(data, model, jit, xla, tmp_path, monkeypatch):
    assert not gpu_available()
    # These jobs are a few steps long: as if they were long enough for XLA to pay.
    monkeypatch.setattr(trainer, "XLA_MIN_STEPS", 1)
    spec = {**QUICK, "dataset": data, "model": model}
    spec["runtime"] = {**QUICK["runtime"], "jit_compile": jit}
    result, events = run(spec, tmp_path)
    assert_trained(result, events)
    assert ("compiled with XLA" in built(events)) is xla


def test_a_short_job_is_not_compiled_with_xla(tmp_path):
    """Compiling costs more than it saves on a short job, so auto leaves it off there."""
    spec = {**QUICK, "dataset": CLASSES, "model": "mlp"}
    assert QUICK["training"]["steps"] < trainer.XLA_MIN_STEPS
    result, events = run(spec, tmp_path)
    assert_trained(result, events)
    assert "compiled with XLA" not in built(events)


def test_xla_trains_the_same_run_as_tensorflows_kernels(tmp_path):
    """The same seed with and without XLA: the same steps, up to float rounding."""
    spec = {
        "dataset": CLASSES,
        "model": {"architecture": "mlp", "hidden_units": [16]},
        "optimizer": {"name": "sgd", "learning_rate": 0.05},
        "training": {"steps": 30, "batch_size": 16, "seed": 3},
        "runtime": {"steps_per_execution": 5},
    }
    runs = {}
    for jit in (True, False):
        spec["runtime"]["jit_compile"] = jit
        _, events = run(spec, tmp_path, workdir=tmp_path / str(jit))
        runs[jit] = steps_of(events)
    assert [e.loss for e in runs[True]] == pytest.approx([e.loss for e in runs[False]], rel=1e-4)
    assert [e.accuracy for e in runs[True]] == [e.accuracy for e in runs[False]]
