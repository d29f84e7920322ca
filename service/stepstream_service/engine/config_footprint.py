"""Whole models on shapes, without TensorFlow: a Keras config's and a backbone's parameters and
activations for the memory estimate, and their input and output shapes against the data, at
submit (the API process never imports TensorFlow).

A Keras config is walked layer by layer: each layer's input shape is written in the config
(its build_config, or the keras tensors of its inbound nodes), and the parameters of the common
layer classes follow from it and the layer's own config. A class with no rule here counts no
parameters; the worker counts them exactly (keras_models.exact_footprint, a build inside
keras.StatelessScope, which allocates no variable) before anything is allocated. A backbone's
figures come from a table measured from keras.applications (tests check it against Keras):
its parameters do not depend on the image size, its activations grow with the pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stepstream.kernel.keras_config import Graph, LayerInfo, Shape
from stepstream.kernel.spec import BackboneModel, JobSpec, KerasModel, Problem, SpecError
from stepstream_service.engine import footprint
from stepstream_service.engine.shapes import Stack as _Stack

WHOLE_MODELS = ("backbone", "keras")


@dataclass(frozen=True)
class BackboneSize:
    """keras.applications.<name>(include_top=False, weights=None) on 3 channels."""

    params: int
    trainable: int
    largest: int  # the largest variable, in parameters
    per_pixel: int  # activations kept per input pixel (the most measured from 32 to 224)


BACKBONE_SIZES = {
    "efficientnet_b0": BackboneSize(4_049_571, 4_007_548, 409_600, 548),
    "mobilenet_v2": BackboneSize(2_257_984, 2_223_872, 409_600, 441),
    "resnet50": BackboneSize(23_587_712, 23_534_592, 2_359_296, 742),
}
# The frozen 1x1 convolution that brings any image to the backbone's 3 channels and range.
ADAPTER_CHANNELS = 3


def _known(shape: Shape) -> tuple[int, ...]:
    return tuple(d or 1 for d in shape)


# ---------------------------------------------------------------- one layer


_SAME_SHAPE = {
    "Activation",
    "ActivityRegularization",
    "AlphaDropout",
    "BatchNormalization",
    "Dropout",
    "ELU",
    "GaussianDropout",
    "GaussianNoise",
    "GroupNormalization",
    "Identity",
    "LayerNormalization",
    "LeakyReLU",
    "Normalization",
    "PReLU",
    "ReLU",
    "RMSNormalization",
    "Rescaling",
    "Softmax",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "UnitNormalization",
}
_MERGE = {"Add", "Average", "Maximum", "Minimum", "Multiply", "Subtract"}


def _ints(value: Any, rank: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * rank
    return tuple(int(v) for v in value)


def _span(n: int | None, k: int, s: int, padding: str, d: int = 1) -> int | None:
    if n is None:
        return None
    k = (k - 1) * d + 1
    return max(math.ceil(n / s), 1) if padding == "same" else max((n - k) // s + 1, 1)


def output_shape(layer: LayerInfo) -> Shape | None:
    """One example's output shape, for the classes whose rule is plain; None otherwise."""
    if not layer.input_shapes:
        return None
    shape, c, cls = layer.input_shapes[0], layer.config, layer.class_name
    if cls in _SAME_SHAPE or cls in _MERGE:
        return shape
    if cls == "Dense":
        return (*shape[:-1], int(c["units"]))
    if cls == "Flatten":
        return (math.prod(_known(shape)),)
    if cls == "Reshape":
        return tuple(c.get("target_shape") or ())
    if cls.startswith("Global") and cls[-2:] in ("1D", "2D", "3D"):
        return (shape[-1],) if not c.get("keepdims") else (*(1,) * (len(shape) - 1), shape[-1])
    if cls == "Concatenate":
        axis = int(c.get("axis", -1))
        if axis != -1 or not all(s[-1] for s in layer.input_shapes):
            return None
        return (*shape[:-1], sum(s[-1] or 0 for s in layer.input_shapes))
    rank = {"1D": 1, "2D": 2, "3D": 3}.get(cls[-2:])
    if rank and len(shape) == rank + 1 and ("Conv" in cls or "Pooling" in cls):
        pool = "Pooling" in cls
        k = _ints(c.get("pool_size" if pool else "kernel_size", 1), rank)
        s = _ints(c.get("strides") or k, rank)
        d = _ints(c.get("dilation_rate", 1), rank)
        if "Transpose" in cls:
            return None
        spatial = tuple(
            _span(n, k[i], s[i], c.get("padding", "valid"), d[i]) for i, n in enumerate(shape[:-1])
        )
        if pool:
            channels = shape[-1]
        elif cls.startswith("Depthwise"):
            channels = (shape[-1] or 1) * int(c.get("depth_multiplier", 1))
        else:
            channels = int(c["filters"])
        return (*spatial, channels)
    return None


