"""Architectures: a spec and the shaped data become a functional Keras model."""

from __future__ import annotations

import re
from collections.abc import Callable

import keras

from stepstream.kernel.spec import JobSpec, LayersModel, LayerSpec, Problem, SpecError
from stepstream_service.engine import keras_models
from stepstream_service.engine.datasets import Data, DataPaths
from stepstream_service.engine.registry import ACTIVATIONS, LAYERS, LayerContext, Registry

Tensor = keras.KerasTensor
Builder = Callable[[JobSpec, Data, Tensor], Tensor]


def _hidden(spec: JobSpec, x: Tensor, units: list[int]) -> Tensor:
    m = spec.model
    for n in units:
        x = keras.layers.Dense(n, activation=ACTIVATIONS.get(m.activation))(x)
        if m.batch_normalization:
            x = keras.layers.BatchNormalization()(x)
        if m.dropout:
            x = keras.layers.Dropout(m.dropout, seed=spec.training.seed)(x)
    return x


def _linear(spec: JobSpec, data: Data, x: Tensor) -> Tensor:
    return keras.layers.Flatten()(x) if len(data.input_shape) > 1 else x


def _mlp(spec: JobSpec, data: Data, x: Tensor) -> Tensor:
    if len(data.input_shape) > 1:
        x = keras.layers.Flatten()(x)
    return _hidden(spec, x, spec.model.hidden_units)


def _cnn(spec: JobSpec, data: Data, x: Tensor) -> Tensor:
    m = spec.model
    act = ACTIVATIONS.get(m.activation)
    for filters in m.filters:
        x = keras.layers.Conv2D(filters, m.kernel_size, padding="same", activation=act)(x)
        if m.batch_normalization:
            x = keras.layers.BatchNormalization()(x)
        if min(x.shape[1], x.shape[2]) >= 2 * m.pool_size:
            x = keras.layers.MaxPooling2D(m.pool_size)(x)
    x = keras.layers.Flatten()(x)
    return _hidden(spec, x, m.dense_units)


_RNN = {"gru": keras.layers.GRU, "lstm": keras.layers.LSTM, "simple_rnn": keras.layers.SimpleRNN}


def _rnn(spec: JobSpec, data: Data, x: Tensor) -> Tensor:
    m = spec.model
    if data.tokens:
        x = keras.layers.Embedding(data.vocab_size or 2, m.embedding_dim)(x)
    for i, units in enumerate(m.units):
        layer = _RNN[m.cell](units, return_sequences=i < len(m.units) - 1, seed=spec.training.seed)
        x = keras.layers.Bidirectional(layer)(x) if m.bidirectional else layer(x)
    return _hidden(spec, x, m.dense_units)


def _layers(spec: JobSpec, data: Data, x: Tensor) -> Tensor:
    """The stack, or graph, of explicit layers. A size that does not fit (an add of two
    widths, a reshape to another size) is a SpecError naming the layer, not Keras's trace."""
    model: LayersModel = spec.model
    sequences = model.returns_sequences()
    outputs: list[Tensor] = []
    for i, (layer, sources) in enumerate(zip(model.layers, model.sources(), strict=True)):
        ctx = LayerContext(
            default_activation=model.activation,
            vocab_size=data.vocab_size,
            seed=spec.training.seed,
            return_sequences=sequences[i],
        )
        inputs = [x if j < 0 else outputs[j] for j in sources]
        try:
            outputs.append(LAYERS.get(layer.type)(layer, ctx)(inputs))
        except (ValueError, TypeError) as exc:
            raise SpecError([_misfit(i, layer, inputs, exc)]) from None
    out = outputs[model.output_index]
    if len(out.shape) > 2:
        out = keras.layers.Flatten()(out)
    return out


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Where a misfit is most likely fixed: the option that sets the size, else the inputs.
_MISFIT_FIELD = {
    "reshape": "target_shape",
    "group_normalization": "groups",
    "random_crop": "height",
}


def _misfit(i: int, layer: LayerSpec, inputs: list[Tensor], exc: Exception) -> Problem:
    """Keras's reason, without its call trace, with the shapes the layer was given."""
    lines = [
        line.strip()
        for line in _ANSI.sub("", str(exc)).splitlines()
        if line.strip()
        and not line.startswith(("Exception encountered", "Arguments received", "  •", "•"))
    ]
    reason = (lines[0] if lines else type(exc).__name__)[:400]
    shapes = ", ".join(str(tuple(t.shape[1:])) for t in inputs)
    field = _MISFIT_FIELD.get(layer.type, "inputs" if layer.inputs else "type")
    return Problem(
        f"model.layers.{i}.{field}",
        f"{layer.type} cannot take {'inputs of shapes' if len(inputs) > 1 else 'input of shape'} "
        f"{shapes}: {reason}",
    )


ARCHITECTURES: Registry[Builder] = Registry(
    "architecture",
    {
        "backbone": keras_models.backbone_body,
        "cnn": _cnn,
        "keras": keras_models.config_body,
        "layers": _layers,
        "linear": _linear,
        "mlp": _mlp,
        "rnn": _rnn,
    },
)
# Architectures whose body ends in the model's own outputs: no output layer is added.
OWN_OUTPUTS = ("keras",)


def build(spec: JobSpec, data: Data, paths: DataPaths | None = None) -> keras.Model:
    """The whole model: inputs, the architecture's body, and an output layer fitted to the
    data (units) and the loss (activation). The output layer stays float32 under mixed
    precision so the loss is computed at full precision. `paths` find a backbone's uploaded
    weights."""
    # A Keras config fed named arrays (several inputs or outputs); a Stream has none.
    if getattr(data, "named_outputs", None) is not None:
        return keras_models.named_model(spec, data)
    inputs = keras.Input(shape=data.input_shape, dtype="int32" if data.tokens else "float32")
    body = ARCHITECTURES.get(spec.model.architecture)(spec, data, inputs)
    name = spec.name.replace(".", "_").replace("-", "_")
    if spec.model.architecture in OWN_OUTPUTS:
        return keras.Model(inputs, body, name=name)
    outputs = keras.layers.Dense(
        data.output_units,
        activation=ACTIVATIONS.get(spec.output_activation),
        dtype="float32",
        name="output",
    )(body)
    model = keras.Model(inputs, outputs, name=name)
    if spec.model.architecture == "backbone":
        keras_models.load_weights(model, spec, paths)
    return model
