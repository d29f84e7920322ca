"""Architectures: a spec and the shaped data become a functional Keras model."""

from __future__ import annotations

from collections.abc import Callable

import keras

from stepstream.kernel import names
from stepstream.kernel.spec import JobSpec, LayerSpec
from stepstream_service.engine.datasets import Data
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
    stack: list[LayerSpec] = spec.model.layers
    for i, layer in enumerate(stack):
        following = stack[i + 1].type if i + 1 < len(stack) else None
        ctx = LayerContext(
            default_activation=spec.model.activation,
            vocab_size=data.vocab_size,
            seed=spec.training.seed,
            return_sequences=following in names.RNN_CELLS,
        )
        x = LAYERS.get(layer.type)(layer, ctx)(x)
    if len(x.shape) > 2:
        x = keras.layers.Flatten()(x)
    return x


ARCHITECTURES: Registry[Builder] = Registry(
    "architecture",
    {"cnn": _cnn, "layers": _layers, "linear": _linear, "mlp": _mlp, "rnn": _rnn},
)


def build(spec: JobSpec, data: Data) -> keras.Model:
    """The whole model: inputs, the architecture's body, and an output layer fitted to the
    data (units) and the loss (activation). The output layer stays float32 under mixed
    precision so the loss is computed at full precision."""
    inputs = keras.Input(shape=data.input_shape, dtype="int32" if data.tokens else "float32")
    body = ARCHITECTURES.get(spec.model.architecture)(spec, data, inputs)
    outputs = keras.layers.Dense(
        data.output_units,
        activation=ACTIVATIONS.get(spec.output_activation),
        dtype="float32",
        name="output",
    )(body)
    return keras.Model(inputs, outputs, name=spec.name.replace(".", "_").replace("-", "_"))
