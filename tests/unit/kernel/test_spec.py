"""The job spec: defaults, aliases, loading, and a table of specs it must refuse."""

from __future__ import annotations

import json
import sys

import pytest

from stepstream.kernel import names
from stepstream.kernel.spec import JobSpec, SpecError, load_spec, parse_duration

MNIST_MLP = {"dataset": "mnist", "model": "mlp"}

# (case id, spec, the field the error must name, a phrase the message must contain)
BAD_SPECS = [
    ("unknown-top-field", {"epochz": 3}, "epochz", "unknown field"),
    (
        "unknown-architecture",
        {"model": "transformer"},
        "model",
        "backbone, cnn, keras, layers, linear, mlp, rnn",
    ),
    (
        "hidden-units-zero",
        {"model": {"architecture": "mlp", "hidden_units": [0]}},
        "model.hidden_units.0",
        "greater than 0",
    ),
    (
        "dropout-one",
        {"model": {"architecture": "mlp", "dropout": 1.0}},
        "model.dropout",
        "less than 1",
    ),
    (
        "unknown-activation",
        {"model": {"architecture": "mlp", "activation": "relu7"}},
        "model.activation",
        "relu6",
    ),
    (
        "unknown-output-activation",
        {"model": {"architecture": "linear", "output_activation": "x"}},
        "model.output_activation",
        "valid activation names",
    ),
    (
        "mlp-field-on-cnn",
        {"model": {"architecture": "cnn", "hidden_units": [3]}},
        "model.hidden_units",
        "unknown field",
    ),
    (
        "cnn-empty-filters",
        {"model": {"architecture": "cnn", "filters": []}},
        "model.filters",
        "at least 1",
    ),
    (
        "rnn-bad-cell",
        {"model": {"architecture": "rnn", "cell": "transformer"}},
        "model.cell",
        "lstm",
    ),
    (
        "layers-empty",
        {"model": {"architecture": "layers", "layers": []}},
        "model.layers",
        "at least 1",
    ),
    (
        "layer-unknown-type",
        {"model": {"architecture": "layers", "layers": [{"type": "conv3d"}]}},
        "model.layers.0.type",
        "conv2d",
    ),
    (
        "layer-missing-units",
        {"model": {"architecture": "layers", "layers": [{"type": "dense"}]}},
        "model.layers.0.units",
        "needs units",
    ),
    (
        "layer-foreign-option",
        {
            "model": {
                "architecture": "layers",
                "layers": [{"type": "dropout", "rate": 0.1, "units": 3}],
            }
        },
        "model.layers.0.units",
        "does not take units",
    ),
    ("unknown-loss", {"loss": "cross_entropy"}, "loss.name", "categorical_crossentropy"),
    (
        "label-smoothing-on-sparse",
        {"loss": {"name": "sparse_categorical_crossentropy", "label_smoothing": 0.1}},
        "loss.label_smoothing",
        "it takes: from_logits",
    ),
    (
        "pos-weight-on-mse",
        {**MNIST_MLP, "loss": {"name": "mse", "pos_weight": 2}},
        "loss.pos_weight",
        "does not take",
    ),
    (
        "logits-only-loss-from-logits-false",
        {"loss": {"name": "softmax_cross_entropy_with_logits", "from_logits": False}},
        "loss.from_logits",
        "always takes logits",
    ),
    (
        "label-smoothing-negative",
        {"loss": {"name": "categorical_crossentropy", "label_smoothing": -0.1}},
        "loss.label_smoothing",
        "greater than or equal to 0",
    ),
    (
        "sparse-labels-with-categorical-ce",
        {"loss": "categorical_crossentropy", "dataset": {"name": "mnist", "one_hot": False}},
        "dataset.one_hot",
        "needs one-hot labels",
    ),
    (
        "one-hot-with-sparse-ce",
        {"loss": "sparse_categorical_crossentropy", "dataset": {"name": "mnist", "one_hot": True}},
        "dataset.one_hot",
        "integer class labels",
    ),
    (
        "softmax-output-with-logits",
        {
            "loss": {"name": "categorical_crossentropy", "from_logits": True},
            "model": {"architecture": "mlp", "output_activation": "softmax"},
        },
        "loss.from_logits",
        "probabilities, not logits",
    ),
    (
        "classification-loss-on-regression",
        {"dataset": "linear", "loss": "binary_crossentropy"},
        "loss.name",
        "regression",
    ),
    (
        "cnn-on-tabular",
        {"model": "cnn", "dataset": "synthetic_classification"},
        "model.architecture",
        "cnn needs image data",
    ),
    ("rnn-on-tabular", {"model": "rnn", "dataset": "linear"}, "model.architecture", "sequences"),
    (
        "conv-layer-on-tabular",
        {
            "dataset": "synthetic_regression",
            "model": {"architecture": "layers", "layers": [{"type": "conv2d", "filters": 4}]},
        },
        "model.layers.0.type",
        "image-shaped",
    ),
    (
        "embedding-not-first",
        {
            "dataset": {"name": "synthetic_sequence", "vocab_size": 20},
            "model": {
                "architecture": "layers",
                "layers": [{"type": "lstm", "units": 4}, {"type": "embedding"}],
            },
        },
        "model.layers.1.type",
        "first layer",
    ),
    (
        "graph-unknown-input",
        {
            "model": {
                "architecture": "layers",
                "layers": [{"type": "dense", "units": 3, "inputs": ["x"]}],
            }
        },
        "model.layers.0.inputs",
        "no earlier layer is named 'x'",
    ),
    (
        "graph-forward-reference",
        {
            "model": {
                "architecture": "layers",
                "layers": [
                    {"type": "dense", "units": 3, "name": "a", "inputs": ["b"]},
                    {"type": "dense", "units": 3, "name": "b", "inputs": ["a"]},
                ],
            }
        },
        "model.layers.0.inputs",
        "after this one",
    ),
    (
        "graph-self-reference",
        {
            "model": {
                "architecture": "layers",
                "layers": [
                    {"type": "dense", "units": 3, "name": "a", "inputs": ["a"]},
                ],
            }
        },
        "model.layers.0.inputs",
        "its own output",
    ),
    (
        "graph-duplicate-name",
        {
            "model": {
                "architecture": "layers",
                "layers": [
                    {"type": "dense", "units": 3, "name": "a"},
                    {"type": "dense", "units": 3, "name": "a"},
                ],
            }
        },
        "model.layers.1.name",
        "already names layers.0",
    ),
    (
        "graph-merge-of-one",
        {
            "model": {
                "architecture": "layers",
                "layers": [
                    {"type": "dense", "units": 3},
                    {"type": "add"},
                ],
            }
        },
        "model.layers.1.inputs",
        "two or more inputs",
    ),
    (
        "graph-two-inputs-to-dense",
        {
            "model": {
                "architecture": "layers",
                "layers": [
                    {"type": "dense", "units": 3, "name": "a"},
                    {"type": "dense", "units": 3, "inputs": ["a", "input"]},
                ],
            }
        },
        "model.layers.1.inputs",
        "merge them first",
    ),
    (
        "graph-dangling-branch",
        {
            "model": {
                "architecture": "layers",
                "layers": [
                    {"type": "dense", "units": 3},
                    {"type": "dense", "units": 3, "inputs": ["input"]},
                ],
            }
        },
        "model.layers.0",
        "nothing reads",
    ),
    (
        "graph-unknown-output",
        {
            "model": {
                "architecture": "layers",
                "output": "z",
                "layers": [{"type": "dense", "units": 3}],
            }
        },
        "model.output",
        "no layer is named 'z'",
    ),
    (
        "graph-input-is-reserved",
        {
            "model": {
                "architecture": "layers",
                "layers": [{"type": "dense", "units": 3, "name": "input"}],
            }
        },
        "model.layers.0.name",
        "model's input",
    ),
    (
        "attention-without-heads",
        {
            "model": {
                "architecture": "layers",
                "layers": [{"type": "multi_head_attention", "key_dim": 4}],
            }
        },
        "model.layers.0.num_heads",
        "needs num_heads",
    ),
    (
        "attention-on-flat-features",
        {
            "dataset": "synthetic_classification",
            "model": {
                "architecture": "layers",
                "layers": [
                    {"type": "multi_head_attention", "num_heads": 2, "key_dim": 4},
                ],
            },
        },
        "model.layers.0.type",
        "needs sequences",
    ),
    (
        "conv1d-on-images",
        {
            "dataset": "mnist",
            "model": {
                "architecture": "layers",
                "layers": [
                    {"type": "conv1d", "filters": 4},
                ],
            },
        },
        "model.layers.0.type",
        "needs sequence input",
    ),
    (
        "lstm-on-token-ids",
        {
            "dataset": {"name": "synthetic_sequence", "vocab_size": 9},
            "model": {
                "architecture": "layers",
                "layers": [{"type": "lstm", "units": 4}],
            },
        },
        "model.layers.0.type",
        "an embedding turns them into a sequence",
    ),
    (
        "image-layer-after-global-pool",
        {
            "dataset": "mnist",
            "model": {
                "architecture": "layers",
                "layers": [
                    {"type": "global_average_pool2d"},
                    {"type": "random_flip"},
                ],
            },
        },
        "model.layers.1.type",
        "image-shaped",
    ),
    (
        "merge-of-two-ranks",
        {
            "dataset": "mnist",
            "model": {
                "architecture": "layers",
                "layers": [
                    {"type": "flatten", "name": "flat"},
                    {"type": "add", "inputs": ["flat", "input"]},
                ],
            },
        },
        "model.layers.1.inputs",
        "one rank",
    ),
    (
        "causal-padding-on-conv2d",
        {
            "model": {
                "architecture": "layers",
                "layers": [
                    {"type": "conv2d", "filters": 2, "padding": "causal"},
                ],
            }
        },
        "model.layers.0.padding",
        "causal padding is for conv1d",
    ),
    (
        "reshape-with-two-wildcards",
        {
            "model": {
                "architecture": "layers",
                "layers": [{"type": "reshape", "target_shape": [-1, -1]}],
            }
        },
        "model.layers.0.target_shape",
        "at most one",
    ),
    (
        "random-zoom-factor-too-big",
        {"model": {"architecture": "layers", "layers": [{"type": "random_zoom", "factor": 2}]}},
        "model.layers.0.factor",
        "less than or equal to 1",
    ),
    (
        "flatten-for-cnn",
        {"model": "cnn", "dataset": {"name": "mnist", "flatten": True}},
        "dataset.flatten",
        "unflattened",
    ),
    ("unknown-optimizer", {"optimizer": "adamax2"}, "optimizer.name", "adamax"),
    (
        "nesterov-on-adam",
        {"optimizer": {"name": "adam", "nesterov": True}},
        "optimizer.nesterov",
        "adam does not take nesterov",
    ),
    (
        "negative-learning-rate",
        {"optimizer": {"name": "sgd", "learning_rate": -1}},
        "optimizer.learning_rate",
        "greater than 0",
    ),
    (
        "momentum-too-big",
        {"optimizer": {"name": "momentum", "momentum": 1.5}},
        "optimizer.momentum",
        "less than 1",
    ),
    (
        "two-clip-norms",
        {"optimizer": {"name": "sgd", "clipnorm": 1, "global_clipnorm": 1}},
        "optimizer.global_clipnorm",
        "not both",
    ),
    (
        "unknown-schedule",
        {"optimizer": {"name": "sgd", "schedule": "warmup"}},
        "optimizer.schedule.name",
        "cosine_decay",
    ),
    (
        "schedule-without-decay-steps",
        {"optimizer": {"schedule": {"name": "exponential_decay", "decay_rate": 0.5}}},
        "optimizer.schedule.decay_steps",
        "needs decay_steps",
    ),
    (
        "piecewise-values-count",
        {
            "optimizer": {
                "schedule": {
                    "name": "piecewise_constant_decay",
                    "boundaries": [10, 20],
                    "values": [0.1, 0.01],
                }
            }
        },
        "optimizer.schedule.values",
        "one more value",
    ),
    ("unknown-metric", {"metrics": ["accuracy", "f1"]}, "metrics.1", "valid metric names"),
    (
        "accuracy-on-regression",
        {"dataset": "linear", "metrics": ["accuracy"]},
        "metrics.0",
        "needs class labels",
    ),
    (
        "auc-with-sparse-labels",
        {"dataset": "mnist", "metrics": ["auc"]},
        "metrics.0",
        "needs one-hot labels",
    ),
    ("unknown-dataset", {"dataset": "cifar100"}, "dataset.name", "fashion_mnist"),
    ("npz-without-path", {"dataset": "npz"}, "dataset.path", "needs path"),
    (
        "option-foreign-to-dataset",
        {"dataset": {"name": "mnist", "num_features": 3}},
        "dataset.num_features",
        "dataset mnist does not take num_features",
    ),
    (
        "validation-split-too-big",
        {"dataset": {"name": "mnist", "validation_split": 0.9}},
        "dataset.validation_split",
        "less than or equal to 0.5",
    ),
    ("steps-and-epochs", {"training": {"steps": 10, "epochs": 2}}, "training.epochs", "not both"),
    ("zero-batch", {"training": {"batch_size": 0}}, "training.batch_size", "greater than or equal"),
    (
        "batch-larger-than-data",
        {"dataset": {"name": "linear", "num_samples": 50}, "training": {"batch_size": 100}},
        "training.batch_size",
        "larger than dataset.num_samples",
    ),
    (
        "early-stopping-without-eval",
        {"training": {"early_stopping": {"patience": 2}}},
        "training.early_stopping",
        "set training.eval_every",
    ),
    (
        "target-unreported-metric",
        {"training": {"eval_every": 10, "target": {"metric": "val_auc", "value": 0.9}}},
        "training.target.metric",
        "val_accuracy, val_loss",
    ),
    (
        "bad-duration",
        {"training": {"max_duration": "ten minutes"}},
        "training.max_duration",
        "not a duration",
    ),
    ("unknown-device", {"runtime": {"device": "tpu"}}, "runtime.device", "'auto', 'cpu' or 'gpu'"),
    (
        "float16-on-cpu",
        {"runtime": {"device": "cpu", "precision": "mixed_float16"}},
        "runtime.precision",
        "needs a GPU",
    ),
    ("bad-job-name", {"name": "my job!"}, "name", "letters, digits"),
    (
        "steps-per-execution-zero",
        {"runtime": {"steps_per_execution": 0}},
        "runtime.steps_per_execution",
        "greater than 0, or 'auto'",
    ),
    (
        "devices-not-split-over-machines",
        {"runtime": {"devices": 3, "machines": 2}, "training": {"batch_size": 30}},
        "runtime.devices",
        "do not split evenly over runtime.machines 2",
    ),
    (
        "too-many-machines",
        {"runtime": {"devices": 34, "machines": 17}},
        "runtime.machines",
        "less than or equal to 16",
    ),
]


