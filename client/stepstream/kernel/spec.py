"""The job spec: the one place a training job is validated.

It lives in the client so a bad job is refused before it is sent, without TensorFlow. The service
trusts a parsed `JobSpec` and never re-validates it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stepstream.kernel import keras_config, names

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


MAX_LABELS = 64
MAX_LABEL_VALUE_CHARS = 256
MAX_PATH_CHARS = 1024


def _shown(value: object, limit: int = 64) -> str:
    """`value` as an error may quote it: never more than `limit` characters of a tenant's
    input, whatever its size."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Problem:
    field: str
    message: str


@dataclass(frozen=True)
class SpecLimits:
    """A server's bounds on what one job may ask for; each is named in the error it raises."""

    max_steps: int | None = None
    max_epochs: int | None = None
    max_layers: int | None = None
    max_units: int | None = None


class SpecError(ValueError):
    """A job spec that cannot run; `problems` names each offending field."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  {p.field}: {p.message}" for p in problems)
        super().__init__(f"invalid job spec ({len(problems)} problem(s)):\n{lines}")

    @property
    def fields(self) -> list[str]:
        return [p.field for p in self.problems]


def _conflict(field: str, message: str) -> PydanticCustomError:
    # The field travels in ctx so SpecError can name the exact path, deeper than pydantic's loc.
    return PydanticCustomError("spec_conflict", "{message}", {"field": field, "message": message})


def _name(kind: str, value: Any) -> str:
    try:
        return names.canonical(kind, value)
    except names.UnknownNameError as exc:
        raise _conflict("", str(exc)) from None


def _only_options(obj: BaseModel, allowed: frozenset[str], owner: str) -> None:
    """Refuse options the chosen name does not take (e.g. nesterov on adam)."""
    for option in sorted(obj.model_fields_set - {"name"} - allowed):
        takes = ", ".join(sorted(allowed)) or "no options"
        raise _conflict(option, f"{owner} does not take {option}; it takes: {takes}")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _shorthand(key: str):
    """Let `loss: mse` stand for `loss: {name: mse}`."""

    def before(value: Any) -> Any:
        return {key: value} if isinstance(value, str) else value

    return before


# ---------------------------------------------------------------- model


class _Head(_Spec):
    output_activation: str | None = Field(
        None, description="Activation of the output layer; chosen from the loss when unset."
    )

    @field_validator("output_activation", mode="before")
    @classmethod
    def _activation_name(cls, v: Any) -> Any:
        return None if v is None else _name("activation", v)


class _Hidden(_Head):
    activation: str = "relu"
    dropout: Fraction = 0.0
    batch_normalization: bool = False

    @field_validator("activation", mode="before")
    @classmethod
    def _hidden_activation(cls, v: Any) -> str:
        return _name("activation", v)


class LinearModel(_Head):
    """One dense layer from inputs to outputs: the seed's y = Wx + b."""

    architecture: Literal["linear"] = "linear"


class MLPModel(_Hidden):
    architecture: Literal["mlp"] = "mlp"
    hidden_units: list[PositiveInt] = Field(default_factory=lambda: [128])


class CNNModel(_Hidden):
    architecture: Literal["cnn"] = "cnn"
    filters: list[PositiveInt] = Field(default_factory=lambda: [32, 64], min_length=1)
    kernel_size: PositiveInt = 3
    pool_size: PositiveInt = 2
    dense_units: list[PositiveInt] = Field(default_factory=lambda: [128])


class RNNModel(_Hidden):
    architecture: Literal["rnn"] = "rnn"
    cell: Literal["lstm", "gru", "simple_rnn"] = "lstm"
    units: list[PositiveInt] = Field(default_factory=lambda: [64], min_length=1)
    bidirectional: bool = False
    embedding_dim: PositiveInt = Field(32, description="Used when the inputs are token ids.")
    dense_units: list[PositiveInt] = Field(default_factory=list)

    @field_validator("cell", mode="before")
    @classmethod
    def _cell(cls, v: Any) -> Any:
        return str(v).lower().replace("-", "_")


# Which options each explicit layer takes; the builder fills the rest with Keras defaults.
_CONV = frozenset({"filters", "kernel_size", "strides", "padding", "activation"})
_DEPTHWISE = frozenset({"kernel_size", "strides", "padding", "activation", "depth_multiplier"})
_POOL = frozenset({"pool_size", "strides", "padding"})
_RNN = frozenset({"units", "activation", "return_sequences"})
_NONE: frozenset[str] = frozenset()
LAYER_OPTIONS: dict[str, frozenset[str]] = {
    "activation": frozenset({"activation"}),
    "add": _NONE,
    "average_pool1d": _POOL,
    "average_pool2d": _POOL,
    "batch_normalization": frozenset({"momentum", "epsilon"}),
    "bidirectional": _RNN | {"cell", "merge_mode"},
    "concatenate": frozenset({"axis"}),
    "conv1d": _CONV,
    "conv2d": _CONV,
    "conv2d_transpose": _CONV,
    "dense": frozenset({"units", "activation"}),
    "depthwise_conv1d": _DEPTHWISE,
    "depthwise_conv2d": _DEPTHWISE,
    "dropout": frozenset({"rate"}),
    "embedding": frozenset({"output_dim", "positional"}),
    "flatten": _NONE,
    "global_average_pool1d": _NONE,
    "global_average_pool2d": _NONE,
    "global_max_pool1d": _NONE,
    "global_max_pool2d": _NONE,
    "group_normalization": frozenset({"groups", "epsilon"}),
    "gru": _RNN,
    "layer_normalization": frozenset({"epsilon"}),
    "lstm": _RNN,
    "max_pool1d": _POOL,
    "max_pool2d": _POOL,
    "multi_head_attention": frozenset({"num_heads", "key_dim", "dropout"}),
    "multiply": _NONE,
    "position_embedding": _NONE,
    "random_contrast": frozenset({"factor"}),
    "random_crop": frozenset({"height", "width"}),
    "random_flip": frozenset({"mode"}),
    "random_rotation": frozenset({"factor"}),
    "random_zoom": frozenset({"factor"}),
    "rescaling": frozenset({"scale", "offset"}),
    "reshape": frozenset({"target_shape"}),
    "separable_conv1d": _CONV | {"depth_multiplier"},
    "separable_conv2d": _CONV | {"depth_multiplier"},
    "simple_rnn": _RNN,
    "upsampling1d": frozenset({"size"}),
    "upsampling2d": frozenset({"size", "interpolation"}),
}
_LAYER_REQUIRED = {
    "activation": ("activation",),
    "bidirectional": ("units",),
    "conv1d": ("filters",),
    "conv2d": ("filters",),
    "conv2d_transpose": ("filters",),
    "dense": ("units",),
    "dropout": ("rate",),
    "gru": ("units",),
    "lstm": ("units",),
    "multi_head_attention": ("num_heads", "key_dim"),
    "random_contrast": ("factor",),
    "random_crop": ("height", "width"),
    "random_rotation": ("factor",),
    "random_zoom": ("factor",),
    "rescaling": ("scale",),
    "reshape": ("target_shape",),
    "separable_conv1d": ("filters",),
    "separable_conv2d": ("filters",),
    "simple_rnn": ("units",),
}
# The name `inputs` gives the model's own input; a layer may not take it.
MODEL_INPUT = "input"
_LAYER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")


