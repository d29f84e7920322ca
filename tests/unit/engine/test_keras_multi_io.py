"""A Keras config with several inputs and outputs trains from an npz's named arrays
(x_train:<input>, y_train:<output>); a missing array is refused naming it."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from stepstream.kernel.spec import JobSpec, SpecError
from stepstream_service.engine import config_footprint, footprint, keras_models
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.engine.trainer import train
from stepstream_service.errors import DatasetInvalid


def two_in_two_out() -> keras.Model:
    """A shared dense trunk over two concatenated inputs; two classification heads."""
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    trunk = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    kind = keras.layers.Dense(3, activation="softmax", name="kind")(trunk)
    sign = keras.layers.Dense(2, activation="softmax", name="sign")(trunk)
    return keras.Model({"a": a, "b": b}, {"kind": kind, "sign": sign})


def named_npz(path, rows: int = 48, drop: str | None = None) -> str:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(rows, 4)).astype("float32"), rng.normal(size=(rows, 3))
    arrays = {
        "x_train:a": a,
        "x_train:b": b,
        "y_train:kind": np.argmax(a[:, :3], axis=1),
        "y_train:sign": (b[:, 0] > 0).astype("int64"),
        "x_test:a": a[:16],
        "x_test:b": b[:16],
        "y_test:kind": np.argmax(a[:16, :3], axis=1),
        "y_test:sign": (b[:16, 0] > 0).astype("int64"),
    }
    np.savez(path, **{k: v for k, v in arrays.items() if k != drop})
    return str(path)


def job(path: str, **more) -> JobSpec:
    fields = {
        "dataset": {"name": "npz", "path": path},
        "loss": "sparse_categorical_crossentropy",
        "metrics": ["accuracy"],
        "training": {"steps": 6, "batch_size": 8},
        "runtime": {"steps_per_execution": 3},
    }
    return JobSpec.from_keras(two_in_two_out(), **(fields | more))


def test_two_inputs_and_two_outputs_train_from_named_arrays(tmp_path):
    spec = job(named_npz(tmp_path / "d.npz"))
    events: list = []
    result = train(spec, events.append, workdir=tmp_path, paths=DataPaths(download=False))
    assert result.outcome == "succeeded", result.failure
    steps = [e for e in events if type(e).__name__ == "StepEvent"]
    assert [e.step for e in steps] == list(range(1, 7))
    # The step loss is the total: two cross-entropies of 3 and 2 classes, near ln 3 + ln 2 at
    # the start, above what either output alone could give.
    assert steps[0].loss > np.log(3) + 0.2
    assert 0.0 <= steps[0].accuracy <= 1.0
    assert {"kind_accuracy", "sign_accuracy"} <= set(result.test_metrics)
    saved = keras.models.load_model(result.model_path)
    assert len(saved.inputs) == 2 and len(saved.outputs) == 2


def test_a_missing_named_array_is_refused_naming_it(tmp_path):
    spec = job(named_npz(tmp_path / "d.npz", drop="y_train:sign"))
    with pytest.raises(DatasetInvalid, match="has no array y_train:sign for the model's output"):
        train(spec, [].append, workdir=tmp_path, paths=DataPaths(download=False))


def test_several_inputs_need_the_npz_dataset():
    with pytest.raises(SpecError, match="npz with named arrays: x_train:<input name>"):
        JobSpec.from_keras(two_in_two_out(), dataset={"name": "synthetic_classification"})


def test_submit_reads_the_npz_headers_for_each_named_array(tmp_path):
    whole = footprint.npz_arrays(Path(named_npz(tmp_path / "d.npz")))
    footprint.check_npz(whole, 1 << 30)  # an upload of named arrays only is taken
    spec = job("uploads/d.npz")
    config_footprint.check_job(spec, whole)
    assert footprint.estimate(spec, whole).params == spec_params(spec)  # the config walked
    missing = footprint.npz_arrays(Path(named_npz(tmp_path / "m.npz", drop="x_train:b")))
    with pytest.raises(SpecError, match="no array x_train:b for the model's input 'b'"):
        config_footprint.check_job(spec, missing)


def spec_params(spec: JobSpec) -> int:
    return keras_models.load_config(spec).count_params()