def test_the_table_is_big_enough():
    assert len(BAD_SPECS) >= 30
    assert len({case[0] for case in BAD_SPECS}) == len(BAD_SPECS)


@pytest.mark.parametrize(
    ("spec", "field", "phrase"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS]
)
def test_bad_spec_is_refused_naming_the_field(spec, field, phrase):
    with pytest.raises(SpecError) as caught:
        JobSpec.parse(spec)
    problems = {p.field: p.message for p in caught.value.problems}
    assert field in problems, f"expected {field} among {problems}"
    assert phrase in problems[field], problems[field]
    assert field in str(caught.value)


def test_every_conflict_is_reported_not_only_the_first():
    with pytest.raises(SpecError) as caught:
        JobSpec.parse(
            {
                "loss": {"name": "categorical_crossentropy", "from_logits": True},
                "model": {"architecture": "mlp", "output_activation": "softmax"},
                "dataset": {"name": "mnist", "one_hot": False},
            }
        )
    assert {"loss.from_logits", "dataset.one_hot"} <= set(caught.value.fields)


def test_unknown_names_list_the_valid_ones_sorted():
    with pytest.raises(SpecError) as caught:
        JobSpec.parse({"loss": "nope"})
    message = caught.value.problems[0].message
    listed = message.split("valid loss names: ")[1].split(", ")
    assert listed == sorted(listed) == names.valid_names("loss")
    assert "mse" in listed and "kld" in listed and "cosine_proximity" in listed