def parameters(layer: LayerInfo) -> tuple[int, int]:
    """(trainable, frozen) parameters of the common layer classes; (0, 0) for the rest."""
    if not layer.input_shapes:
        return 0, 0
    shape, c, cls = layer.input_shapes[0], layer.config, layer.class_name
    ch = shape[-1] if shape else None
    bias = 1 if c.get("use_bias", True) else 0
    if cls == "Dense" and ch:
        units = int(c["units"])
        return ch * units + bias * units, 0
    if cls == "Embedding":
        return int(c["input_dim"]) * int(c["output_dim"]), 0
    if cls == "BatchNormalization" and ch:
        return ch * (bool(c.get("scale", True)) + bool(c.get("center", True))), 2 * ch
    if cls in ("LayerNormalization", "GroupNormalization") and ch:
        return ch * (bool(c.get("scale", True)) + bool(c.get("center", True))), 0
    if cls == "RMSNormalization" and ch:
        return ch, 0
    rank = {"1D": 1, "2D": 2, "3D": 3}.get(cls[-2:])
    if rank and "Conv" in cls and ch and "LSTM" not in cls:
        k = math.prod(_ints(c.get("kernel_size", 1), rank))
        if cls.startswith("Depthwise"):
            out = ch * int(c.get("depth_multiplier", 1))
            return k * out + bias * out, 0
        filters = int(c["filters"])
        if cls.startswith("Separable"):
            depth = ch * int(c.get("depth_multiplier", 1))
            return k * depth + depth * filters + bias * filters, 0
        return k * ch // int(c.get("groups", 1)) * filters + bias * filters, 0
    if cls in ("LSTM", "GRU", "SimpleRNN") and ch:
        units, gates = int(c["units"]), {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}[cls]
        biases = gates * units * (2 if cls == "GRU" and c.get("reset_after", True) else 1)
        return ch * gates * units + units * gates * units + bias * biases, 0
    if cls == "MultiHeadAttention" and ch:
        heads, key = int(c["num_heads"]), int(c["key_dim"])
        value = int(c.get("value_dim") or key)
        proj = ch * heads * (2 * key + value) + bias * heads * (2 * key + value)
        return proj + heads * value * ch + bias * ch, 0
    return 0, 0


# ---------------------------------------------------------------- whole models


def config_stack(graph: Graph) -> _Stack:
    """A Keras config on shapes: footprint's _Stack filled from the walk."""
    _, first, _ = graph.inputs[0]
    stack = _Stack(_known(first))
    for layer in graph.layers:
        if layer.class_name == "InputLayer":
            continue
        trainable, frozen = parameters(layer)
        if layer.config.get("trainable") is False:
            trainable, frozen = 0, trainable + frozen
        stack.params += trainable + frozen
        stack.trainable += trainable
        stack.largest = max(stack.largest, trainable, frozen)
        out = output_shape(layer) or (layer.input_shapes[0] if layer.input_shapes else None)
        if out:
            stack.activations += math.prod(_known(out))
            stack.shape = _known(out)
    return stack


def backbone_stack(spec: JobSpec, image: tuple[int, ...]) -> _Stack:
    """A backbone, its adapter and pooling on shapes; the output layer is footprint's."""
    model: BackboneModel = spec.model  # type: ignore[assignment]
    h, w, c = image
    if model.input_size:
        h = w = model.input_size
    size = BACKBONE_SIZES[model.name]
    stack = _Stack((h, w, c))
    adapter = c * ADAPTER_CHANNELS + ADAPTER_CHANNELS
    stack.params = size.params + adapter
    stack.trainable = size.trainable if model.trainable else 0
    stack.largest = size.largest
    stack.activations += (h * w * ADAPTER_CHANNELS) + size.per_pixel * h * w
    stack.shape = (model.info.features,)
    return stack


def body(spec: JobSpec, data: Any) -> _Stack:
    """footprint._body for the whole models (data: footprint's _Data, or None)."""
    model = spec.model
    if isinstance(model, KerasModel):
        return config_stack(model.graph)
    shape = footprint._input_shape(spec, data) if data is not None else (32, 32, 3)
    if len(shape) != 3:
        shape = (32, 32, 3)
    return backbone_stack(spec, shape)


