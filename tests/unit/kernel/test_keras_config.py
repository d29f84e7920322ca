"""kernel.keras_config and the spec's keras/backbone models: a config is a tenant's data, and
everything but built-in Keras classes is refused before it is deserialized (no TensorFlow)."""

from __future__ import annotations

import json
import zipfile

import pytest

from stepstream.kernel import keras_config
from stepstream.kernel.spec import JobSpec, SpecError


def tensor(layer: str, *shape: int) -> dict:
    return {
        "class_name": "__keras_tensor__",
        "config": {"shape": [None, *shape], "dtype": "float32", "keras_history": [layer, 0, 0]},
    }


def layer(cls: str, name: str, *inbound: dict, module: str = "keras.layers", **config) -> dict:
    return {
        "module": module,
        "class_name": cls,
        "config": {"name": name, "trainable": True, **config},
        "registered_name": None,
        "name": name,
        "inbound_nodes": [{"args": [list(inbound) if len(inbound) > 1 else inbound[0]]}]
        if inbound
        else [],
    }


def functional(*layers: dict, inputs=("x",), outputs=("out",)) -> dict:
    return {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "registered_name": "Functional",
        "config": {
            "name": "m",
            "layers": list(layers),
            "input_layers": [[n, 0, 0] for n in inputs],
            "output_layers": [[n, 0, 0] for n in outputs],
        },
    }


def x_input(name: str = "x", *shape: int) -> dict:
    return layer("InputLayer", name, batch_shape=[None, *(shape or (8,))], dtype="float32")


def residual(classes: int = 3, activation: str = "softmax", middle: dict | None = None) -> dict:
    """x -> dense(8) -> add(x, dense) -> dense(classes): one skip connection."""
    mid = middle or layer("Dense", "h", tensor("x", 8), units=8, activation="relu")
    return functional(
        x_input(),
        mid,
        layer("Add", "skip", tensor("x", 8), tensor(mid["name"], 8)),
        layer("Dense", "out", tensor("skip", 8), units=classes, activation=activation),
    )


def job(config, **more) -> JobSpec:
    data = {"name": "synthetic_classification", "num_features": 8, "num_classes": 3}
    return JobSpec.parse(
        {"model": {"architecture": "keras", "config": config}, "dataset": data} | more
    )


def refusal(config, **more) -> str:
    with pytest.raises(SpecError) as caught:
        job(config, **more)
    assert caught.value.fields == ["model.config"], caught.value
    return caught.value.problems[0].message


def test_a_functional_graph_with_a_skip_connection_is_read():
    spec = job(residual())
    graph = spec.model.graph
    assert graph.inputs == [("x", (8,), "float32")] and graph.outputs == ["out"]
    assert graph.layer("skip").inputs == ["x", "h"]
    assert spec.model.output_activation == "softmax" == spec.output_activation


def test_the_config_may_be_json_text_and_compile_config_is_dropped():
    config = residual() | {"compile_config": {"loss": {"module": "evil", "class_name": "X"}}}
    spec = job(json.dumps(config))
    assert "compile_config" not in spec.model.config
    assert job(spec.to_dict()["model"]["config"]).model.config == spec.model.config


def test_a_lambda_layer_is_refused_naming_it():
    lam = layer("Lambda", "double", tensor("x", 8), function={"class_name": "__lambda__"})
    message = refusal(residual(middle=lam))
    assert "'double' (Lambda)" in message and "runs Python code" in message


@pytest.mark.parametrize(
    ("middle", "says"),
    [
        (
            layer("MyDense", "mine", tensor("x", 8), module="my_package.layers", units=8),
            "layer 'mine' ('MyDense') names 'MyDense' from module 'my_package.layers'",
        ),
        (
            layer("Dense", "reg", tensor("x", 8), units=8) | {"registered_name": "Custom>Dense"},
            "registered as 'Custom>Dense'",
        ),
        (layer("Frobnicate", "f", tensor("x", 8)), "layer 'f' ('Frobnicate') is not a built-in"),
        (layer("TFSMLayer", "sm", tensor("x", 8)), "'sm' (TFSMLayer) is refused"),
        (
            layer("Dense", "act", tensor("x", 8), units=8)
            | {
                "config": {
                    "name": "act",
                    "units": 8,
                    "activation": {"module": "builtins", "class_name": "function", "config": "x"},
                }
            },
            "layer 'act' (Dense) names a Python function",
        ),
        (
            layer("Dense", "init", tensor("x", 8), units=8)
            | {
                "config": {
                    "name": "init",
                    "units": 8,
                    "kernel_initializer": {"module": "keras.initializers", "class_name": "Mine"},
                }
            },
            "'Mine', not a built-in keras.initializers class",
        ),
        (
            layer("Dense", "code", tensor("x", 8), units=8)
            | {"config": {"name": "code", "units": 8, "custom_objects": {}}},
            "'custom_objects' entry",
        ),
        (
            layer("Dense", "b", tensor("x", 8), units=8)
            | {"config": {"name": "b", "units": 8, "x": {"class_name": "__bytes__"}}},
            "'__bytes__' value",
        ),
    ],
    ids=[
        "custom-module",
        "registered",
        "unknown",
        "tfsm",
        "function",
        "initializer",
        "custom_objects",
        "bytes",
    ],
)
def test_anything_but_built_in_classes_is_refused_naming_the_layer(middle, says):
    assert says in refusal(residual(middle=middle))