class LayerSpec(_Spec):
    """One layer: its type, its options, and (in the graph form) its name and inputs."""

    type: str
    name: str | None = Field(None, description="Lets later layers list this one in inputs.")
    inputs: list[str] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Earlier layers' names (or 'input', the model's input) this layer reads; "
        "the layer before it when unset. add, concatenate and multiply take two or more; "
        "multi_head_attention takes query, value and optionally key (one input attends to "
        "itself).",
    )
    units: PositiveInt | None = None
    filters: PositiveInt | None = None
    kernel_size: PositiveInt | None = None
    strides: PositiveInt | None = None
    pool_size: PositiveInt | None = None
    padding: Literal["valid", "same", "causal"] | None = Field(
        None, description="valid (the default) or same; causal for conv1d."
    )
    activation: str | None = None
    rate: Fraction | None = None
    output_dim: PositiveInt | None = None
    positional: bool | None = Field(
        None, description="embedding: add a learned vector per position (a transformer's input)."
    )
    return_sequences: bool | None = Field(
        None, description="Recurrent layers: by default when a layer that reads sequences follows."
    )
    cell: Literal["lstm", "gru", "simple_rnn"] | None = Field(
        None, description="bidirectional: the recurrent layer run both ways (lstm by default)."
    )
    merge_mode: Literal["concat", "sum", "mul", "ave"] | None = None
    momentum: Fraction | None = None
    epsilon: Annotated[float, Field(gt=0)] | None = None
    depth_multiplier: PositiveInt | None = None
    axis: int | None = Field(
        None, description="concatenate: the axis joined (the last by default)."
    )
    groups: PositiveInt | None = Field(
        None, description="group_normalization: groups of channels (32 by default)."
    )
    num_heads: PositiveInt | None = None
    key_dim: PositiveInt | None = None
    dropout: Fraction | None = Field(None, description="multi_head_attention: on the weights.")
    target_shape: list[Annotated[int, Field(ge=-1)]] | None = Field(
        None,
        min_length=1,
        max_length=4,
        description="reshape: one example's new shape; one -1 takes what is left.",
    )
    size: PositiveInt | None = Field(None, description="upsampling: the factor (2 by default).")
    interpolation: Literal["nearest", "bilinear"] | None = None
    scale: float | None = None
    offset: float | None = None
    factor: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None,
        description="random_rotation (a fraction of a full turn), random_zoom, random_contrast: "
        "how far each example may be changed either way.",
    )
    mode: Literal["horizontal", "vertical", "horizontal_and_vertical"] | None = None
    height: PositiveInt | None = None
    width: PositiveInt | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, v: Any) -> str:
        return _name("layer", v)

    @field_validator("activation", mode="before")
    @classmethod
    def _activation(cls, v: Any) -> Any:
        return None if v is None else _name("activation", v)

    @field_validator("cell", mode="before")
    @classmethod
    def _cell(cls, v: Any) -> Any:
        return None if v is None else str(v).lower().replace("-", "_")

    @field_validator("name")
    @classmethod
    def _layer_name(cls, v: str | None) -> str | None:
        if v is not None and not _LAYER_NAME.match(v):
            raise ValueError("use 1-63 letters, digits, '_', '.', '-', starting with a letter or _")
        if v == MODEL_INPUT:
            raise ValueError(f"{MODEL_INPUT!r} names the model's input; choose another name")
        return v

    @model_validator(mode="after")
    def _options(self) -> LayerSpec:
        allowed = LAYER_OPTIONS[self.type] | {"type", "name", "inputs"}
        _only_options(self, allowed, f"layer {self.type}")
        for required in _LAYER_REQUIRED.get(self.type, ()):
            if getattr(self, required) is None:
                raise _conflict(required, f"layer {self.type} needs {required}")
        if self.padding == "causal" and self.type != "conv1d":
            raise _conflict(
                "padding", f"causal padding is for conv1d; {self.type} takes valid, same"
            )
        if self.target_shape is not None:
            if 0 in self.target_shape:
                raise _conflict("target_shape", "sizes are 1 or more, or -1 once")
            if self.target_shape.count(-1) > 1:
                raise _conflict("target_shape", "at most one size may be -1")
        if self.axis == 0:
            raise _conflict("axis", "axis 0 is the batch; join along 1 or more, or -1")
        return self


# Layers that read a sequence (steps, features), and those that keep their input's shape apart
# from its last axis: a recurrent layer returns its sequence when one of the first follows it,
# directly or through the second.
_READS_SEQUENCES = frozenset(
    {
        *names.RNN_CELLS,
        "average_pool1d",
        "bidirectional",
        "conv1d",
        "depthwise_conv1d",
        "global_average_pool1d",
        "global_max_pool1d",
        "max_pool1d",
        "multi_head_attention",
        "position_embedding",
        "separable_conv1d",
        "upsampling1d",
    }
)
_KEEPS_SHAPE = frozenset(
    {
        *names.MERGE_LAYERS,
        "activation",
        "batch_normalization",
        "dense",
        "dropout",
        "group_normalization",
        "layer_normalization",
        "rescaling",
    }
)


class LayersModel(_Head):
    """Hidden layers, as a stack or as a graph; the output layer is added to fit the data and
    loss. A layer reads the layer before it unless it lists `inputs` (earlier layers' names,
    or "input"); the last layer, or the one `output` names, feeds the output layer."""

    architecture: Literal["layers"] = "layers"
    layers: list[LayerSpec] = Field(min_length=1)
    activation: str = Field("relu", description="For dense/conv layers that name none.")
    output: str | None = Field(
        None, description="The layer whose output feeds the output layer; the last one by default."
    )

    @field_validator("activation", mode="before")
    @classmethod
    def _default_activation(cls, v: Any) -> str:
        return _name("activation", v)

    @model_validator(mode="after")
    def _graph(self) -> LayersModel:
        # Dangling layers are looked for once the graph's names resolve.
        problems = list(self._graph_problems()) or list(self._unread())
        if problems:
            raise PydanticCustomError(
                "spec_conflicts", "{summary}", {"summary": problems[0][1], "all": problems}
            )
        return self

    def _graph_problems(self):
        named: dict[str, int] = {}
        for i, layer in enumerate(self.layers):
            if layer.name is None:
                continue
            if layer.name in named:
                yield f"layers.{i}.name", f"{layer.name!r} already names layers.{named[layer.name]}"
            else:
                named[layer.name] = i
        for i, layer in enumerate(self.layers):
            field = f"layers.{i}.inputs"
            for ref in layer.inputs or ():
                j = named.get(ref)
                if ref == MODEL_INPUT or (j is not None and j < i):
                    continue
                if j == i:
                    yield (
                        field,
                        f"{_shown(ref)!r} is this layer; a layer cannot read its own output",
                    )
                elif j is not None:
                    yield (
                        field,
                        (
                            f"{_shown(ref)!r} is layers.{j}, after this one; a layer reads "
                            "only earlier layers (or input)"
                        ),
                    )
                else:
                    earlier = [n for n, k in named.items() if k < i][:20]
                    yield (
                        field,
                        (
                            f"no earlier layer is named {_shown(ref)!r}; it may read "
                            f"{', '.join([MODEL_INPUT, *earlier])}"
                        ),
                    )
            count = len(layer.inputs) if layer.inputs else 1
            if layer.type in names.MERGE_LAYERS and count < 2:
                yield field, f"{layer.type} merges two or more inputs; list them in inputs"
            elif layer.type == "multi_head_attention" and count > 3:
                yield (
                    field,
                    (
                        "multi_head_attention reads query, value and optionally key: 1 to 3 inputs "
                        "(one attends to itself)"
                    ),
                )
            elif layer.type not in (*names.MERGE_LAYERS, "multi_head_attention") and count > 1:
                yield (
                    field,
                    (
                        f"{layer.type} reads one input; merge them first with add, concatenate or "
                        "multiply"
                    ),
                )
        if self.output is not None and self.output not in named:
            listed = ", ".join(list(named)[:20]) or "no layer has a name"
            yield "output", f"no layer is named {_shown(self.output)!r}; named layers: {listed}"

    def _unread(self):
        """Layers whose output nothing reads: a branch left dangling is most likely a mistake."""
        read = {self.output_index}
        for sources in self.sources():
            read.update(sources)
        for i in range(len(self.layers)):
            if i not in read:
                yield (
                    f"layers.{i}",
                    (
                        "nothing reads this layer's output; name it in a later layer's inputs (or "
                        "in output), or remove it"
                    ),
                )

    def sources(self) -> list[list[int]]:
        """Each layer's inputs as indices into `layers`; -1 is the model's input."""
        index: dict[str, int] = {}
        out: list[list[int]] = []
        for i, layer in enumerate(self.layers):
            if layer.inputs:
                out.append([-1 if n == MODEL_INPUT else index[n] for n in layer.inputs])
            else:
                out.append([i - 1])
            if layer.name is not None:
                index.setdefault(layer.name, i)
        return out

    @property
    def output_index(self) -> int:
        """The layer that feeds the output layer."""
        if self.output is None:
            return len(self.layers) - 1
        return next(i for i, layer in enumerate(self.layers) if layer.name == self.output)

    def returns_sequences(self) -> list[bool]:
        """For each layer: whether it returns sequences, if it is a recurrent layer. By
        default when a layer that reads sequences takes its output, directly or through
        layers that keep the shape (dropout, normalization, dense, merges)."""
        readers: list[list[int]] = [[] for _ in self.layers]
        for j, sources in enumerate(self.sources()):
            for i in sources:
                if i >= 0:
                    readers[i].append(j)
        wants = [False] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            wants[i] = any(
                self.layers[j].type in _READS_SEQUENCES
                or (self.layers[j].type in _KEEPS_SHAPE and wants[j])
                for j in readers[i]
            )
        return [
            wants[i] if layer.return_sequences is None else layer.return_sequences
            for i, layer in enumerate(self.layers)
        ]


