"""TensorBoard files, read back with TensorBoard's own reader: every streamed step's values,
every evaluation, weight histograms per layer, the graph, and one value per step after a
resume."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import (
    DEFAULT_SIZE_GUIDANCE,
    EventAccumulator,
)
from tensorboard.util import tensor_util

from stepstream.kernel.spec import JobSpec
from stepstream_service.engine import tensorboard
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.engine.trainer import train

# Keep every value: the reader samples down to 10,000 scalars and 500 histograms by default.
EVERYTHING = {**DEFAULT_SIZE_GUIDANCE, "scalars": 0, "histograms": 0, "tensors": 0}

SPEC = {
    "model": {"architecture": "mlp", "hidden_units": [5]},
    "dataset": {
        "name": "synthetic_classification",
        "num_samples": 64,
        "num_features": 6,
        "num_classes": 3,
        "validation_split": 0.25,
    },
    "optimizer": {
        "name": "sgd",
        "learning_rate": 0.05,
        "schedule": {"name": "exponential_decay", "decay_steps": 2, "decay_rate": 0.9},
    },
    "training": {"steps": 12, "batch_size": 8, "eval_every": 4, "checkpoint_every": 4},
    "runtime": {"steps_per_execution": 2},
}


def run(spec: dict, workdir, **kwargs):
    events = []
    result = train(
        JobSpec.parse(spec),
        events.append,
        workdir=workdir,
        paths=DataPaths(download=False),
        **kwargs,
    )
    return result, events


def board(workdir) -> EventAccumulator:
    acc = EventAccumulator(str(workdir / tensorboard.FOLDER), size_guidance=EVERYTHING)
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    found = acc.Scalars(tag)
    steps = [s.step for s in found]
    assert len(steps) == len(set(steps)), f"{tag}: a step written twice: {steps}"
    return {s.step: s.value for s in found}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("work")
    result, events = run(SPEC, workdir)
    assert result.outcome == "succeeded", result.failure
    return workdir, events, board(workdir)


def test_every_streamed_step_is_in_tensorboard_with_the_same_values(trained):
    _, events, acc = trained
    streamed = [e for e in events if e.kind == "step"]
    assert [e.step for e in streamed] == list(range(1, 13))
    for tag, field in (
        ("train/loss", "loss"),
        ("train/accuracy", "accuracy"),
        ("train/learning_rate", "learning_rate"),
    ):
        written = scalars(acc, tag)
        assert sorted(written) == [e.step for e in streamed]
        # The stream's values come from float32 on the device: TensorBoard's float32 is exact.
        assert [written[e.step] for e in streamed] == [getattr(e, field) for e in streamed]
    assert len(set(scalars(acc, "train/learning_rate").values())) > 1  # the schedule shows


def test_every_evaluation_and_the_test_metrics_are_written(trained):
    _, events, acc = trained
    evals = [e for e in events if e.kind == "eval"]
    assert [e.step for e in evals] == [4, 8, 12]
    for name in evals[0].values:
        written = scalars(acc, f"{evals[0].split}/{name}")
        assert written == {e.step: e.values[name] for e in evals}
    result = events[-1]
    for name, value in result.test_metrics.items():
        assert scalars(acc, f"test/{name}") == {12: value}


def test_each_layers_weights_and_biases_have_a_histogram_at_each_evaluation(trained):
    _, _, acc = trained
    # Two dense layers, 6 -> 5 -> 3, named as Keras names them in a fresh process.
    sizes = {"dense/kernel": 6 * 5, "dense/bias": 5, "dense_1/kernel": 5 * 3, "dense_1/bias": 3}
    found = {t for t in acc.Tags()["tensors"] if t.endswith("/histogram")}
    assert found == {f"{name}/histogram" for name in sizes}
    for name, size in sizes.items():
        written = acc.Tensors(f"{name}/histogram")
        assert [t.step for t in written] == [4, 8, 12]
        buckets = tensor_util.make_ndarray(written[-1].tensor_proto)  # (left, right, count)
        assert buckets.shape[1] == 3 and int(buckets[:, 2].sum()) == size


def test_the_model_graph_is_written(trained):
    _, _, acc = trained
    assert acc.Graph().node  # the op graph of the forward pass
    assert "keras" in acc.Tags()["tensors"]  # the Keras model graph (Graphs tab, "Keras")


def test_a_resumed_run_leaves_one_value_per_step(tmp_path):
    workdir = tmp_path / "work"
    # The first attempt stops after step 6 (its last checkpoint is at step 4)...
    calls = iter(range(100))
    result, first = run(SPEC, workdir, should_stop=lambda: next(calls) >= 2)
    assert result.stop_reason == "cancelled" and result.steps == 6
    # ... and the next resumes from step 4: its steps 5 and 6 replace the first attempt's.
    result, second = run(SPEC, workdir, resume=True)
    assert result.outcome == "succeeded"
    acc = board(workdir)
    loss = scalars(acc, "train/loss")
    assert sorted(loss) == list(range(1, 13))
    firsts = {e.step: e.loss for e in first if e.kind == "step" and e.step <= 4}
    seconds = {e.step: e.loss for e in second if e.kind == "step"}
    assert min(seconds) == 5
    assert loss == {**firsts, **seconds}
    assert [t.step for t in acc.Tensors("dense/kernel/histogram")] == [4, 8, 12]
