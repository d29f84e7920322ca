"""The whole-model architectures: a tenant's Keras config, loaded in safe mode, and
keras.applications backbones. Each is a builder of engine.models' registry.

A config was walked by the spec (stepstream.kernel.keras_config: built-in classes only); it is
walked again here and then loaded with Keras's safe mode, a second line. Its own outputs are
the model's outputs. A backbone gets a frozen 1x1 convolution that brings any image to the
3 channels and the value range its weights expect, global pooling, and engine.models' output
layer.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from stepstream.kernel import keras_config
from stepstream.kernel.spec import BackboneModel, JobSpec, KerasModel, Problem, SpecError
from stepstream_service.engine.datasets import Data, DataPaths, _inside_uploads
from stepstream_service.engine.footprint import FLOAT, Footprint, optimizer_slots
from stepstream_service.engine.registry import Registry

Tensor = keras.KerasTensor

APPLICATIONS: dict[str, Callable[..., keras.Model]] = {
    "efficientnet_b0": keras.applications.EfficientNetB0,
    "mobilenet_v2": keras.applications.MobileNetV2,
    "resnet50": keras.applications.ResNet50,
}
BACKBONES: Registry[Callable[..., keras.Model]] = Registry("backbone", APPLICATIONS)
# What each backbone's weights expect of an image in [0, 1] (its preprocess_input): a scale,
# an offset per channel, and whether the channels are read in BGR order.
_INPUT_RANGE: dict[str, tuple[float, tuple[float, float, float], bool]] = {
    "efficientnet_b0": (255.0, (0.0, 0.0, 0.0), False),  # it normalizes inside
    "mobilenet_v2": (2.0, (-1.0, -1.0, -1.0), False),
    "resnet50": (255.0, (-103.939, -116.779, -123.68), True),  # "caffe": BGR, mean removed
}


BACKBONE_LAYER = "backbone"


def _refused(field: str, message: str) -> SpecError:
    return SpecError([Problem(field, message)])


# ---------------------------------------------------------------- a Keras config


def load_config(spec: JobSpec) -> keras.Model:
    """The config as a Keras model, in safe mode, after the kernel's walk (again)."""
    model: KerasModel = spec.model  # type: ignore[assignment]
    try:
        keras_config.check(model.config)
    except keras_config.ConfigRefused as exc:
        raise _refused("model.config", str(exc)) from None
    try:
        # A deep copy: Keras empties the mapping it reads, and the spec's must stay whole.
        config = copy.deepcopy(model.config)
        loaded = keras.saving.deserialize_keras_object(config, safe_mode=True)
    except Exception as exc:  # whatever Keras refuses in a config, the tenant must hear why
        first = (str(exc).splitlines() or [""])[0][:300]
        raise _refused(
            "model.config", f"Keras cannot load the config: {type(exc).__name__}: {first}"
        ) from None
    if not isinstance(loaded, keras.Model):
        raise _refused("model.config", f"the config is a {type(loaded).__name__}, not a model")
    return loaded


def config_body(spec: JobSpec, data: Data, x: Tensor) -> Tensor:
    """The config's model on the job's inputs; its outputs checked against the data."""
    model = load_config(spec)
    want = tuple(model.inputs[0].shape[1:])
    given = tuple(x.shape[1:])
    fits = len(want) == len(given)
    if not fits or any(w is not None and w != g for w, g in zip(want, given, strict=True)):
        raise _refused(
            "model.config",
            f"the model takes {want} per example but dataset {spec.dataset.name} gives {given}",
        )
    y = model(x)
    if tuple(y.shape[1:]) != (data.output_units,):
        raise _refused(
            "model.config",
            f"the model's output is {tuple(y.shape[1:])} per example; the data and loss need "
            f"({data.output_units},)",
        )
    return y


def named_model(spec: JobSpec, data: Data) -> keras.Model:
    """The config's model itself, for named data (several inputs or outputs): each input's
    and output's shape checked against the array named after it."""
    model = load_config(spec)
    assert isinstance(data.x_train, dict) and data.named_outputs is not None
    for tensor, name in zip(model.inputs, spec.model.input_names, strict=True):
        want, given = tuple(tensor.shape[1:]), tuple(data.x_train[name].shape[1:])
        if len(want) != len(given) or any(
            w is not None and w != g for w, g in zip(want, given, strict=True)
        ):
            raise _refused(
                "model.config",
                f"input {name!r} takes {want} per example but x_train:{name} gives {given}",
            )
    for tensor, name in zip(model.outputs, model.output_names, strict=True):
        units = data.named_outputs[name]
        if tuple(tensor.shape[1:]) != (units,):
            raise _refused(
                "model.config",
                f"output {name!r} is {tuple(tensor.shape[1:])} per example; y_train:{name} and "
                f"the loss need ({units},)",
            )
    return model


