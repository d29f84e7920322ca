"""A model built locally with Keras, sent as its config through JobSpec.from_keras, trains
through a real server; a config that would run code is refused at submit, naming the layer."""

from __future__ import annotations

import json

import grpc
import keras
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from stepstream.kernel.spec import JobSpec
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.slow

IMAGES = {"name": "synthetic_images", "image_size": 12, "num_classes": 3, "num_samples": 96}


def small_resnet(blocks: int = 2) -> keras.Model:
    """Residual blocks (two convolutions and a skip connection each), pooled, a softmax."""
    inputs = keras.Input((12, 12, 1), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    for _ in range(blocks):
        y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
        y = keras.layers.BatchNormalization()(y)
        y = keras.layers.Conv2D(8, 3, padding="same")(y)
        x = keras.layers.Activation("relu")(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_a_functional_resnet_from_keras_trains_to_succeeded(client):
    spec = JobSpec.from_keras(
        small_resnet(),
        name="resnet-from-keras",
        loss="sparse_categorical_crossentropy",
        optimizer={"name": "adam", "learning_rate": 0.01},
        dataset=IMAGES,
        training={"steps": 20, "batch_size": 16},
        runtime={"steps_per_execution": 10},
    )
    job = client.submit(spec)
    events = list(job.stream())
    assert [e.state for e in events if e.kind == "state"] == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert [e.step for e in events if e.kind == "step"] == list(range(1, 21))


def test_a_config_with_a_lambda_layer_is_refused_at_submit_naming_it(service):
    model = small_resnet(blocks=1)
    config = json.loads(model.to_json())
    config["config"]["layers"].insert(
        1,
        {
            "module": "keras.layers",
            "class_name": "Lambda",
            "name": "sneaky",
            "config": {"name": "sneaky", "function": {"class_name": "__lambda__"}},
            "registered_name": None,
        },
    )
    spec = {"model": {"architecture": "keras", "config": config}, "dataset": IMAGES}
    with grpc.insecure_channel(service.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateJob(pb.CreateJobRequest(spec_json=json.dumps(spec)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in rpc_status.from_call(caught.value).details)
    [violation] = bad.field_violations
    assert violation.field == "spec.model.config"
    assert "layer 'sneaky' (Lambda) is refused" in violation.description


def test_a_config_whose_input_does_not_fit_the_data_is_refused_at_submit(service):
    inputs = keras.Input((10, 10, 1))
    x = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    spec = {
        "model": {"architecture": "keras", "config": json.loads(model.to_json())},
        "dataset": IMAGES,
    }
    with grpc.insecure_channel(service.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateJob(pb.CreateJobRequest(spec_json=json.dumps(spec)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes (10, 10, 1) but dataset synthetic_images gives (12, 12, 1)" in (
        caught.value.details()
    )