def test_a_custom_model_class_is_refused():
    config = residual() | {"module": "mine", "class_name": "MyModel"}
    assert "expected a functional or Sequential" in refusal(config)


def test_a_model_with_two_inputs_is_refused_but_for_an_npz_with_named_arrays():
    config = functional(
        x_input("a"),
        x_input("b"),
        layer("Concatenate", "c", tensor("a", 8), tensor("b", 8)),
        layer("Dense", "out", tensor("c", 16), units=3, activation="softmax"),
        inputs=("a", "b"),
    )
    message = refusal(config)
    assert (
        "2 inputs and 1 outputs" in message and "npz with named arrays: x_train:<input" in message
    )
    named = job(config, dataset={"name": "npz", "path": "uploads/d.npz"})
    assert named.model.several and named.model.input_names == ["a", "b"]


def test_a_dangling_reference_is_refused():
    config = residual()
    config["config"]["output_layers"] = [["nowhere", 0, 0]]
    assert "'nowhere' it does not have" in refusal(config)


def test_the_output_activation_must_suit_the_loss():
    message = refusal(residual(activation="linear"))
    assert "ends in linear" in message and "from_logits: true" in message
    assert job(
        residual(activation="linear"),
        loss={"name": "sparse_categorical_crossentropy", "from_logits": True},
    )
    with pytest.raises(SpecError) as caught:
        job(residual(), loss={"name": "sparse_categorical_crossentropy", "from_logits": True})
    assert caught.value.fields == ["loss.from_logits"]


def test_from_keras_reads_a_model_duck_typed_a_json_file_and_a_keras_archive(tmp_path):
    class Model:  # what JobSpec.from_keras uses of a keras.Model
        def to_json(self):
            return json.dumps(residual())

    data = {"name": "synthetic_classification", "num_features": 8, "num_classes": 3}
    a = JobSpec.from_keras(Model(), dataset=data, training={"steps": 5})
    (tmp_path / "m.json").write_text(json.dumps(residual()))
    with zipfile.ZipFile(tmp_path / "m.keras", "w") as z:
        z.writestr("config.json", json.dumps(residual()))
    b = JobSpec.from_keras(tmp_path / "m.json", dataset=data)
    c = JobSpec.from_keras(str(tmp_path / "m.keras"), dataset=data)
    assert a.model.config == b.model.config == c.model.config and a.training.steps == 5
    with pytest.raises(SpecError, match=r"model\.config: cannot read"):
        JobSpec.from_keras(tmp_path / "missing.json", dataset=data)


def test_a_path_in_a_spec_is_never_read():
    with pytest.raises(SpecError) as caught:
        job("/etc/passwd")
    assert caught.value.fields == ["model.config"]


def test_deep_nesting_is_bounded():
    deep: dict = {"k": 1}
    for _ in range(keras_config.MAX_DEPTH + 5):
        deep = {"k": deep}
    config = residual()
    config["config"]["layers"][1]["config"]["extra"] = deep
    assert "deeper than" in refusal(config)


# ---------------------------------------------------------------- backbones


def backbone(**model) -> JobSpec:
    return JobSpec.parse(
        {"model": {"architecture": "backbone", **model}, "dataset": "synthetic_images"}
    )


def test_backbone_names_resolve_keras_spellings_too():
    assert backbone(name="MobileNetV2").model.name == "mobilenet_v2"
    assert backbone(name="efficientnet-b0").model.name == "efficientnet_b0"
    with pytest.raises(SpecError, match="valid backbone names: efficientnet_b0"):
        backbone(name="vgg99")


@pytest.mark.parametrize("weights", ["/etc/w.weights.h5", "../w.weights.h5", "w.npz", "a\nb.h5"])
def test_backbone_weights_are_none_or_a_relative_weights_file(weights):
    with pytest.raises(SpecError) as caught:
        backbone(name="resnet50", weights=weights)
    assert caught.value.fields == ["model.weights"]
    assert backbone(name="resnet50", weights="uploads/w.weights.h5").model.weights.endswith(".h5")


def test_a_backbone_needs_images():
    with pytest.raises(SpecError) as caught:
        JobSpec.parse(
            {
                "model": {"architecture": "backbone", "name": "resnet50"},
                "dataset": "linear",
                "loss": "mse",
            }
        )
    assert "model.architecture" in caught.value.fields
