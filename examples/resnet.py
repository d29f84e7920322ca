"""Build a small ResNet for Fashion-MNIST with Keras and write it as a job file: the model is
sent as its config (JobSpec.from_keras), so any functional graph of built-in layers will do.

    python examples/resnet.py            # writes examples/resnet.json
    trainer submit examples/resnet.json --follow
"""

from __future__ import annotations

import json
from pathlib import Path

import keras

from stepstream.kernel.spec import JobSpec


def residual_block(x, filters: int, strides: int, name: str):
    """Two 3x3 convolutions and a skip connection (a 1x1 projection when the shape changes).
    Batch normalization's statistics follow quickly (momentum 0.9): the job is short. Every
    layer is named, so the config is the same whatever Keras built before in the process."""
    L = keras.layers
    y = L.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv1")(
        x
    )
    y = L.BatchNormalization(momentum=0.9, name=f"{name}_bn1")(y)
    y = L.Activation("relu", name=f"{name}_relu1")(y)
    y = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = L.BatchNormalization(momentum=0.9, name=f"{name}_bn2")(y)
    if strides != 1 or x.shape[-1] != filters:
        x = L.Conv2D(filters, 1, strides=strides, use_bias=False, name=f"{name}_project")(x)
        x = L.BatchNormalization(momentum=0.9, name=f"{name}_project_bn")(x)
    return L.Activation("relu", name=f"{name}_out")(L.Add(name=f"{name}_add")([x, y]))


def resnet(input_shape=(28, 28, 1), classes: int = 10) -> keras.Model:
    L = keras.layers
    inputs = keras.Input(input_shape, name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = L.Activation("relu", name="stem_relu")(
        L.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    )
    for i, (filters, strides) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        x = residual_block(x, filters, strides, name=f"block{i}")
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(classes, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name="small_resnet")


def job() -> dict:
    """The job file's fields: what JobSpec.from_keras(resnet(), **these) validates."""
    spec = JobSpec.from_keras(resnet(), **FIELDS)  # refuses anything a server would
    return {**FIELDS, "model": {"architecture": "keras", "config": spec.model.config}}


FIELDS = {
    "name": "fashion-resnet",
    "loss": "sparse_categorical_crossentropy",
    "optimizer": {"name": "adam", "learning_rate": 0.003},
    "dataset": {"name": "fashion_mnist", "validation_split": 0.1},
    "training": {"steps": 1000, "batch_size": 64, "eval_every": 250},
}


if __name__ == "__main__":
    out = Path(__file__).with_name("resnet.json")
    out.write_text(json.dumps(job(), indent=1) + "\n")
    print(f"wrote {out}")
