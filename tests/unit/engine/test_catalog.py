"""engine.catalog: the registries hold exactly the kernel's names, and every name resolves."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from stepstream.kernel import names
from stepstream.kernel.spec import LossSpec, OptimizerSpec
from stepstream_service.engine import catalog


@pytest.mark.parametrize("kind", sorted(names.CANONICAL))
def test_registry_names_equal_the_client_names(kind):
    assert catalog.REGISTRIES[kind].names() == set(names.CANONICAL[kind])


def test_every_kind_has_a_registry():
    assert set(catalog.REGISTRIES) == set(names.CANONICAL)


@pytest.mark.parametrize("kind", sorted(names.CANONICAL))
def test_unknown_names_list_valid_ones_sorted(kind):
    with pytest.raises(names.UnknownNameError) as caught:
        catalog.get(kind, "no-such-thing")
    listed = str(caught.value).split("names: ")[1].split(", ")
    assert listed == sorted(listed) == names.valid_names(kind)


def test_unknown_kind():
    with pytest.raises(names.UnknownNameError, match="valid kinds: activation, architecture"):
        catalog.get("colour", "red")


@pytest.mark.parametrize(
    ("kind", "alias", "canonical"),
    [
        ("loss", "mse", "mean_squared_error"),
        ("loss", "kld", "kl_divergence"),
        ("loss", "cosine_proximity", "cosine_similarity"),
        ("loss", "cosine", "cosine_similarity"),
        ("metric", "cosine", "cosine_similarity"),
        ("layer", "max_pooling2d", "max_pool2d"),
        ("layer", "global_avg_pool1d", "global_average_pool1d"),
        ("optimizer", "gradient_descent", "sgd"),
        ("activation", "swish", "silu"),
        ("metric", "rmse", "root_mean_squared_error"),
    ],
)
def test_aliases_resolve_to_the_canonical_entry(kind, alias, canonical):
    assert catalog.get(kind, alias) is catalog.get(kind, canonical)


@pytest.mark.parametrize("name", names.ACTIVATIONS)
def test_every_activation_is_a_keras_function(name):
    out = keras.ops.convert_to_numpy(catalog.get("activation", name)(keras.ops.ones((2, 3))))
    assert out.shape == (2, 3) and np.all(np.isfinite(out))


@pytest.mark.parametrize("name", sorted(names.LOSSES))
def test_every_loss_builds(name):
    spec = LossSpec(name=name)
    assert isinstance(catalog.get("loss", name)(spec), keras.losses.Loss)


@pytest.mark.parametrize("name", sorted(names.OPTIMIZERS))
def test_every_optimizer_builds_with_its_options(name):
    opt = catalog.get("optimizer", name)(OptimizerSpec(name=name, learning_rate=0.1))
    assert isinstance(opt, keras.optimizers.Optimizer)
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(0.1)


def test_momentum_means_sgd_with_momentum():
    opt = catalog.get("optimizer", "momentum")(OptimizerSpec(name="momentum", nesterov=True))
    assert isinstance(opt, keras.optimizers.SGD) and opt.momentum == 0.9 and opt.nesterov


def test_weighted_cross_entropy_matches_its_formula():
    logits = np.array([[-3.0, 0.5, 15.0]], dtype="float32")
    labels = np.array([[1.0, 0.0, 1.0]], dtype="float32")
    q = 3.0
    loss = catalog.get("loss", "weighted_cross_entropy_with_logits")(
        LossSpec(name="weighted_cross_entropy_with_logits", pos_weight=q)
    )
    sig = 1 / (1 + np.exp(-logits.astype("float64")))
    expected = np.mean(-(q * labels * np.log(sig) + (1 - labels) * np.log(1 - sig)))
    assert float(loss(labels, logits)) == pytest.approx(expected, rel=1e-5)
    # The naive formula overflows here; the loss must not.
    assert np.isfinite(float(loss(labels, np.array([[-90.0, 90.0, 90.0]], dtype="float32"))))