# ---------------------------------------------------------------- against the data


def check(spec: JobSpec, data: Any) -> None:
    """Refuse (SpecError) a config or backbone whose shapes do not fit the dataset's: the
    input, and the output's units against the classes or targets. `data` is footprint's
    _Data; None (an npz not seen yet) checks nothing. An npz's classes are not in its headers:
    its output units are checked when the worker has loaded it."""
    if data is None or spec.model.architecture not in WHOLE_MODELS:
        return
    given = footprint._input_shape(spec, data)
    problems = []
    if isinstance(spec.model, KerasModel):
        problems = list(_config_problems(spec, spec.model.graph, given, data))
    elif isinstance(spec.model, BackboneModel):
        problems = list(_backbone_problems(spec.model, given, spec.dataset.name))
    if problems:
        raise SpecError([Problem(field, message) for field, message in problems])


def check_job(spec: JobSpec, npz: Any = None, npz_file: Any = None) -> None:
    """check() from what the server knows at submit: the spec, and an upload's headers."""
    if isinstance(spec.model, KerasModel) and spec.model.several:
        if npz:
            _check_named(spec.model.graph, npz)
        return
    if spec.model.architecture in WHOLE_MODELS:
        check(spec, footprint._dataset(spec, npz, npz_file))


def _check_named(graph: Graph, npz: dict) -> None:
    """A config with several inputs or outputs against an npz's named arrays' headers: each
    input's array there, of its shape; each output's labels there (their classes are values,
    checked when the worker loads them)."""
    prefixes = {"x_train": ("x_train:", "x:"), "y_train": ("y_train:", "y:")}
    wanted = [("x_train", n, want) for n, want, _ in graph.inputs]
    wanted += [("y_train", n, None) for n in graph.outputs]
    problems = []
    for split, name, want in wanted:
        key = next((p + name for p in prefixes[split] if p + name in npz), None)
        if key is None:
            held = ", ".join(sorted(k for k in npz if ":" in k)[:8]) or "no named arrays"
            problems.append(
                Problem(
                    "dataset.path",
                    f"the npz has no array {split}:{name} for the model's "
                    f"{'input' if split == 'x_train' else 'output'} {name!r} (it holds {held})",
                )
            )
        elif want is not None and not _fits(want, tuple(npz[key].shape[1:])):
            problems.append(
                Problem(
                    "model.config",
                    f"the input layer {name!r} takes {_dims(want)} but {key} gives "
                    f"{_dims(tuple(npz[key].shape[1:]))} per example",
                )
            )
    if problems:
        raise SpecError(problems)


def _fits(want: Shape, given: tuple[int, ...]) -> bool:
    if len(want) != len(given):
        return False
    return all(w is None or w == g for w, g in zip(want, given, strict=True))


def _dims(shape: Shape) -> str:
    return str(tuple(shape))


def _config_problems(spec: JobSpec, graph: Graph, given: tuple[int, ...], data: Any):
    name, want, _ = graph.inputs[0]
    if not _fits(want, given):
        hint = ""
        if len(want) == 1 and len(given) > 1 and want[0] == math.prod(given):
            hint = "; set dataset.flatten: true"
        yield (
            "model.config",
            f"the input layer {name!r} takes {_dims(want)} but dataset {spec.dataset.name} "
            f"gives {_dims(given)} per example{hint}",
        )
        return
    out_layer = graph.layer(graph.outputs[0])
    out = output_shape(out_layer) if out_layer is not None else None
    if out is None or (spec.dataset.name == "npz" and data.task == "classification"):
        return
    units = footprint._output_units(spec, data)
    if len(out) != 1 or out[0] != units:
        what = (
            f"{units} target value(s)"
            if data.task == "regression"
            else f"{units} unit(s) for {data.num_classes} classes with {spec.loss.name}"
        )
        yield (
            "model.config",
            f"the output layer {graph.outputs[0]!r} gives {_dims(out)} per example; the data "
            f"and loss need {(units,)}: {what}",
        )


def _backbone_problems(model: BackboneModel, given: tuple[int, ...], dataset: str):
    if len(given) != 3:
        yield "model.architecture", f"a backbone reads images; dataset {dataset} gives {given}"
        return
    least = model.info.min_size
    if model.input_size is None and min(given[:2]) < least:
        yield (
            "model.input_size",
            f"{model.name} takes images of at least {least}x{least}; dataset {dataset} gives "
            f"{given[0]}x{given[1]}: set model.input_size: {least} (or more) to resize them",
        )