class KerasModel(_Spec):
    """A Keras model config (`model.to_json()`; see `JobSpec.from_keras`), built-in layers
    only. Its own outputs are the model's outputs: nothing is appended, so its last layer must
    fit the data (units) and the loss (activation); both are checked."""

    architecture: Literal["keras"] = "keras"
    config: dict[str, Any] = Field(
        description="The model's config, as model.to_json() writes it (a mapping or JSON text); "
        "compile_config is ignored: the loss and optimizer are the spec's.",
        # Said here so every pydantic the client supports writes the same schema.
        json_schema_extra={"additionalProperties": True},
    )
    _graph: keras_config.Graph | None = PrivateAttr(None)

    @field_validator("config", mode="before")
    @classmethod
    def _read(cls, v: Any) -> Any:
        # Only a mapping or JSON text: a path would read a file wherever the spec is parsed.
        if isinstance(v, str) and v.lstrip().startswith("{"):
            try:
                v = keras_config.read(v)
            except keras_config.ConfigRefused as exc:
                raise _conflict("", str(exc)) from None
        if isinstance(v, Mapping):
            return {k: val for k, val in v.items() if k != "compile_config"}
        return v

    @model_validator(mode="after")
    def _checked(self) -> KerasModel:
        try:
            graph = keras_config.check(self.config)
        except keras_config.ConfigRefused as exc:
            raise _conflict("config", str(exc)) from None
        for what, found in (("input", [n for n, _, _ in graph.inputs]), ("output", graph.outputs)):
            if not found:
                raise _conflict("config", f"the model has no {what}")
        self._graph = graph
        return self

    @property
    def graph(self) -> keras_config.Graph:
        assert self._graph is not None
        return self._graph

    @property
    def output_activation(self) -> str | None:
        return self.graph.output_activation()

    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self.graph.inputs]

    @property
    def several(self) -> bool:
        """Several inputs or outputs: fed from an npz's named arrays (NAMED_ARRAYS)."""
        return len(self.graph.inputs) > 1 or len(self.graph.outputs) > 1


# How an npz names the array for each input and output of a config with several: the split's
# array name, a colon, the layer's name (np.savez(f, **{"x_train:image": ...})).
NAMED_ARRAYS = "x_train:<input name> and y_train:<output name> (x_test:/y_test: optional)"

_WEIGHTS_FILES = (".weights.h5", ".h5")


class BackboneModel(_Head):
    """A keras.applications model without its top, on images, then global pooling and an
    output layer fitted to the data and loss."""

    architecture: Literal["backbone"] = "backbone"
    name: str = Field(description="The keras.applications model: " + ", ".join(names.BACKBONES))
    weights: str = Field(
        "none",
        max_length=MAX_PATH_CHARS,
        description="none (randomly initialised), or the path UploadDataset gave a "
        ".weights.h5 file of this backbone without its top.",
    )
    trainable: bool = Field(True, description="false: train only the output layer.")
    pooling: Literal["avg", "max"] = "avg"
    dropout: Fraction = 0.0
    input_size: Annotated[int, Field(ge=32, le=1024)] | None = Field(
        None,
        description="Resize images to this square side first (for images under the "
        "backbone's smallest size, 32).",
    )

    @field_validator("name", mode="before")
    @classmethod
    def _backbone(cls, v: Any) -> str:
        return _name("backbone", v)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if v.lower() == "none":
            return "none"
        given = Path(v)
        if not v.isprintable() or given.is_absolute() or ".." in given.parts:
            raise ValueError("none, or a relative upload path (no '..', no control characters)")
        if not v.endswith(_WEIGHTS_FILES):
            raise ValueError(f"a weights file ends in .weights.h5 or .h5; got {_shown(v)}")
        return v

    @property
    def info(self) -> names.BackboneInfo:
        return names.BACKBONES[self.name]


ModelSpec = Annotated[
    LinearModel | MLPModel | CNNModel | RNNModel | LayersModel | KerasModel | BackboneModel,
    Field(discriminator="architecture"),
]

# ---------------------------------------------------------------- loss, optimizer, schedule


class LossSpec(_Spec):
    name: str = "sparse_categorical_crossentropy"
    from_logits: bool | None = None
    label_smoothing: Fraction | None = None
    pos_weight: Annotated[float, Field(gt=0)] | None = None
    delta: Annotated[float, Field(gt=0)] | None = None
    alpha: Annotated[float, Field(ge=0, le=1)] | None = None
    gamma: Annotated[float, Field(ge=0)] | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _loss_name(cls, v: Any) -> str:
        return _name("loss", v)

    @model_validator(mode="after")
    def _options(self) -> LossSpec:
        info = self.info
        allowed = info.options | ({"from_logits"} if info.logits_only else frozenset())
        _only_options(self, allowed, self.name)
        if info.logits_only and self.from_logits is False:
            raise _conflict(
                "from_logits", f"{self.name} always takes logits; remove from_logits: false"
            )
        return self

    @property
    def info(self) -> names.LossInfo:
        return names.LOSSES[self.name]

    @property
    def logits(self) -> bool:
        """True when the model's outputs must be logits (no output activation)."""
        return self.info.logits_only or bool(self.from_logits)


class ScheduleSpec(_Spec):
    name: str
    decay_steps: PositiveInt | None = None
    decay_rate: Annotated[float, Field(gt=0)] | None = None
    staircase: bool | None = None
    end_learning_rate: Annotated[float, Field(ge=0)] | None = None
    power: Annotated[float, Field(gt=0)] | None = None
    cycle: bool | None = None
    alpha: Annotated[float, Field(ge=0, le=1)] | None = None
    warmup_steps: Annotated[int, Field(ge=0)] | None = None
    warmup_target: Annotated[float, Field(gt=0)] | None = None
    t_mul: Annotated[float, Field(gt=0)] | None = None
    m_mul: Annotated[float, Field(gt=0)] | None = None
    boundaries: list[PositiveInt] | None = None
    values: list[Annotated[float, Field(gt=0)]] | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _schedule_name(cls, v: Any) -> str:
        return _name("schedule", v)

    @model_validator(mode="after")
    def _options(self) -> ScheduleSpec:
        _only_options(self, names.SCHEDULES[self.name], self.name)
        if self.name == "piecewise_constant_decay":
            if not self.boundaries or not self.values:
                raise _conflict(
                    "boundaries", "piecewise_constant_decay needs boundaries and values"
                )
            if self.boundaries != sorted(set(self.boundaries)):
                raise _conflict("boundaries", "boundaries must be strictly increasing steps")
            if len(self.values) != len(self.boundaries) + 1:
                raise _conflict(
                    "values",
                    f"needs one more value than boundaries: {len(self.boundaries) + 1} values "
                    f"for {len(self.boundaries)} boundaries, got {len(self.values)}",
                )
        elif self.decay_steps is None:
            raise _conflict("decay_steps", f"{self.name} needs decay_steps")
        if self.name in ("exponential_decay", "inverse_time_decay") and self.decay_rate is None:
            raise _conflict("decay_rate", f"{self.name} needs decay_rate")
        return self


