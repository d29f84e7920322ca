"""engine.keras_models and engine.config_footprint: a Keras config and keras.applications
backbones build, train a few steps, and are sized (and shape-checked) before allocation."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest

from stepstream.kernel.spec import JobSpec, SpecError
from stepstream_service.engine import config_footprint, footprint, keras_models, models
from stepstream_service.engine.datasets import DataPaths, load
from stepstream_service.engine.trainer import train

IMAGES = {"name": "synthetic_images", "image_size": 12, "num_classes": 3, "num_samples": 64}


def resnet_ish() -> keras.Model:
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    y = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.SeparableConv2D(8, 3, padding="same")(y)
    x = keras.layers.Activation("relu")(keras.layers.Add()([x, y]))
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(4, 3, strides=2, groups=2, use_bias=False)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.1)(keras.layers.LayerNormalization()(x))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def keras_job(model: keras.Model, **more) -> JobSpec:
    fields = {"dataset": IMAGES, "training": {"steps": 6, "batch_size": 8}}
    fields["runtime"] = {"steps_per_execution": 3}
    return JobSpec.from_keras(model, **(fields | more))


def test_a_resnet_ish_config_trains_and_is_the_model_that_was_sent(tmp_path):
    sent = resnet_ish()
    spec = keras_job(sent)
    events: list = []
    result = train(spec, events.append, workdir=tmp_path, paths=DataPaths(download=False))
    assert result.outcome == "succeeded" and result.steps == 6
    saved = keras.models.load_model(result.model_path)
    assert saved.count_params() == sent.count_params()
    kinds = {type(layer).__name__ for layer in saved.layers[1].layers}
    assert {"Add", "SeparableConv2D", "DepthwiseConv2D"} <= kinds


def test_the_config_walk_counts_what_keras_counts():
    sent = resnet_ish()
    stack = config_footprint.config_stack(keras_job(sent).model.graph)
    assert stack.params == sent.count_params()
    trainable = sum(math.prod(v.shape) for v in sent.trainable_weights)
    assert stack.trainable == trainable
    # The activations: every layer's output, from the shapes the config writes.
    outputs = sum(math.prod(layer.output.shape[1:]) for layer in sent.layers[1:])
    assert stack.activations == outputs + 12 * 12


def test_the_worker_counts_exactly_without_allocating():
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.ConvLSTM1D(4, 3)(keras.layers.Reshape((12, 12, 1))(inputs))  # no walk rule
    x = keras.layers.Flatten()(x)
    sent = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    spec = keras_job(sent)
    walked = footprint.estimate(spec)
    exact = keras_models.exact_footprint(spec, walked)
    assert walked.params < sent.count_params() == exact.params
    assert exact.weights == 4 * sent.count_params()
    assert spec.model.config["config"]["layers"], "the spec's config is left whole"


def test_a_lambda_is_refused_by_the_engine_too():
    spec = keras_job(resnet_ish())
    spec.model.config["config"]["layers"][1]["class_name"] = "Lambda"
    with pytest.raises(SpecError, match=r"\(Lambda\) is refused"):
        keras_models.load_config(spec)


def test_submit_checks_the_input_and_the_output_against_the_data():
    flat_in = keras.Input((144,))
    flat = keras.Model(flat_in, keras.layers.Dense(3, activation="softmax")(flat_in))
    with pytest.raises(SpecError, match=r"gives \(12, 12, 1\) per example; set dataset.flatten"):
        config_footprint.check_job(keras_job(flat))
    config_footprint.check_job(keras_job(flat, dataset=IMAGES | {"flatten": True}))
    inputs = keras.Input((12, 12, 1))
    four = keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(inputs))
    with pytest.raises(SpecError) as caught:
        config_footprint.check_job(keras_job(keras.Model(inputs, four)))
    assert "gives (4,) per example; the data and loss need (3,)" in str(caught.value)
    assert caught.value.fields == ["model.config"]


# ---------------------------------------------------------------- backbones


def backbone_job(name: str, dataset: dict | None = None, **more) -> JobSpec:
    data = dataset or {"name": "synthetic_images", "image_size": 32, "num_classes": 3}
    return JobSpec.parse(
        {
            "model": {"architecture": "backbone", "name": name, **more},
            "dataset": data | {"evaluate_on_test": False, "num_samples": 32},
            "training": {"steps": 2, "batch_size": 8},
            "runtime": {"steps_per_execution": 1, "jit_compile": False},
        }
    )


def test_mobilenet_v2_with_no_weights_trains_a_few_steps_on_small_grey_images(tmp_path):
    spec = backbone_job("mobilenet_v2")
    result = train(spec, [].append, workdir=tmp_path, paths=DataPaths(download=False))
    assert result.outcome == "succeeded" and result.steps == 2


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet50"])
def test_every_other_backbone_trains_its_head_a_few_steps(name, tmp_path):
    """Frozen (trainable: false): the same build and forward pass, without the gradient graph
    through the whole backbone, which alone takes tens of seconds to trace."""
    spec = backbone_job(name, trainable=False)
    events: list = []
    result = train(spec, events.append, workdir=tmp_path, paths=DataPaths(download=False))
    assert result.outcome == "succeeded" and result.steps == 2
    assert [e.step for e in events if e.kind == "step"] == [1, 2]


@pytest.mark.parametrize("name", sorted(config_footprint.BACKBONE_SIZES))
def test_the_backbone_table_is_what_keras_builds(name):
    size = config_footprint.BACKBONE_SIZES[name]
    with keras.StatelessScope():  # declared, never allocated
        built = keras_models.APPLICATIONS[name](
            include_top=False, weights=None, input_shape=(32, 32, 3)
        )
        outputs = sum(math.prod(layer.output.shape[1:]) for layer in built.layers[1:])
    assert built.count_params() == size.params
    assert sum(math.prod(v.shape) for v in built.trainable_weights) == size.trainable
    assert max(math.prod(v.shape) for v in built.weights) == size.largest
    assert outputs <= size.per_pixel * 32 * 32 < 1.1 * outputs


def test_a_backbone_estimate_and_the_built_model_agree():
    spec = backbone_job("mobilenet_v2")
    data = load(spec, DataPaths(download=False))
    with keras.StatelessScope():
        built = models.build(spec, data)
    assert footprint.estimate(spec).params == built.count_params()


def test_small_images_need_input_size():
    with pytest.raises(SpecError) as caught:
        config_footprint.check_job(backbone_job("resnet50", IMAGES))
    assert caught.value.fields == ["model.input_size"]
    assert "resnet50 takes images of at least 32x32" in str(caught.value)
    config_footprint.check_job(backbone_job("resnet50", IMAGES, input_size=32))


def test_uploaded_weights_are_loaded_from_the_uploads_only(tmp_path):
    spec = backbone_job("mobilenet_v2", weights="uploads/mnv2.weights.h5", trainable=False)
    data = load(spec, DataPaths(download=False))
    source = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    (tmp_path / "uploads").mkdir()
    source.save_weights(tmp_path / "uploads" / "mnv2.weights.h5")
    paths = DataPaths(data_dir=tmp_path, uploads=tmp_path / "uploads", download=False)
    built = models.build(spec, data, paths)
    inner = built.get_layer(keras_models.BACKBONE_LAYER)
    assert np.array_equal(inner.weights[0].numpy(), source.weights[0].numpy())
    assert not inner.trainable_weights
    (tmp_path / "elsewhere.weights.h5").write_bytes(b"")
    outside = backbone_job("mobilenet_v2", weights="elsewhere.weights.h5")
    with pytest.raises(SpecError, match="not one of the uploads"):
        models.build(outside, data, paths)


def test_grey_images_become_the_three_channels_resnet_reads():
    spec = backbone_job("resnet50")
    x = keras.Input((4, 4, 1))
    y = keras_models._adapter(x, "resnet50", 1, 1.0)
    out = keras.Model(x, y).predict(np.full((1, 4, 4, 1), 0.5, "float32"), verbose=0)
    assert out.shape == (1, 4, 4, 3) and spec.model.name == "resnet50"
    assert out[0, 0, 0] == pytest.approx([127.5 - 103.939, 127.5 - 116.779, 127.5 - 123.68])
    assert json.loads(json.dumps(spec.to_dict()))["model"]["name"] == "resnet50"