def test_an_empty_spec_is_refused():
    # Most often a client that sent nothing (a misspelt field), not a wish for the defaults.
    with pytest.raises(SpecError, match="the spec is empty"):
        JobSpec.parse({})


def test_defaults_make_a_runnable_job():
    spec = JobSpec.parse({"dataset": "fashion_mnist"})
    assert spec.model.architecture == "mlp"
    assert spec.loss.name == "sparse_categorical_crossentropy"
    assert spec.metrics == ["accuracy"]
    assert spec.training.steps == 1000 and spec.training.batch_size == 32
    assert spec.output_activation == "softmax"
    assert spec.step_metric == "accuracy"


def test_regression_datasets_get_regression_defaults():
    spec = JobSpec.parse({"dataset": "linear", "model": "linear"})
    assert spec.loss.name == "mean_squared_error"
    assert spec.metrics == ["mean_absolute_error"]
    assert spec.output_activation == "linear"
    assert spec.step_metric == "mae"


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("mse", "mean_squared_error"),
        ("kld", "kl_divergence"),
        ("kullback_leibler_divergence", "kl_divergence"),
        ("cosine_proximity", "cosine_similarity"),
        ("cosine", "cosine_similarity"),
        ("logcosh", "log_cosh"),
        ("MAE", "mean_absolute_error"),
        ("Mean-Squared-Error", "mean_squared_error"),
    ],
)
def test_loss_aliases_resolve(alias, canonical):
    assert JobSpec.parse({**MNIST_MLP, "loss": alias}).loss.name == canonical