DEFAULT_LEARNING_RATE = {"sgd": 0.01, "momentum": 0.01}


class OptimizerSpec(_Spec):
    name: str = "adam"
    learning_rate: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Keras's default for the optimizer when unset (0.01 for sgd, else 1e-3)."
    )
    momentum: Fraction | None = None
    nesterov: bool | None = None
    beta_1: Fraction | None = None
    beta_2: Fraction | None = None
    epsilon: Annotated[float, Field(gt=0)] | None = None
    rho: Fraction | None = None
    amsgrad: bool | None = None
    centered: bool | None = None
    weight_decay: Annotated[float, Field(ge=0)] | None = None
    clipnorm: Annotated[float, Field(gt=0)] | None = None
    clipvalue: Annotated[float, Field(gt=0)] | None = None
    global_clipnorm: Annotated[float, Field(gt=0)] | None = None
    initial_accumulator_value: Annotated[float, Field(ge=0)] | None = None
    learning_rate_power: Annotated[float, Field(le=0)] | None = None
    l1_regularization_strength: Annotated[float, Field(ge=0)] | None = None
    l2_regularization_strength: Annotated[float, Field(ge=0)] | None = None
    schedule: ScheduleSpec | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _optimizer_name(cls, v: Any) -> str:
        return _name("optimizer", v)

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_shorthand(cls, v: Any) -> Any:
        return _shorthand("name")(v)

    @model_validator(mode="after")
    def _options(self) -> OptimizerSpec:
        _only_options(self, names.OPTIMIZERS[self.name] | {"learning_rate", "schedule"}, self.name)
        if self.clipnorm is not None and self.global_clipnorm is not None:
            raise _conflict("global_clipnorm", "set clipnorm or global_clipnorm, not both")
        return self

    @property
    def initial_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return DEFAULT_LEARNING_RATE.get(self.name, 0.001)


# ---------------------------------------------------------------- data


_COLUMN = Annotated[str, Field(min_length=1, max_length=200)]


class FeatureSpec(_Spec):
    """One feature of a TFRecord file's tf.train.Example records."""

    dtype: Literal["float32", "int64"] = "float32"
    shape: list[Annotated[int, Field(ge=1, le=1_000_000)]] = Field(
        default_factory=list, max_length=4
    )


class DatasetSpec(_Spec):
    name: str = "fashion_mnist"
    path: str | None = Field(
        None,
        description="The data for a file dataset: an upload's path (uploads/NAME.csv), a glob of "
        "shards (uploads/part-*.parquet) or, on a server without tenants, any fsspec URL; a "
        "folder or .tar archive for image_folder.",
        max_length=MAX_PATH_CHARS,
    )
    validation_path: str | None = Field(
        None,
        description="Validation data in the same format (else validation_split).",
        max_length=MAX_PATH_CHARS,
    )
    test_path: str | None = Field(
        None,
        description="Test data in the same format, evaluated at the end.",
        max_length=MAX_PATH_CHARS,
    )
    features: list[_COLUMN] | None = Field(
        None,
        description="Input columns, in order; every column but the label when unset.",
        min_length=1,
        max_length=10_000,
    )
    label: _COLUMN | None = Field(None, description="The label column; the last one when unset.")
    categorical: list[_COLUMN] = Field(
        default_factory=list,
        max_length=10_000,
        description="Columns of categories (strings or integers), one-hot encoded with a "
        "vocabulary learned from the training data.",
    )
    column_names: list[_COLUMN] | None = Field(
        None,
        max_length=10_000,
        description="CSV: names for the columns, replacing the file's first line.",
    )
    # Keys are checked in _feature_names: a constrained key type gives each pydantic its own schema.
    feature_spec: dict[str, FeatureSpec] | None = Field(
        None,
        max_length=10_000,
        description="TFRecord: each feature of the tf.train.Example records, label included.",
    )
    shuffle_buffer: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        None, description="Examples shuffled together when streamed (10000 when unset)."
    )
    stream: bool | None = Field(
        None,
        description="Read the files batch by batch while training; by default only when "
        "they would not fit in the worker's memory.",
    )
    num_samples: Annotated[int, Field(ge=10, le=10_000_000)] | None = None
    noise: Annotated[float, Field(ge=0)] | None = None
    num_features: Annotated[int, Field(ge=1, le=100_000)] | None = None
    num_classes: Annotated[int, Field(ge=2, le=10_000)] | None = None
    image_size: Annotated[int, Field(ge=4, le=512)] | None = None
    channels: Literal[1, 3] | None = None
    sequence_length: Annotated[int, Field(ge=2, le=10_000)] | None = None
    vocab_size: Annotated[int, Field(ge=2, le=1_000_000)] | None = None
    validation_split: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    evaluate_on_test: bool = Field(True, description="Report test metrics at the end.")
    normalize: bool = Field(True, description="Scale pixel values to [0, 1] (image data).")
    flatten: bool | None = Field(None, description="Flatten images; by default for mlp/linear.")
    one_hot: bool | None = Field(None, description="One-hot labels; by default as the loss needs.")
    task: Literal["classification", "regression"] | None = Field(
        None, description="For npz files: what the labels are; inferred from them when unset."
    )

    @field_validator("name", mode="before")
    @classmethod
    def _dataset_name(cls, v: Any) -> str:
        return _name("dataset", v)

    @field_validator("feature_spec")
    @classmethod
    def _feature_names(cls, v: dict[str, FeatureSpec] | None) -> Any:
        for key in v or {}:
            if not 1 <= len(key) <= 200:
                raise _conflict(_shown(key), "a feature name is 1-200 characters")
        return v

    @model_validator(mode="after")
    def _options(self) -> DatasetSpec:
        common = {"validation_split", "evaluate_on_test", "normalize", "flatten", "one_hot"}
        if self.name in ("npz", "csv", "parquet", "tfrecord"):
            common.add("task")
        if self.name == "csv":
            common.add("column_names")
        if not self.categorical:
            # No categorical columns is the default; to_dict() writes it as [] all the same.
            self.model_fields_set.discard("categorical")
        _only_options(self, self.info.options | common, f"dataset {self.name}")
        if self.name in names.FILE_DATASETS and not self.path:
            raise _conflict("path", f"dataset {self.name} needs path: the data to load")
        for field in ("path", "validation_path", "test_path"):
            value = getattr(self, field)
            if value is not None and not value.isprintable():
                raise _conflict(field, "no control characters (NUL, newline, ...) in a path")
        self._columns()
        return self

    def _columns(self) -> None:
        """The columns named must agree with each other; the file is checked when it is read."""
        if self.name == "tfrecord":
            if not self.feature_spec:
                raise _conflict(
                    "feature_spec",
                    "dataset tfrecord needs feature_spec: each "
                    "feature's dtype and shape, the label's included",
                )
            label = self.label or list(self.feature_spec)[-1]
            if label not in self.feature_spec:
                raise _conflict("label", f"{_shown(label)} is not in feature_spec")
            for column in self.features or ():
                if column not in self.feature_spec:
                    raise _conflict("features", f"{_shown(column)} is not in feature_spec")
        if self.features is not None:
            if len(set(self.features)) != len(self.features):
                raise _conflict("features", "a column is listed twice")
            if self.label is not None and self.label in self.features:
                raise _conflict("features", f"the label {_shown(self.label)} cannot be a feature")
            for column in self.categorical:
                if column not in self.features:
                    raise _conflict("categorical", f"{_shown(column)} is not one of features")
        if self.label is not None and self.label in self.categorical:
            raise _conflict("categorical", "the label is encoded as classes already; remove it")
        if self.column_names is not None and len(set(self.column_names)) != len(self.column_names):
            raise _conflict("column_names", "a name is listed twice")

    @model_serializer(mode="wrap")
    def _without_empty_categorical(self, handler: SerializerFunctionWrapHandler) -> Any:
        # An empty list is the default: a spec that names no categorical columns is written
        # without the field, as every other unset option is.
        out = handler(self)
        if isinstance(out, dict) and not out.get("categorical", True):
            del out["categorical"]
        return out

    @property
    def info(self) -> names.DatasetInfo:
        return names.DATASETS[self.name]

    @property
    def kind(self) -> str | None:
        """image, tabular or sequence; None for an npz file, whose arrays decide."""
        return self.info.kind

    @property
    def resolved_task(self) -> str | None:
        return self.info.task or self.task

    @property
    def tokens(self) -> bool:
        """Integer token sequences (feed an embedding) rather than real-valued features."""
        return self.name == "synthetic_sequence" and self.vocab_size is not None


