"""Every name a job spec may use, and what each name accepts.

This is the client's copy of the vocabulary: the spec validates against it without importing
TensorFlow, and a test proves the service's registries hold exactly the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("backbone", "cnn", "keras", "layers", "linear", "mlp", "rnn")


@dataclass(frozen=True)
class BackboneInfo:
    """A keras.applications model without its top: the smallest input side it takes, and the
    channels of its last feature map (what the head reads after pooling)."""

    min_size: int
    features: int


BACKBONES: dict[str, BackboneInfo] = {
    "efficientnet_b0": BackboneInfo(32, 1280),
    "mobilenet_v2": BackboneInfo(32, 1280),
    "resnet50": BackboneInfo(32, 2048),
}
# keras.applications' own spellings (MobileNetV2, EfficientNetB0), lower-cased.
BACKBONE_ALIASES = {"efficientnetb0": "efficientnet_b0", "mobilenetv2": "mobilenet_v2"}

ACTIVATIONS = (
    "elu",
    "exponential",
    "gelu",
    "hard_sigmoid",
    "leaky_relu",
    "linear",
    "mish",
    "relu",
    "relu6",
    "selu",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "tanh",
)
ACTIVATION_ALIASES = {"swish": "silu"}


@dataclass(frozen=True)
class LossInfo:
    """What a loss needs from the data and which options it takes.

    labels: "sparse" (integer class ids), "one_hot" (one column per class), "binary" (0/1 per
    output unit: one unit for two classes, else one per class), "dense" (the regression target,
    or one-hot rows when the data are classes).
    """

    labels: str
    options: frozenset[str] = frozenset()
    logits_only: bool = False


_CE = frozenset({"from_logits", "label_smoothing"})
LOSSES: dict[str, LossInfo] = {
    "binary_crossentropy": LossInfo("binary", _CE),
    "binary_focal_crossentropy": LossInfo("binary", _CE | {"alpha", "gamma"}),
    "categorical_crossentropy": LossInfo("one_hot", _CE),
    "categorical_hinge": LossInfo("one_hot"),
    "cosine_similarity": LossInfo("dense"),
    "hinge": LossInfo("binary"),
    "huber": LossInfo("dense", frozenset({"delta"})),
    "kl_divergence": LossInfo("one_hot"),
    "log_cosh": LossInfo("dense"),
    "mean_absolute_error": LossInfo("dense"),
    "mean_absolute_percentage_error": LossInfo("dense"),
    "mean_squared_error": LossInfo("dense"),
    "mean_squared_logarithmic_error": LossInfo("dense"),
    "poisson": LossInfo("dense"),
    "sigmoid_cross_entropy_with_logits": LossInfo("binary", logits_only=True),
    "softmax_cross_entropy_with_logits": LossInfo("one_hot", logits_only=True),
    "sparse_categorical_crossentropy": LossInfo("sparse", frozenset({"from_logits"})),
    "sparse_softmax_cross_entropy_with_logits": LossInfo("sparse", logits_only=True),
    "squared_hinge": LossInfo("binary"),
    "weighted_cross_entropy_with_logits": LossInfo(
        "binary", frozenset({"pos_weight"}), logits_only=True
    ),
}
LOSS_ALIASES = {
    "cosine": "cosine_similarity",
    "cosine_proximity": "cosine_similarity",
    "huber_loss": "huber",
    "kld": "kl_divergence",
    "kullback_leibler_divergence": "kl_divergence",
    "logcosh": "log_cosh",
    "mae": "mean_absolute_error",
    "mape": "mean_absolute_percentage_error",
    "mse": "mean_squared_error",
    "msle": "mean_squared_logarithmic_error",
}

_CLIP = frozenset({"clipnorm", "clipvalue", "global_clipnorm", "weight_decay"})
OPTIMIZERS: dict[str, frozenset[str]] = {
    "adadelta": _CLIP | {"rho", "epsilon"},
    "adagrad": _CLIP | {"initial_accumulator_value", "epsilon"},
    "adam": _CLIP | {"beta_1", "beta_2", "epsilon", "amsgrad"},
    "adamax": _CLIP | {"beta_1", "beta_2", "epsilon"},
    "adamw": _CLIP | {"beta_1", "beta_2", "epsilon", "amsgrad"},
    "ftrl": _CLIP
    | {
        "initial_accumulator_value",
        "learning_rate_power",
        "l1_regularization_strength",
        "l2_regularization_strength",
    },
    "lion": _CLIP | {"beta_1", "beta_2"},
    "momentum": _CLIP | {"momentum", "nesterov"},
    "nadam": _CLIP | {"beta_1", "beta_2", "epsilon"},
    "rmsprop": _CLIP | {"rho", "momentum", "epsilon", "centered"},
    "sgd": _CLIP | {"momentum", "nesterov"},
}
OPTIMIZER_ALIASES = {"gradient_descent": "sgd"}

SCHEDULES: dict[str, frozenset[str]] = {
    "cosine_decay": frozenset({"decay_steps", "alpha", "warmup_steps", "warmup_target"}),
    "cosine_decay_restarts": frozenset({"decay_steps", "alpha", "t_mul", "m_mul"}),
    "exponential_decay": frozenset({"decay_steps", "decay_rate", "staircase"}),
    "inverse_time_decay": frozenset({"decay_steps", "decay_rate", "staircase"}),
    "piecewise_constant_decay": frozenset({"boundaries", "values"}),
    "polynomial_decay": frozenset({"decay_steps", "end_learning_rate", "power", "cycle"}),
}

LAYERS = (
    "activation",
    "add",
    "average_pool1d",
    "average_pool2d",
    "batch_normalization",
    "bidirectional",
    "concatenate",
    "conv1d",
    "conv2d",
    "conv2d_transpose",
    "dense",
    "depthwise_conv1d",
    "depthwise_conv2d",
    "dropout",
    "embedding",
    "flatten",
    "global_average_pool1d",
    "global_average_pool2d",
    "global_max_pool1d",
    "global_max_pool2d",
    "group_normalization",
    "gru",
    "layer_normalization",
    "lstm",
    "max_pool1d",
    "max_pool2d",
    "multi_head_attention",
    "multiply",
    "position_embedding",
    "random_contrast",
    "random_crop",
    "random_flip",
    "random_rotation",
    "random_zoom",
    "rescaling",
    "reshape",
    "separable_conv1d",
    "separable_conv2d",
    "simple_rnn",
    "upsampling1d",
    "upsampling2d",
)
# Keras's own spellings of the pooling and upsampling layers (MaxPooling2D, GlobalAvgPool1D...).
LAYER_ALIASES = {
    **{f"{k}_pooling{d}d": f"{k}_pool{d}d" for k in ("max", "average") for d in (1, 2)},
    **{f"avg_pool{d}d": f"average_pool{d}d" for d in (1, 2)},
    **{
        f"global_{k}_pooling{d}d": f"global_{k}_pool{d}d"
        for k in ("max", "average")
        for d in (1, 2)
    },
    **{f"global_avg_pool{d}d": f"global_average_pool{d}d" for d in (1, 2)},
    **{f"up_sampling{d}d": f"upsampling{d}d" for d in (1, 2)},
}
RNN_CELLS = ("gru", "lstm", "simple_rnn")
# Layers that merge two or more inputs into one.
MERGE_LAYERS = ("add", "concatenate", "multiply")

# Metrics reported at evaluation time. "classification" ones need class labels; "regression"
# ones compare values and so need dense (one-hot or real-valued) labels.
METRICS: dict[str, str] = {
    "accuracy": "classification",
    "auc": "classification_dense",
    "binary_accuracy": "classification_dense",
    "categorical_accuracy": "classification_dense",
    "cosine_similarity": "regression",
    "log_cosh_error": "regression",
    "mean_absolute_error": "regression",
    "mean_absolute_percentage_error": "regression",
    "mean_squared_error": "regression",
    "mean_squared_logarithmic_error": "regression",
    "precision": "classification_dense",
    "r2_score": "regression",
    "recall": "classification_dense",
    "root_mean_squared_error": "regression",
    "sparse_categorical_accuracy": "classification_sparse",
    "sparse_top_k_categorical_accuracy": "classification_sparse",
    "top_k_categorical_accuracy": "classification_dense",
}
METRIC_ALIASES = {
    "acc": "accuracy",
    "cosine": "cosine_similarity",
    "cosine_proximity": "cosine_similarity",
    "mae": "mean_absolute_error",
    "mape": "mean_absolute_percentage_error",
    "mse": "mean_squared_error",
    "msle": "mean_squared_logarithmic_error",
    "rmse": "root_mean_squared_error",
}


@dataclass(frozen=True)
class DatasetInfo:
    """kind: "image", "tabular" or "sequence"; task: "classification", "regression" or None
    when only the data can tell (an .npz file)."""

    kind: str | None
    task: str | None
    options: frozenset[str] = frozenset()


_SYNTH = frozenset({"num_samples", "noise"})
# Datasets read from files, streamed batch by batch when they would not fit in memory.
_FILES = frozenset(
    {"path", "validation_path", "test_path", "num_classes", "shuffle_buffer", "stream"}
)
_TABLE = _FILES | {"features", "label", "categorical"}
STREAMED = frozenset({"csv", "parquet", "tfrecord", "image_folder"})
FILE_DATASETS = STREAMED | {"npz"}
DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo("image", "classification"),
    "linear": DatasetInfo("tabular", "regression", frozenset({"num_samples", "noise"})),
    "mnist": DatasetInfo("image", "classification"),
    "npz": DatasetInfo(None, None, frozenset({"path"})),
    "csv": DatasetInfo("tabular", None, _TABLE),
    "parquet": DatasetInfo("tabular", None, _TABLE),
    "tfrecord": DatasetInfo("tabular", None, _FILES | {"feature_spec", "features", "label"}),
    "image_folder": DatasetInfo("image", "classification", _FILES | {"image_size", "channels"}),
    "synthetic_classification": DatasetInfo(
        "tabular", "classification", _SYNTH | {"num_features", "num_classes"}
    ),
    "synthetic_images": DatasetInfo(
        "image", "classification", _SYNTH | {"image_size", "channels", "num_classes"}
    ),
    "synthetic_regression": DatasetInfo("tabular", "regression", _SYNTH | {"num_features"}),
    "synthetic_sequence": DatasetInfo(
        "sequence",
        "classification",
        _SYNTH | {"sequence_length", "vocab_size", "num_classes", "num_features"},
    ),
}

DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")

CANONICAL: dict[str, tuple[str, ...]] = {
    "activation": ACTIVATIONS,
    "architecture": ARCHITECTURES,
    "backbone": tuple(sorted(BACKBONES)),
    "dataset": tuple(sorted(DATASETS)),
    "layer": LAYERS,
    "loss": tuple(sorted(LOSSES)),
    "metric": tuple(sorted(METRICS)),
    "optimizer": tuple(sorted(OPTIMIZERS)),
    "schedule": tuple(sorted(SCHEDULES)),
}
ALIASES: dict[str, dict[str, str]] = {
    "activation": ACTIVATION_ALIASES,
    "backbone": BACKBONE_ALIASES,
    "layer": LAYER_ALIASES,
    "loss": LOSS_ALIASES,
    "metric": METRIC_ALIASES,
    "optimizer": OPTIMIZER_ALIASES,
}


class UnknownNameError(ValueError):
    """A name that is in no registry; the message lists the valid ones."""


def valid_names(kind: str) -> list[str]:
    """Every accepted spelling of a `kind` name, canonical names and aliases, sorted."""
    return sorted({*CANONICAL[kind], *ALIASES.get(kind, {})})


def canonical(kind: str, name: str) -> str:
    """Resolve `name` (any case, '-' or '_') to its canonical form or raise UnknownNameError."""
    if kind not in CANONICAL:
        raise UnknownNameError(
            f"unknown kind {kind!r}; valid kinds: {', '.join(sorted(CANONICAL))}"
        )
    key = str(name).strip().lower().replace("-", "_")
    key = ALIASES.get(kind, {}).get(key, key)
    if key in CANONICAL[kind]:
        return key
    shown = (
        repr(name)
        if len(str(name)) <= 64
        else f"{str(name)[:64]!r}... ({len(str(name))} characters)"
    )
    raise UnknownNameError(
        f"unknown {kind} {shown}; valid {kind} names: {', '.join(valid_names(kind))}"
    )