def test_optimizer_and_activation_aliases():
    spec = JobSpec.parse(
        {"optimizer": "gradient_descent", "model": {"architecture": "mlp", "activation": "swish"}}
    )
    assert spec.optimizer.name == "sgd" and spec.model.activation == "silu"
    assert spec.optimizer.initial_learning_rate == 0.01


def test_logits_losses_get_linear_outputs():
    for loss in (
        "softmax_cross_entropy_with_logits",
        "sigmoid_cross_entropy_with_logits",
        {"name": "categorical_crossentropy", "from_logits": True},
    ):
        assert JobSpec.parse({"loss": loss}).output_activation == "linear"
    assert JobSpec.parse({"loss": "binary_crossentropy"}).output_activation == "sigmoid"


@pytest.mark.parametrize(
    ("text", "seconds"), [(90, 90.0), ("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("2.5", 2.5)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_yaml_and_json_files_load(tmp_path):
    (tmp_path / "job.yaml").write_text("name: a\nmodel: linear\ndataset: linear\nloss: mse\n")
    (tmp_path / "job.json").write_text(
        json.dumps({"name": "b", "dataset": "linear", "model": "linear"})
    )
    assert load_spec(tmp_path / "job.yaml").name == "a"
    assert load_spec(tmp_path / "job.json").name == "b"


def test_broken_files_are_refused_clearly(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="a job spec is a mapping"):
        JobSpec.parse(["not", "a", "mapping"])


def test_round_trip_through_dict():
    spec = JobSpec.parse(
        {
            "model": {"architecture": "cnn", "filters": [8]},
            "dataset": "mnist",
            "optimizer": {"name": "sgd", "schedule": {"name": "cosine_decay", "decay_steps": 100}},
        }
    )
    assert JobSpec.parse(spec.to_dict()) == spec


def test_examples_are_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[3] / "examples").glob("*.yaml"))
    assert len(examples) >= 4
    for path in examples:
        load_spec(path)


def test_client_spec_does_not_import_tensorflow():
    import subprocess

    code = "import sys, stepstream.kernel.spec, stepstream.cli; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_whole_floats_from_json_are_accepted_as_counts():
    spec = JobSpec.parse(
        {"training": {"steps": 10.0, "batch_size": 16.0}, "runtime": {"steps_per_execution": 5.0}}
    )
    assert spec.training.steps == 10 and spec.runtime.steps_per_execution == 5
    with pytest.raises(SpecError, match="steps_per_execution"):
        JobSpec.parse({"runtime": {"steps_per_execution": 2.5}})


def test_a_servers_limits_are_named_in_the_error():
    from stepstream.kernel.spec import SpecLimits

    limits = SpecLimits(max_steps=1000, max_epochs=5, max_layers=3, max_units=256)
    spec = {
        "model": {"architecture": "mlp", "hidden_units": [64, 512, 64, 64]},
        "training": {"steps": 5000},
    }
    with pytest.raises(SpecError) as err:
        JobSpec.parse(spec, limits=limits)
    messages = dict((p.field, p.message) for p in err.value.problems)
    assert "max_steps" in messages["training.steps"] and "5000" in messages["training.steps"]
    assert "max_layers" in messages["model"]
    assert "max_units" in messages["model.hidden_units.1"]
    layers = {"architecture": "layers", "layers": [{"type": "dense", "units": 300}]}
    with pytest.raises(SpecError, match=r"model\.layers\.0\.units: 300 units .*max_units"):
        JobSpec.parse({"model": layers}, limits=limits)
    with pytest.raises(SpecError, match="max_epochs"):
        JobSpec.parse({"training": {"epochs": 6}}, limits=limits)
    assert JobSpec.parse({"training": {"steps": 1000}}, limits=limits).training.steps == 1000
    assert JobSpec.parse(spec).training.steps == 5000  # no limits: only the spec's own rules


@pytest.mark.parametrize(
    ("labels", "field", "phrase"),
    [
        ({f"l{i}": "v" for i in range(65)}, "labels", "64"),
        ({"k": "v" * 257}, "labels.k", "at most 256 printable"),
        ({"k": "a\x00b"}, "labels.k", "no NUL"),
        ({"k": "a\nb"}, "labels.k", "control character"),
        ({"a b": "v"}, "labels.a b", "label key"),
        ({"k" * 5000: "v"}, "labels." + "k" * 64 + "... (5000 characters)", "label key"),
    ],
)
def test_labels_are_bounded_in_count_size_and_characters(labels, field, phrase):
    with pytest.raises(SpecError) as caught:
        JobSpec.parse({"labels": labels})
    assert caught.value.fields == [field]
    assert phrase in str(caught.value)
    assert len(str(caught.value)) < 1000  # the input is never echoed whole


def test_labels_at_their_limits_are_accepted():
    labels = {f"k{i:02d}" + "k" * 60: "v" * 256 for i in range(64)}
    assert JobSpec.parse({"labels": labels}).labels == labels


def test_a_dataset_path_is_bounded():
    long = {"name": "npz", "path": "u/" * 600}
    with pytest.raises(SpecError) as caught:
        JobSpec.parse({"dataset": long})
    assert caught.value.fields == ["dataset.path"] and "1024" in str(caught.value)
    with pytest.raises(SpecError, match="control characters"):
        JobSpec.parse({"dataset": {"name": "npz", "path": "a\x00.npz"}})


def test_an_unknown_name_is_never_echoed_whole():
    with pytest.raises(SpecError) as caught:
        JobSpec.parse({"loss": "x" * 100_000})
    assert "(100000 characters)" in str(caught.value) and len(str(caught.value)) < 2000


ATTENTION_GRAPH = {
    "dataset": {"name": "synthetic_sequence", "vocab_size": 20},
    "model": {
        "architecture": "layers",
        "layers": [
            {"type": "embedding", "output_dim": 8, "positional": True, "name": "tokens"},
            {"type": "multi_head_attention", "num_heads": 2, "key_dim": 4, "name": "attended"},
            {"type": "add", "inputs": ["tokens", "attended"]},
            {"type": "layer_normalization"},
            {"type": "global_average_pool1d"},
        ],
    },
}


def test_a_graph_resolves_its_inputs_and_a_stack_reads_the_layer_before():
    model = JobSpec.parse(ATTENTION_GRAPH).model
    assert model.sources() == [[-1], [0], [0, 1], [2], [3]]
    assert model.output_index == 4
    stack = JobSpec.parse(
        {"model": {"architecture": "layers", "layers": [{"type": "dense", "units": 3}] * 3}}
    ).model
    assert stack.sources() == [[-1], [0], [1]]


def test_output_names_the_layer_that_feeds_the_head():
    spec = {
        **ATTENTION_GRAPH,
        "model": {**ATTENTION_GRAPH["model"], "output": "tokens"},
    }
    spec["model"]["layers"] = [*ATTENTION_GRAPH["model"]["layers"][:2]]
    spec["model"]["layers"][1] = {**spec["model"]["layers"][1], "inputs": ["tokens"]}
    with pytest.raises(SpecError, match=r"model\.layers\.1: nothing reads"):
        JobSpec.parse(spec)
    spec["model"]["output"] = "attended"
    assert JobSpec.parse(spec).model.output_index == 1


def test_recurrent_layers_return_sequences_when_a_sequence_reader_follows():
    layers = [
        {"type": "embedding", "output_dim": 4},
        {"type": "lstm", "units": 4},
        {"type": "dropout", "rate": 0.1},  # keeps the shape: the gru after it decides
        {"type": "gru", "units": 4},
        {"type": "dense", "units": 4},
        {"type": "simple_rnn", "units": 3, "return_sequences": True},  # said: kept
    ]
    layers.insert(5, {"type": "reshape", "target_shape": [4, 1]})
    spec = {"dataset": {"name": "synthetic_sequence", "vocab_size": 9}}
    model = JobSpec.parse({**spec, "model": {"architecture": "layers", "layers": layers}}).model
    said = model.returns_sequences()
    assert [said[i] for i in (1, 3, 6)] == [True, False, True]


# ---------------------------------------------------------------- forks (init_from)

FORKABLE = {
    "name": "source",
    "dataset": {"name": "synthetic_classification", "num_features": 8, "num_classes": 3},
    "model": {"architecture": "mlp", "hidden_units": [16], "dropout": 0.1},
    "optimizer": {"name": "adam", "learning_rate": 0.01},
    "training": {"steps": 300, "checkpoint_every": 100},
}


def forked(**changes) -> dict:
    """FORKABLE as a fork of job-3f2a0c, with `changes` to its top-level sections."""
    spec = json.loads(json.dumps(FORKABLE))
    for section, value in changes.items():
        before = spec.get(section)
        spec[section] = {**before, **value} if isinstance(value, dict) and before else value
    return {**spec, "init_from": {"job": "job-3f2a0c"}}


def test_init_from_names_a_job_and_labels_the_fork_with_it():
    spec = JobSpec.parse(
        {
            **FORKABLE,
            "labels": {"team": "a", "forked_from": "old"},
            "init_from": {"job": "jobs/job-3f2a0c"},
        }
    )
    assert spec.init_from is not None
    assert (spec.init_from.job, spec.init_from.step) == ("job-3f2a0c", "latest")
    assert spec.labels == {"team": "a", "forked_from": "job-3f2a0c"}
    again = JobSpec.parse(json.loads(json.dumps(spec.to_dict())))
    assert again.to_dict() == spec.to_dict()
    assert again.to_dict()["init_from"] == {"job": "job-3f2a0c", "step": "latest"}
    assert (
        JobSpec.parse(
            {**FORKABLE, "init_from": {"job": "job-3f2a0c", "step": 200.0}}
        ).init_from.step
        == 200
    )
    assert "init_from" not in JobSpec.parse(FORKABLE).to_dict()
    assert "forked_from" not in JobSpec.parse(FORKABLE).labels


@pytest.mark.parametrize(
    ("init_from", "training", "field", "phrase"),
    [
        ({"job": "seed-mlp"}, {}, "init_from.job", "'seed-mlp' is no job id"),
        ({"job": "job-XYZ"}, {}, "init_from.job", "is no job id"),
        ({"job": 42}, {}, "init_from.job", "is no job id"),
        ({}, {}, "init_from.job", "Field required"),
        ({"job": "job-3f2a", "step": 0}, {}, "init_from.step", "greater than 0, or 'latest'"),
        ({"job": "job-3f2a", "step": "newest"}, {}, "init_from.step", "got 'newest'"),
        ({"job": "job-3f2a", "step": True}, {}, "init_from.step", "greater than 0"),
        ({"job": "job-3f2a", "when": 3}, {}, "init_from.when", "unknown field"),
        (
            {"job": "job-3f2a", "step": 300},
            {"steps": 300},
            "training.steps",
            "300 is not past init_from.step (300)",
        ),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_a_bad_init_from_is_refused_naming_the_field(init_from, training, field, phrase):
    spec = {**FORKABLE, "init_from": init_from, "training": {**FORKABLE["training"], **training}}
    with pytest.raises(SpecError) as caught:
        JobSpec.parse(spec)
    problems = {p.field: p.message for p in caught.value.problems}
    assert field in problems, problems
    assert phrase in problems[field], problems[field]


def test_a_fork_with_every_label_taken_has_no_room_for_its_link():
    labels = {f"k{i}": "v" for i in range(64)}
    JobSpec.parse({**FORKABLE, "labels": labels})
    with pytest.raises(
        SpecError, match=r"labels: at most 64, and a fork adds the label forked_from"
    ):
        JobSpec.parse({**FORKABLE, "labels": labels, "init_from": {"job": "job-3f2a"}})
    relinked = {**labels, "forked_from": "x"}
    del relinked["k0"]
    assert JobSpec.parse({**FORKABLE, "labels": relinked, "init_from": {"job": "job-3f2a"}})


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer": {"learning_rate": 1e-4, "beta_1": 0.8, "clipnorm": 1.0}},
        {"optimizer": {"learning_rate": None}},
        {"model": {"dropout": 0.5, "activation": "tanh", "output_activation": "softmax"}},
        {"training": {"steps": 5000, "batch_size": 64, "seed": 3}},
        {"loss": "categorical_crossentropy", "metrics": ["accuracy", "auc"]},
        {"dataset": {"num_samples": 5000, "noise": 0.5}},
        {"runtime": {"precision": "mixed_bfloat16", "steps_per_execution": 4}},
    ],
    ids=lambda c: ",".join(c),
)
def test_what_a_fork_may_change(changes):
    from stepstream.kernel.spec import fork_conflicts

    source = JobSpec.parse(FORKABLE)
    assert fork_conflicts(source, JobSpec.parse(forked(**changes)), "job-3f2a0c") == []


@pytest.mark.parametrize(
    ("changes", "field", "phrase"),
    [
        ({"model": {"hidden_units": [32]}}, "model.hidden_units.0", "32 here, 16 in job-3f2a0c"),
        ({"model": {"hidden_units": [16, 16]}}, "model.hidden_units", "[16, 16] here, [16]"),
        ({"model": {"batch_normalization": True}}, "model.batch_normalization", "True here"),
        ({"model": "linear"}, "model.architecture", "linear here, mlp in job-3f2a0c"),
        ({"optimizer": {"name": "sgd"}}, "optimizer.name", "sgd here, adam in job-3f2a0c"),
        ({"optimizer": {"amsgrad": True}}, "optimizer.amsgrad", "on here, off in job-3f2a0c"),
        (
            {"optimizer": {"schedule": {"name": "cosine_decay", "decay_steps": 100}}},
            "optimizer.schedule",
            "a schedule here, a constant learning rate in job-3f2a0c",
        ),
        ({"runtime": {"precision": "mixed_float16"}}, "runtime.precision", "loss-scaling"),
        ({"dataset": {"num_features": 9}}, "dataset.num_features", "9 here, 8 in job-3f2a0c"),
        ({"dataset": {"num_classes": 4}}, "dataset.num_classes", "decides the model's shapes"),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v and " " not in v else None,
)
def test_what_a_fork_cannot_change_is_named(changes, field, phrase):
    from stepstream.kernel.spec import fork_conflicts

    problems = fork_conflicts(
        JobSpec.parse(FORKABLE), JobSpec.parse(forked(**changes)), "job-3f2a0c"
    )
    assert [p.field for p in problems] == [field], problems
    assert phrase in problems[0].message, problems[0].message


def test_another_optimizer_is_one_problem_and_a_schedule_is_kept_with_new_values():
    from stepstream.kernel.spec import fork_conflicts

    scheduled = {"name": "adam", "schedule": {"name": "cosine_decay", "decay_steps": 100}}
    source = JobSpec.parse({**FORKABLE, "optimizer": scheduled})
    momentum = JobSpec.parse(
        forked(optimizer={"name": "momentum", "schedule": scheduled["schedule"]})
    )
    assert [p.field for p in fork_conflicts(source, momentum)] == ["optimizer.name"]
    longer = {**scheduled, "schedule": {"name": "cosine_decay", "decay_steps": 900}}
    assert fork_conflicts(source, JobSpec.parse(forked(optimizer=longer))) == []