# ---------------------------------------------------------------- training, runtime

_DURATION = re.compile(
    r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$"
)


def parse_duration(value: Any) -> float:
    """Seconds from 90, "90s", "5m", "1h30m"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match or not any(match.groups()):
        raise ValueError(f"not a duration: {value!r}; use seconds or e.g. '90s', '5m', '1h30m'")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s


class EarlyStopping(_Spec):
    monitor: str = "val_loss"
    patience: PositiveInt = Field(5, description="Evaluations without improvement.")
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    mode: Literal["auto", "min", "max"] = "auto"


class TargetSpec(_Spec):
    """Stop as soon as an evaluation reaches `value` on `metric`."""

    metric: str = "val_accuracy"
    value: float
    mode: Literal["auto", "min", "max"] = "auto"


class TrainingSpec(_Spec):
    steps: PositiveInt | None = Field(
        None, description="Optimizer steps; 1000 when neither is set."
    )
    epochs: PositiveInt | None = None
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 32
    shuffle: bool = True
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    eval_every: PositiveInt | None = Field(None, description="Steps between evaluations.")
    early_stopping: EarlyStopping | None = None
    target: TargetSpec | None = None
    max_duration: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Seconds (or '30m', '2h') before the job fails with a timeout."
    )
    checkpoint_every: PositiveInt | None = Field(None, description="Steps between checkpoints.")

    @field_validator("max_duration", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @model_validator(mode="after")
    def _length(self) -> TrainingSpec:
        if self.steps is not None and self.epochs is not None:
            raise _conflict("epochs", "set steps or epochs, not both")
        if self.steps is None and self.epochs is None:
            self.steps = 1000
        return self


MAX_DEVICES = 64  # devices one job may ask for
MAX_MACHINES = 16  # workers one job may span


class RuntimeSpec(_Spec):
    device: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    steps_per_execution: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="Steps run on the device per call; 'auto' sizes it to about 0.1 s of "
        "training, which is also how often per-step values are fetched and stops are checked.",
    )
    jit_compile: bool | Literal["auto"] = Field(
        "auto",
        description="Compile the training step with XLA. 'auto' does so whenever every layer "
        "supports it, on the CPU as well (where Keras's own 'auto' does not).",
    )
    devices: PositiveInt = Field(
        1,
        le=MAX_DEVICES,
        description="Devices the job trains on, data-parallel on one worker (TensorFlow's "
        "MirroredStrategy): each step splits training.batch_size, the global batch, evenly "
        "across them. Only a worker holding that many devices runs it. With machines > 1, "
        "the devices of all the machines together.",
    )
    machines: PositiveInt = Field(
        1,
        le=MAX_MACHINES,
        description="Workers the job spans, data-parallel across them (TensorFlow's "
        "MultiWorkerMirroredStrategy, the service writing each one's cluster spec): "
        "runtime.devices / machines devices on each. All are claimed together or none.",
    )

    @field_validator("device", "precision", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("steps_per_execution", mode="before")
    @classmethod
    def _positive_or_auto(cls, v: Any) -> Any:
        # Checked here so the error is one message, not one per member of the union.
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # JSON (and protobuf Struct) numbers arrive as floats
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError(f"must be a number of steps greater than 0, or 'auto'; got {v!r}")


# ---------------------------------------------------------------- the job

# What a trained model can be exported to besides .keras (see stepstream_service.engine.export).
EXPORT_FORMATS = ("onnx", "saved_model", "tflite")
ExportFormat = Literal["onnx", "saved_model", "tflite"]

_OUTPUT_ACTIVATION = {"sparse": "softmax", "one_hot": "softmax", "binary": "sigmoid"}
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Labels are kept with the job and sent with every answer about it, so their count and sizes
# are bounded here, where both client and server check them (as Kubernetes bounds its own).
_LABEL_KEY = _JOB_NAME
# A job's id as the service gives it out, alone or as its resource name (jobs/job-...).
_JOB_ID = re.compile(r"^(?:jobs/)?(job-[0-9a-f]{1,40})$")
FORKED_FROM = "forked_from"  # the label a fork carries: the id of the job it started from


class InitFrom(_Spec):
    """Start from another job's checkpoint (a fork): its weights, its optimizer's state and its
    step counter; this job's own hyperparameters take effect from there."""

    job: str = Field(
        description="The id of the job to start from (job-...), one of your own.",
        json_schema_extra={"pattern": _JOB_ID.pattern},
    )
    step: PositiveInt | Literal["latest"] = Field(
        "latest",
        description="The step of the checkpoint to start from; 'latest': its newest intact one.",
    )

    @field_validator("job", mode="before")
    @classmethod
    def _job_id(cls, v: Any) -> Any:
        match = _JOB_ID.match(v) if isinstance(v, str) else None
        if match is None:
            raise ValueError(f"{_shown(v)!r} is no job id; they look like job-3f2a0c...")
        return match.group(1)

    @field_validator("step", mode="before")
    @classmethod
    def _step(cls, v: Any) -> Any:
        # Checked here so the error is one message, not one per member of the union.
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if v == "latest" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError(f"must be a step greater than 0, or 'latest'; got {_shown(repr(v))}")