# ---------------------------------------------------------------- backbones


def _adapter(x: Tensor, name: str, channels: int, scale: float) -> Tensor:
    """A frozen 1x1 convolution: grey or colour images to the backbone's 3 channels, order
    and value range (a built-in layer, so the saved model loads anywhere)."""
    factor, offset, bgr = _INPUT_RANGE[name]
    kernel = np.zeros((1, 1, channels, 3), dtype="float32")
    for out in range(3):
        source = 0 if channels == 1 else (2 - out if bgr else out)
        kernel[0, 0, source, out] = factor * scale
    layer = keras.layers.Conv2D(
        3,
        1,
        kernel_initializer=keras.initializers.Constant(kernel),
        bias_initializer=keras.initializers.Constant(np.array(offset, dtype="float32")),
        trainable=False,
        name="backbone_input",
    )
    return layer(x)


def backbone(spec: JobSpec, shape: tuple[int, ...]) -> keras.Model:
    """keras.applications.<name> without its top, for images of `shape` (h, w, 3)."""
    model: BackboneModel = spec.model  # type: ignore[assignment]
    found = BACKBONES.get(model.name)(include_top=False, weights=None, input_shape=shape)
    found.name = BACKBONE_LAYER
    found.trainable = model.trainable
    return found


def load_weights(built: keras.Model, spec: JobSpec, paths: DataPaths | None) -> None:
    """Load a backbone's uploaded weights into the backbone of `built`: a file of the uploads
    folder (symlinks followed), never fetched from anywhere else."""
    model: BackboneModel = spec.model  # type: ignore[assignment]
    if model.weights == "none":
        return
    shown = model.weights
    file = None
    if paths is not None and paths.data_dir is not None and paths.uploads is not None:
        candidate = paths.data_dir / model.weights
        if _inside_uploads(Path(model.weights), candidate, paths.uploads):
            file = candidate
    if file is None or not file.is_file():
        raise _refused("model.weights", f"{shown}: not one of the uploads")
    layer = built.get_layer(BACKBONE_LAYER)
    try:
        layer.load_weights(file)
    except Exception as exc:  # a file for another backbone, a corrupt file
        raise _refused(
            "model.weights",
            f"{shown} is not a weights file of {model.name} without its top ({type(exc).__name__})",
        ) from None


def backbone_body(spec: JobSpec, data: Data, x: Tensor) -> Tensor:
    model: BackboneModel = spec.model  # type: ignore[assignment]
    if len(x.shape) != 4:
        raise _refused(
            "model.architecture", f"a backbone reads images; the data give {tuple(x.shape[1:])}"
        )
    if model.input_size:
        x = keras.layers.Resizing(model.input_size, model.input_size, name="resize")(x)
    h, w, c = x.shape[1:]
    least = model.info.min_size
    if min(h, w) < least:
        raise _refused(
            "model.input_size",
            f"{model.name} takes images of at least {least}x{least}; the data give {h}x{w}: "
            f"set model.input_size: {least} (or more)",
        )
    scale = 1.0 if spec.dataset.normalize else 1.0 / 255.0
    x = _adapter(x, model.name, c, scale)
    x = backbone(spec, (h, w, 3))(x)
    pool = keras.layers.GlobalAveragePooling2D if model.pooling == "avg" else None
    x = (pool or keras.layers.GlobalMaxPooling2D)(name="pool")(x)
    if model.dropout:
        x = keras.layers.Dropout(model.dropout, seed=spec.training.seed)(x)
    return x


# ---------------------------------------------------------------- the exact count


def exact_footprint(spec: JobSpec, estimate: Footprint) -> Footprint:
    """`estimate` with a Keras config's parameters counted exactly: the model is built inside
    keras.StatelessScope, where variables are declared but never allocated. Raises SpecError
    when the config does not load."""
    if not isinstance(spec.model, KerasModel):
        return estimate
    with keras.StatelessScope():
        model = load_config(spec)
        sizes = [math.prod(v.shape) for v in model.weights]
        trainable = sum(math.prod(v.shape) for v in model.trainable_weights)
    params, largest = sum(sizes), max(sizes, default=0)
    return dataclasses.replace(
        estimate,
        params=params,
        weights=params * FLOAT,
        gradients=trainable * FLOAT,
        optimizer=optimizer_slots(spec) * trainable * FLOAT + 2 * largest * FLOAT,
    )
