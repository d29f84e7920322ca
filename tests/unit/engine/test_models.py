"""engine.models: the layers architecture's graph form, and the errors a misfit gives."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from stepstream.kernel.spec import JobSpec, SpecError
from stepstream_service.engine import datasets, models

TOKENS = {"name": "synthetic_sequence", "num_samples": 40, "sequence_length": 6, "vocab_size": 9}


def build(layers: list[dict], data: dict = TOKENS) -> keras.Model:
    spec = JobSpec.parse({"dataset": data, "model": {"architecture": "layers", "layers": layers}})
    return models.build(spec, datasets.load(spec, datasets.DataPaths(download=False)))


def test_a_graph_becomes_the_keras_graph_it_names():
    model = build(
        [
            {"type": "embedding", "output_dim": 8, "positional": True, "name": "tokens"},
            {"type": "multi_head_attention", "num_heads": 2, "key_dim": 4, "name": "attended"},
            {"type": "add", "inputs": ["tokens", "attended"]},
            {"type": "global_average_pool1d"},
        ]
    )
    add = next(layer for layer in model.layers if isinstance(layer, keras.layers.Add))
    parents = {type(node.operation).__name__ for node in add._inbound_nodes[0].parent_nodes}
    assert parents == {"PositionEmbedding", "MultiHeadAttention"}


@pytest.mark.parametrize(
    ("layers", "field", "phrase"),
    [
        (
            [
                {"type": "embedding", "output_dim": 8, "name": "e"},
                {"type": "dense", "units": 4, "name": "d"},
                {"type": "add", "inputs": ["e", "d"]},
            ],
            "model.layers.2.inputs",
            "add cannot take inputs of shapes (6, 8), (6, 4)",
        ),
        (
            [{"type": "embedding", "output_dim": 8}, {"type": "reshape", "target_shape": [7, -1]}],
            "model.layers.1.target_shape",
            "reshape cannot take input of shape (6, 8)",
        ),
        (
            [{"type": "embedding", "output_dim": 8}, {"type": "group_normalization"}],
            "model.layers.1.groups",
            "Number of groups (32) cannot be more than the number of channels (8)",
        ),
    ],
)
def test_sizes_that_do_not_fit_are_a_spec_error_naming_the_layer(layers, field, phrase):
    with pytest.raises(SpecError) as caught:
        build(layers)
    (problem,) = caught.value.problems
    assert problem.field == field and phrase in problem.message, problem
    assert "\x1b[" not in problem.message and "Arguments received" not in problem.message


def test_a_model_with_position_embeddings_saves_and_loads(tmp_path):
    model = build([{"type": "embedding", "output_dim": 4, "positional": True}])
    x = np.arange(12, dtype="int32").reshape(2, 6) % 9
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0))