class JobSpec(_Spec):
    """A training job. Parse with `JobSpec.parse(data)` or `load_spec(path)`."""

    name: str = "job"
    labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_LABELS,
        description=(
            f"At most {MAX_LABELS}; keys as job names (1-63 letters, digits, '_', '.', '-'), "
            f"values of at most {MAX_LABEL_VALUE_CHARS} printable characters."
        ),
    )
    init_from: InitFrom | None = Field(
        None,
        description=f"Start from another job's checkpoint (a fork); the job is labelled "
        f"{FORKED_FROM}=<that job's id>.",
    )
    model: ModelSpec = Field(default_factory=MLPModel)
    loss: LossSpec | None = Field(None, description="The dataset's natural loss when unset.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    metrics: list[str] | None = Field(None, description="accuracy, or mae for regression.")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    export: list[ExportFormat] = Field(
        default_factory=list,
        description="Formats to export the trained model to, besides .keras, once the job has "
        "succeeded: saved_model (TF Serving), onnx, tflite. Any of them can also be converted "
        "on download.",
    )

    @field_validator("export", mode="before")
    @classmethod
    def _export_formats(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]  # `export: onnx`
        if isinstance(v, list):  # each once, in the order given
            v = list(dict.fromkeys(f.lower() if isinstance(f, str) else f for f in v))
        return v

    @field_validator("name")
    @classmethod
    def _job_name(cls, v: str) -> str:
        if not _JOB_NAME.match(v):
            raise ValueError(
                "use 1-63 letters, digits, '_', '.', '-', starting with a letter/digit"
            )
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _LABEL_KEY.match(key):
                raise _conflict(
                    _shown(key),
                    "a label key is 1-63 letters, digits, '_', '.', '-', starting with a "
                    "letter/digit",
                )
            if len(value) > MAX_LABEL_VALUE_CHARS or not value.isprintable():
                raise _conflict(
                    key,
                    f"a label value is at most {MAX_LABEL_VALUE_CHARS} printable characters "
                    f"(no NUL, newline or other control character); this one has {len(value)}",
                )
        return v

    @field_validator("model", mode="before")
    @classmethod
    def _architecture(cls, v: Any) -> Any:
        v = _shorthand("architecture")(v)
        if isinstance(v, Mapping) and "architecture" in v:
            v = {**v, "architecture": _name("architecture", v["architecture"])}
        return v

    @field_validator("loss", "optimizer", "dataset", mode="before")
    @classmethod
    def _named(cls, v: Any) -> Any:
        return _shorthand("name")(v)

    @field_validator("metrics", mode="before")
    @classmethod
    def _metric_names(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"a metric name or a list of them, not {type(v).__name__}")
        out = []
        for i, metric in enumerate(v):
            try:
                out.append(names.canonical("metric", metric))
            except names.UnknownNameError as exc:
                raise _conflict(str(i), str(exc)) from None
        return list(dict.fromkeys(out))

    @model_validator(mode="after")
    def _limits(self, info: ValidationInfo) -> JobSpec:
        limits: SpecLimits | None = (info.context or {}).get("limits")
        if limits is None:
            return self
        problems = list(_over_limits(self, limits))
        if problems:
            raise PydanticCustomError(
                "spec_conflicts", "{summary}", {"summary": problems[0][1], "all": problems}
            )
        return self

    @model_validator(mode="after")
    def _fork(self) -> JobSpec:
        if self.init_from is None:
            return self
        problems = []
        # The link is a label, so `trainer jobs --label forked_from=ID` lists a job's forks.
        if FORKED_FROM not in self.labels and len(self.labels) >= MAX_LABELS:
            problems.append(
                ("labels", f"at most {MAX_LABELS}, and a fork adds the label {FORKED_FROM}")
            )
        self.labels[FORKED_FROM] = self.init_from.job
        start, steps = self.init_from.step, self.training.steps
        if start != "latest" and steps is not None and steps <= start:
            problems.append(
                (
                    "training.steps",
                    f"{steps} is not past init_from.step ({start}), where training starts: "
                    f"a fork trains from there up to training.steps",
                )
            )
        if problems:
            raise PydanticCustomError(
                "spec_conflicts", "{summary}", {"summary": problems[0][1], "all": problems}
            )
        return self

    @model_validator(mode="after")
    def _combinations(self) -> JobSpec:
        task = self.dataset.resolved_task
        if self.loss is None:
            natural = "mean_squared_error" if task == "regression" else None
            self.loss = LossSpec(name=natural) if natural else LossSpec()
        if self.metrics is None:
            self.metrics = ["mean_absolute_error"] if task == "regression" else ["accuracy"]
        conflicts = list(_conflicts(self))
        if conflicts:
            raise PydanticCustomError(
                "spec_conflicts", "{summary}", {"summary": conflicts[0][1], "all": conflicts}
            )
        return self

    # --------------------------------------------------------- derived, shared with the service

    @property
    def task(self) -> str | None:
        return self.dataset.resolved_task

    @property
    def label_format(self) -> str:
        """How labels reach the loss: sparse, one_hot, binary or dense."""
        assert self.loss is not None
        return self.loss.info.labels

    @property
    def step_metric(self) -> str:
        """The per-step value streamed beside the loss: accuracy, or mae for regression."""
        return "mae" if self.task == "regression" else "accuracy"

    @property
    def output_activation(self) -> str:
        assert self.loss is not None
        if self.model.output_activation:
            return self.model.output_activation
        if self.loss.logits or self.task == "regression":
            return "softplus" if self.loss.name == "poisson" else "linear"
        if self.loss.info.labels == "dense" and self.loss.name == "cosine_similarity":
            return "linear"
        return _OUTPUT_ACTIVATION.get(self.label_format, "softmax")

    @property
    def monitorable(self) -> list[str]:
        return ["val_loss", *(f"val_{m}" for m in self.metrics or [])]

    # --------------------------------------------------------- loading

    @classmethod
    def parse(cls, data: Any, limits: SpecLimits | None = None) -> JobSpec:
        """Validate a mapping (or a JobSpec) and raise SpecError naming every bad field; with
        `limits`, also every field over a server's bounds."""
        if isinstance(data, JobSpec):
            if limits is None:
                return data
            data = data.to_dict()
        if not isinstance(data, Mapping):
            raise SpecError(
                [Problem("<root>", f"a job spec is a mapping, got {type(data).__name__}")]
            )
        if not data:
            # Every field has a default, but an empty spec is far likelier a client that sent
            # nothing (a misspelt field, an unconverted object) than a wish for the defaults.
            raise SpecError([Problem("<root>", "the spec is empty; give at least its dataset")])
        try:
            return cls.model_validate(dict(data), context={"limits": limits})
        except ValidationError as exc:
            raise SpecError(_problems(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def from_keras(cls, model: Any, **fields: Any) -> JobSpec:
        """A job training `model`: a `keras.Model` (its `to_json()`, so no TensorFlow is
        imported here), its config as a mapping or JSON text, or a .json/.keras file. Every
        other field (loss, optimizer, dataset, training, ...) as in a spec; the model's
        weights are not sent."""
        try:
            config = keras_config.read(model)
        except keras_config.ConfigRefused as exc:
            raise SpecError([Problem("model.config", str(exc))]) from None
        return cls.parse({**fields, "model": {"architecture": "keras", "config": config}})


def load_spec(source: str | Path | Mapping[str, Any] | JobSpec) -> JobSpec:
    """A JobSpec from a YAML/JSON file path, a mapping, or a JobSpec."""
    if isinstance(source, (JobSpec, Mapping)):
        return JobSpec.parse(source)
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([Problem("<file>", f"cannot read {path}: {exc.strerror}")]) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError([Problem("<file>", f"{path} is not valid YAML/JSON: {exc}")]) from None
    return JobSpec.parse(data if data is not None else {})


def _problems(exc: ValidationError) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        # The discriminated union adds the architecture as a path element; readers don't need it.
        if len(loc) > 1 and loc[0] == "model" and loc[1] in names.ARCHITECTURES:
            del loc[1]
        ctx = err.get("ctx") or {}
        if err["type"] == "spec_conflicts":
            out.extend(Problem(".".join([*loc, field]), msg) for field, msg in ctx["all"])
            continue
        if err["type"] == "spec_conflict":
            if ctx.get("field"):
                loc.append(ctx["field"])
            message = ctx["message"]
        else:
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                message = "unknown field"
            elif err["type"] == "union_tag_invalid":
                message = f"unknown architecture; valid: {', '.join(names.ARCHITECTURES)}"
            elif message.startswith("Value error, "):
                message = message[len("Value error, ") :]
        out.append(Problem(".".join(loc) or "<root>", message))
    return out


# ---------------------------------------------------------------- combinations

_CLASS_LOSSES_HINT = "mean_squared_error, mean_absolute_error, huber, log_cosh"


def _widths(model: Any) -> list[tuple[str, int]]:
    """(field, units or filters) of every hidden layer the model will have."""
    out: list[tuple[str, int]] = []
    for name in ("hidden_units", "filters", "units", "dense_units"):
        for i, width in enumerate(getattr(model, name, None) or []):
            out.append((f"{name}.{i}", width))
    for i, layer in enumerate(getattr(model, "layers", None) or []):
        for name in ("units", "filters", "output_dim", "key_dim"):
            if getattr(layer, name, None):
                out.append((f"layers.{i}.{name}", getattr(layer, name)))
    return out


def _over_limits(spec: JobSpec, limits: SpecLimits):
    """Yield (field, message) for each value over the server's limits."""

    def over(value: int, limit: int, what: str, name: str) -> str:
        return f"{value}{what} is over this server's limit of {limit} ({name})"

    t = spec.training
    if limits.max_steps and t.steps and t.steps > limits.max_steps:
        yield "training.steps", over(t.steps, limits.max_steps, "", "max_steps")
    if limits.max_epochs and t.epochs and t.epochs > limits.max_epochs:
        yield "training.epochs", over(t.epochs, limits.max_epochs, "", "max_epochs")
    widths = _widths(spec.model)
    explicit = getattr(spec.model, "layers", None) or []
    layers = len(explicit) or len(widths)
    if limits.max_layers and layers > limits.max_layers:
        field = "model.layers" if explicit else "model"
        yield field, over(layers, limits.max_layers, " layers", "max_layers")
    for field, width in widths:
        if limits.max_units and width > limits.max_units:
            yield f"model.{field}", over(width, limits.max_units, " units", "max_units")


def _conflicts(spec: JobSpec):
    """Yield (field, message) for each combination that cannot train."""
    assert spec.loss is not None
    loss, data, model, training = spec.loss, spec.dataset, spec.model, spec.training
    task, labels, kind = data.resolved_task, loss.info.labels, data.kind

    if task == "regression" and labels != "dense":
        yield (
            "loss.name",
            (
                f"{loss.name} is a classification loss but dataset {data.name} is regression; "
                f"use a regression loss such as {_CLASS_LOSSES_HINT}"
            ),
        )
    if task != "regression":
        if labels == "sparse" and data.one_hot:
            yield (
                "dataset.one_hot",
                (
                    f"{loss.name} takes integer class labels; remove one_hot: true, or use "
                    "categorical_crossentropy with one-hot labels"
                ),
            )
        if labels != "sparse" and data.one_hot is False:
            yield (
                "dataset.one_hot",
                (
                    f"{loss.name} needs one-hot labels; remove one_hot: false, or use "
                    "sparse_categorical_crossentropy with integer labels"
                ),
            )

    act = model.output_activation
    if loss.logits and act in ("softmax", "sigmoid"):
        yield (
            "loss.from_logits",
            (
                f"model.output_activation is {act}, so the outputs are probabilities, not logits; "
                "set model.output_activation: linear, or from_logits: false"
            ),
        )

    if model.architecture == "cnn" and kind not in ("image", None):
        yield (
            "model.architecture",
            (
                f"cnn needs image data but dataset {data.name} is {kind}; use mlp, or an image "
                "dataset (mnist, fashion_mnist, synthetic_images)"
            ),
        )
    if model.architecture == "rnn" and kind == "tabular":
        yield (
            "model.architecture",
            (
                f"rnn needs sequences (or images read row by row) but dataset {data.name} is "
                "tabular; use mlp, or synthetic_sequence"
            ),
        )
    if model.architecture in ("cnn", "rnn") and data.flatten:
        yield "dataset.flatten", f"{model.architecture} reads unflattened inputs; remove flatten"
    if model.architecture == "layers":
        yield from _layer_conflicts(spec)
    yield from _whole_model_conflicts(spec)

    for i, metric in enumerate(spec.metrics or []):
        need = names.METRICS[metric]
        if task == "regression" and need != "regression":
            yield f"metrics.{i}", f"{metric} needs class labels; dataset {data.name} is regression"
        elif task == "classification" and need == "classification_dense" and labels == "sparse":
            yield (
                f"metrics.{i}",
                (
                    f"{metric} needs one-hot labels but {loss.name} takes integer labels; use "
                    "accuracy, or categorical_crossentropy"
                ),
            )
        elif task == "classification" and need == "classification_sparse" and labels != "sparse":
            yield f"metrics.{i}", f"{metric} needs integer labels but {loss.name} takes one-hot"
        elif task == "classification" and need == "regression" and labels == "sparse":
            yield (
                f"metrics.{i}",
                (
                    f"{metric} compares values, but {loss.name} takes integer class labels; "
                    "use accuracy"
                ),
            )

    evaluates = training.eval_every is not None
    for field, rule in (("early_stopping", training.early_stopping), ("target", training.target)):
        if rule is None:
            continue
        if not evaluates:
            yield f"training.{field}", f"{field} acts on evaluations; set training.eval_every"
        monitored = rule.monitor if isinstance(rule, EarlyStopping) else rule.metric
        if monitored not in spec.monitorable:
            sub = "monitor" if field == "early_stopping" else "metric"
            yield (
                f"training.{field}.{sub}",
                (f"{monitored!r} is not reported; valid: {', '.join(sorted(spec.monitorable))}"),
            )
    if evaluates and not (
        data.validation_split > 0 or data.validation_path or data.evaluate_on_test
    ):
        yield (
            "training.eval_every",
            ("nothing to evaluate on; set dataset.validation_split or evaluate_on_test: true"),
        )

    if data.num_samples is not None and training.batch_size > data.num_samples:
        yield (
            "training.batch_size",
            (
                f"batch_size {training.batch_size} is larger than dataset.num_samples "
                f"{data.num_samples}"
            ),
        )
    if spec.runtime.precision == "mixed_float16" and spec.runtime.device == "cpu":
        yield "runtime.precision", "mixed_float16 needs a GPU; on the CPU use mixed_bfloat16"
    yield from _device_conflicts(spec.runtime, training.batch_size)


def _device_conflicts(runtime: RuntimeSpec, batch_size: int):
    n, machines = runtime.devices, runtime.machines
    if n % machines:
        yield (
            "runtime.devices",
            f"devices {n} do not split evenly over runtime.machines {machines}; use a multiple "
            f"of {machines} (the devices of all the machines together)",
        )
    if n == 1:
        return
    if batch_size % n:
        yield (
            "training.batch_size",
            f"batch_size {batch_size} (the global batch) does not split evenly over "
            f"runtime.devices {n}; use a multiple of {n}",
        )
    # It fails inside Keras 3 under tf.distribute (see the README's "Many devices").
    if runtime.jit_compile is True:
        yield "runtime.jit_compile", f"XLA does not compile a step across {n} devices; use auto"


# The rank (axes of one example) each layer needs, from the data alone: the engine finds the
# sizes that do not fit when it builds the model, and names the layer.
_READS_IMAGES = frozenset(
    {
        "average_pool2d",
        "conv2d",
        "conv2d_transpose",
        "depthwise_conv2d",
        "global_average_pool2d",
        "global_max_pool2d",
        "max_pool2d",
        "random_contrast",
        "random_crop",
        "random_flip",
        "random_rotation",
        "random_zoom",
        "separable_conv2d",
        "upsampling2d",
    }
)
_FLATTENS = frozenset(
    {
        "flatten",
        "global_average_pool1d",
        "global_average_pool2d",
        "global_max_pool1d",
        "global_max_pool2d",
    }
)
_RANKS = {
    1: "flat (features)",
    2: "a sequence (steps, features)",
    3: "an image (height, width, channels)",
}
_TOKENS = -1  # the rank given to token ids: one axis of integers that only an embedding reads


def _input_rank(data: DatasetSpec) -> int | None:
    """The rank of one example as the model takes it; None when only the data can tell."""
    if data.kind == "image":
        return 1 if data.flatten else 3
    if data.kind == "sequence":
        return _TOKENS if data.tokens else 2
    if data.kind == "tabular" and data.name != "tfrecord":  # a TFRecord feature has any shape
        return 1
    return None


def _shape_of(rank: int | None) -> str:
    if rank == _TOKENS:
        return "token ids (steps); an embedding turns them into a sequence"
    return _RANKS.get(rank or 0, f"of rank {rank}")


def _layer_conflicts(spec: JobSpec):
    """Yield (field, message) for each layer whose input cannot have the rank it needs."""
    model, data = spec.model, spec.dataset
    given = _input_rank(data)
    sequences = model.returns_sequences()
    ranks: list[int | None] = []
    for i, (layer, sources) in enumerate(zip(model.layers, model.sources(), strict=True)):
        t, where = layer.type, f"model.layers.{i}.type"
        inputs = [given if j < 0 else ranks[j] for j in sources]
        known = [r for r in inputs if r is not None]
        rank = known[0] if known else None
        if t == "embedding":
            if sources != [-1] or not (data.tokens or data.kind is None):
                yield (
                    where,
                    (
                        "embedding must be the first layer (or read input) and needs token ids "
                        "(synthetic_sequence with vocab_size)"
                    ),
                )
            rank = 2
        elif t in names.MERGE_LAYERS and len(set(known)) > 1:
            yield (
                f"model.layers.{i}.inputs",
                (
                    f"{t} needs inputs of one rank; they are "
                    + ", ".join(_shape_of(r) for r in inputs)
                ),
            )
        elif t in _READS_IMAGES and rank is not None and rank != 3:
            yield (
                where,
                f"{t} needs image-shaped input (height, width, channels); its input is "
                + (_shape_of(rank)),
            )
        elif t in _READS_SEQUENCES and t != "multi_head_attention" and rank not in (None, 2):
            yield (
                where,
                (f"{t} needs sequence input (steps, features); its input is {_shape_of(rank)}"),
            )
        elif t == "multi_head_attention" and any(r in (1, _TOKENS) for r in known):
            yield (
                where,
                (
                    "multi_head_attention needs sequences (steps, features) or images; its "
                    "input is " + _shape_of(next(r for r in known if r in (1, _TOKENS)))
                ),
            )
        if rank == _TOKENS:
            rank = 1  # read as numbers, by a layer that takes any shape (dense, reshape...)
        if t in _FLATTENS:
            rank = 1
        elif t in names.RNN_CELLS or t == "bidirectional":
            rank = 2 if sequences[i] else 1
        elif t == "reshape" and layer.target_shape is not None:
            rank = len(layer.target_shape)
        ranks.append(rank)


_FINAL = {"sparse": "softmax", "one_hot": "softmax", "binary": "sigmoid"}


def _whole_model_conflicts(spec: JobSpec):
    """A Keras config's own output activation against the loss; a backbone's data."""
    assert spec.loss is not None
    model, loss, data = spec.model, spec.loss, spec.dataset
    if isinstance(model, KerasModel):
        if model.several and data.name != "npz":
            yield (
                "model.config",
                f"the model has {len(model.graph.inputs)} inputs and {len(model.graph.outputs)} "
                f"outputs; dataset {data.name} feeds one input and one label array, so several "
                f"are fed only from an npz with named arrays: {NAMED_ARRAYS}",
            )
        act, want = model.output_activation, _FINAL.get(loss.info.labels)
        output = _shown(model.graph.outputs[0])
        if act is not None and want and not loss.logits and act != want:
            yield (
                "model.config",
                f"the output layer {output} ends in {act}, but {loss.name} takes "
                f"probabilities ({want}); end the model in {want}, or set loss.from_logits: true",
            )
    if isinstance(model, BackboneModel):
        if data.kind not in ("image", None):
            yield (
                "model.architecture",
                f"backbone {model.name} needs images but dataset {data.name} is {data.kind}; use "
                "mnist, fashion_mnist, synthetic_images or an npz of images",
            )
        if data.flatten:
            yield "dataset.flatten", "a backbone reads unflattened images; remove flatten"


# ---------------------------------------------------------------- forks

# Model options that hold no weights: a fork may change them and still load the source's.
_WEIGHTLESS = frozenset({"activation", "output_activation", "dropout", "rate"})
# Options of the generated datasets that decide the model's input or output shape.
_DATA_SHAPES = ("num_features", "num_classes", "image_size", "channels", "vocab_size")
_FORK_KEEPS_MODEL = (
    "a fork starts from that job's weights, so the model keeps its architecture and layer "
    "sizes (dropout and activations may change)"
)


def _changed(before: Any, after: Any, path: str):
    """Yield (path, before, after) for each value that differs, weightless options aside."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after), key=str):
            if key not in _WEIGHTLESS:
                yield from _changed(before.get(key), after.get(key), f"{path}.{key}")
    elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            yield from _changed(b, a, f"{path}.{i}")
    elif before != after:
        yield path, before, after


def _optimizer_state(opt: OptimizerSpec) -> dict[str, Any]:
    """What decides the variables an optimizer keeps (and a checkpoint holds for it): Keras
    keeps a constant learning rate as a variable, a schedule as none."""
    return {
        "name": opt.name,
        "amsgrad": bool(opt.amsgrad),
        "centered": bool(opt.centered),
        "momentum": opt.name == "momentum" or bool(opt.momentum),
        "schedule": opt.schedule is not None,
    }


def fork_conflicts(source: JobSpec, fork: JobSpec, source_id: str = "") -> list[Problem]:
    """What `fork` changes that cannot change across a fork of `source` (its checkpoint
    would not load): the model's architecture and sizes, the optimizer's kind and the state
    it keeps, float16 loss scaling, a generated dataset's shapes. One Problem per field."""
    where = source_id or "the source job"
    problems: list[Problem] = []
    before = source.model.model_dump(mode="json", exclude_none=True)
    after = fork.model.model_dump(mode="json", exclude_none=True)
    if before.get("architecture") != after.get("architecture"):
        changes = [("model.architecture", before.get("architecture"), after.get("architecture"))]
    else:
        changes = list(_changed(before, after, "model"))
    for field, was, now in changes:
        problems.append(
            Problem(field, f"{_shown(now)} here, {_shown(was)} in {where}: {_FORK_KEEPS_MODEL}")
        )
    was_state, now_state = _optimizer_state(source.optimizer), _optimizer_state(fork.optimizer)
    for key in was_state:
        renamed = key not in ("name", "schedule") and was_state["name"] != now_state["name"]
        if was_state[key] == now_state[key] or renamed:  # another optimizer: said once
            continue
        if key == "name":
            why = (
                f"{fork.optimizer.name} here, {source.optimizer.name} in {where}: a fork "
                "continues that job's optimizer state, which only the same optimizer takes"
            )
        elif key == "schedule":
            kinds = {True: "a schedule", False: "a constant learning rate"}
            why = (
                f"{kinds[now_state[key]]} here, {kinds[was_state[key]]} in {where}: a fork "
                "continues that job's optimizer state, which holds a constant rate but no "
                "schedule, so it cannot add or remove one (new values for either are fine)"
            )
        else:
            on = {True: "on", False: "off"}
            why = (
                f"{on[now_state[key]]} here, {on[was_state[key]]} in {where}: a fork continues "
                f"that job's optimizer state, whose variables this changes"
            )
        problems.append(Problem(f"optimizer.{key}", why))
    float16 = "mixed_float16"
    if (source.runtime.precision == float16) != (fork.runtime.precision == float16):
        problems.append(
            Problem(
                "runtime.precision",
                f"{fork.runtime.precision} here, {source.runtime.precision} in {where}: "
                f"{float16} adds loss-scaling state to the optimizer, so a fork keeps it on or "
                "off",
            )
        )
    if source.dataset.name == fork.dataset.name:
        for key in _DATA_SHAPES:
            was, now = getattr(source.dataset, key), getattr(fork.dataset, key)
            if was != now:
                problems.append(
                    Problem(
                        f"dataset.{key}",
                        f"{now} here, {was} in {where}: it decides the model's shapes, "
                        f"which a fork keeps",
                    )
                )
    return problems
