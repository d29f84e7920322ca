"""Layers Keras itself lacks, registered so a saved model loads without this package's code
being imported by hand."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="trainer")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per position to a sequence (batch, steps, features), so the layers
    after it can tell the order of the steps: what attention alone cannot (as
    keras_hub.layers.PositionEmbedding, with the sum taken here)."""

    def __init__(self, initializer: str = "glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[1] is None:
            raise ValueError(
                "position_embedding needs a sequence of fixed length (steps, features); got "
                f"shape {tuple(input_shape[1:])}"
            )
        self.positions = self.add_weight(
            shape=(input_shape[1], input_shape[2]), initializer=self.initializer, name="positions"
        )

    def call(self, inputs):
        return inputs + ops.cast(self.positions, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "initializer": keras.initializers.serialize(self.initializer),
        }
