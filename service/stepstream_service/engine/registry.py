"""Names to Keras objects: activations, losses, optimizers, schedules, layers, metrics.

Each kind is one `Registry`; `get(kind, name)` resolves any of them, aliases included, and an
unknown name raises an error listing the valid ones (the client's `names` module is the
vocabulary, and a test proves these registries hold exactly its names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import keras
from keras import ops

from stepstream.kernel import names
from stepstream.kernel.spec import LayerSpec, LossSpec, OptimizerSpec, ScheduleSpec
from stepstream_service.engine.layers import PositionEmbedding

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entries: dict[str, T]):
        self.kind = kind
        self._entries = entries

    def get(self, name: str) -> T:
        return self._entries[names.canonical(self.kind, name)]

    def names(self) -> set[str]:
        return set(self._entries)


# ---------------------------------------------------------------- activations

ACTIVATIONS: Registry[Callable] = Registry(
    "activation", {name: keras.activations.get(name) for name in names.ACTIVATIONS}
)

# ---------------------------------------------------------------- losses


@keras.saving.register_keras_serializable(package="trainer")
class WeightedCrossEntropyWithLogits(keras.losses.Loss):
    """tf.nn.weighted_cross_entropy_with_logits in keras.ops, so it runs on every backend.

    loss = (1 - z) * x + (1 + (q - 1) * z) * log(1 + exp(-x)), written in the overflow-safe form.
    """

    def __init__(self, pos_weight: float = 1.0, name: str = "weighted_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = float(pos_weight)

    def call(self, y_true, y_pred):
        z = ops.cast(y_true, y_pred.dtype)
        x = y_pred
        log_weight = 1.0 + (self.pos_weight - 1.0) * z
        softplus_neg = ops.log1p(ops.exp(-ops.abs(x))) + ops.maximum(-x, 0.0)
        return ops.mean((1.0 - z) * x + log_weight * softplus_neg, axis=-1)

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight}


def _options(spec: Any, *keys: str) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in keys if getattr(spec, k, None) is not None}


def _ce(cls: type) -> Callable[[LossSpec], keras.losses.Loss]:
    return lambda s: cls(**_options(s, "from_logits", "label_smoothing"))


def _plain(cls: type) -> Callable[[LossSpec], keras.losses.Loss]:
    return lambda s: cls()


L = keras.losses
LOSSES: Registry[Callable[[LossSpec], keras.losses.Loss]] = Registry(
    "loss",
    {
        "binary_crossentropy": _ce(L.BinaryCrossentropy),
        "binary_focal_crossentropy": lambda s: L.BinaryFocalCrossentropy(
            apply_class_balancing=s.alpha is not None,
            **_options(s, "from_logits", "label_smoothing", "alpha", "gamma"),
        ),
        "categorical_crossentropy": _ce(L.CategoricalCrossentropy),
        "categorical_hinge": _plain(L.CategoricalHinge),
        "cosine_similarity": _plain(L.CosineSimilarity),
        "hinge": _plain(L.Hinge),
        "huber": lambda s: L.Huber(**_options(s, "delta")),
        "kl_divergence": _plain(L.KLDivergence),
        "log_cosh": _plain(L.LogCosh),
        "mean_absolute_error": _plain(L.MeanAbsoluteError),
        "mean_absolute_percentage_error": _plain(L.MeanAbsolutePercentageError),
        "mean_squared_error": _plain(L.MeanSquaredError),
        "mean_squared_logarithmic_error": _plain(L.MeanSquaredLogarithmicError),
        "poisson": _plain(L.Poisson),
        "sigmoid_cross_entropy_with_logits": lambda s: L.BinaryCrossentropy(from_logits=True),
        "softmax_cross_entropy_with_logits": lambda s: L.CategoricalCrossentropy(from_logits=True),
        "sparse_categorical_crossentropy": lambda s: L.SparseCategoricalCrossentropy(
            **_options(s, "from_logits")
        ),
        "sparse_softmax_cross_entropy_with_logits": lambda s: L.SparseCategoricalCrossentropy(
            from_logits=True
        ),
        "squared_hinge": _plain(L.SquaredHinge),
        "weighted_cross_entropy_with_logits": lambda s: WeightedCrossEntropyWithLogits(
            pos_weight=s.pos_weight or 1.0
        ),
    },
)

# ---------------------------------------------------------------- schedules and optimizers

S = keras.optimizers.schedules
SCHEDULES: Registry[Callable[[ScheduleSpec, float], Any]] = Registry(
    "schedule",
    {
        "cosine_decay": lambda s, lr: S.CosineDecay(
            lr, s.decay_steps, **_options(s, "alpha", "warmup_steps", "warmup_target")
        ),
        "cosine_decay_restarts": lambda s, lr: S.CosineDecayRestarts(
            lr, s.decay_steps, **_options(s, "alpha", "t_mul", "m_mul")
        ),
        "exponential_decay": lambda s, lr: S.ExponentialDecay(
            lr, s.decay_steps, s.decay_rate, **_options(s, "staircase")
        ),
        "inverse_time_decay": lambda s, lr: S.InverseTimeDecay(
            lr, s.decay_steps, s.decay_rate, **_options(s, "staircase")
        ),
        "piecewise_constant_decay": lambda s, lr: S.PiecewiseConstantDecay(s.boundaries, s.values),
        "polynomial_decay": lambda s, lr: S.PolynomialDecay(
            lr, s.decay_steps, **_options(s, "end_learning_rate", "power", "cycle")
        ),
    },
)

OPT = keras.optimizers
_OPTIMIZER_CLASSES: dict[str, type] = {
    "adadelta": OPT.Adadelta,
    "adagrad": OPT.Adagrad,
    "adam": OPT.Adam,
    "adamax": OPT.Adamax,
    "adamw": OPT.AdamW,
    "ftrl": OPT.Ftrl,
    "lion": OPT.Lion,
    "momentum": OPT.SGD,
    "nadam": OPT.Nadam,
    "rmsprop": OPT.RMSprop,
    "sgd": OPT.SGD,
}


def learning_rate(spec: OptimizerSpec) -> Any:
    """A float, or a schedule object that maps a step to a learning rate."""
    lr = spec.initial_learning_rate
    if spec.schedule is None:
        return lr
    return SCHEDULES.get(spec.schedule.name)(spec.schedule, lr)


def _optimizer(name: str) -> Callable[[OptimizerSpec], keras.optimizers.Optimizer]:
    def build(spec: OptimizerSpec) -> keras.optimizers.Optimizer:
        kwargs = _options(spec, *sorted(names.OPTIMIZERS[name]))
        if name == "momentum":
            kwargs.setdefault("momentum", 0.9)
        return _OPTIMIZER_CLASSES[name](learning_rate=learning_rate(spec), **kwargs)

    return build


OPTIMIZERS: Registry[Callable[[OptimizerSpec], keras.optimizers.Optimizer]] = Registry(
    "optimizer", {name: _optimizer(name) for name in names.OPTIMIZERS}
)

# ---------------------------------------------------------------- layers


@dataclass(frozen=True)
class LayerContext:
    """What a layer needs to know beyond its own spec."""

    default_activation: str
    vocab_size: int | None
    seed: int
    return_sequences: bool


LK = keras.layers
Tensor = Any
# A layer's builder makes what turns its inputs (one tensor each, in the order the spec lists
# them) into its output: a Keras layer called on them, or a few chained.
Apply = Callable[[list[Tensor]], Tensor]


def _one(make: Callable[[LayerSpec, LayerContext], keras.layers.Layer]):
    """A layer of one input."""

    def build(s: LayerSpec, ctx: LayerContext) -> Apply:
        layer = make(s, ctx)
        return lambda xs: layer(xs[0])

    return build


def _merge(cls: type, **kwargs: Any):
    def build(s: LayerSpec, ctx: LayerContext) -> Apply:
        layer = cls(**kwargs, **_options(s, "axis"))
        return lambda xs: layer(list(xs))

    return build


def _conv(cls: type, depth: bool = False):
    def make(s: LayerSpec, c: LayerContext) -> keras.layers.Layer:
        extra = _options(s, "depth_multiplier")
        if not depth:
            extra["filters"] = s.filters
        return cls(
            kernel_size=s.kernel_size or 3,
            strides=s.strides or 1,
            padding=s.padding or "valid",
            activation=s.activation or c.default_activation,
            **extra,
        )

    return _one(make)


def _pool(cls: type):
    return _one(lambda s, c: cls(s.pool_size or 2, strides=s.strides, padding=s.padding or "valid"))


def _rnn_layer(cell: str, s: LayerSpec, ctx: LayerContext) -> keras.layers.Layer:
    rs = ctx.return_sequences if s.return_sequences is None else s.return_sequences
    return _RNN_CLASSES[cell](
        s.units, return_sequences=rs, **_options(s, "activation"), seed=ctx.seed
    )


_RNN_CLASSES = {"gru": LK.GRU, "lstm": LK.LSTM, "simple_rnn": LK.SimpleRNN}


def _rnn(cell: str):
    return _one(lambda s, c: _rnn_layer(cell, s, c))


def _embedding(s: LayerSpec, ctx: LayerContext) -> Apply:
    embed = LK.Embedding(ctx.vocab_size or 2, s.output_dim or 32)
    if not s.positional:
        return lambda xs: embed(xs[0])
    positions = PositionEmbedding()
    return lambda xs: positions(embed(xs[0]))


def _attention(s: LayerSpec, ctx: LayerContext) -> Apply:
    layer = LK.MultiHeadAttention(s.num_heads, s.key_dim, dropout=s.dropout or 0.0, seed=ctx.seed)

    def apply(xs: list[Tensor]) -> Tensor:
        query, value, key = xs[0], xs[1] if len(xs) > 1 else xs[0], xs[2] if len(xs) > 2 else None
        return layer(query, value, key)

    return apply


def _random_crop(s: LayerSpec, ctx: LayerContext) -> Apply:
    # Keras's RandomCrop passes whole images through outside training (its documentation
    # says it crops them), which would change the model's shape there; the centre crop after
    # it is that crop, and a no-op on the images RandomCrop has cut already.
    crop = LK.RandomCrop(s.height, s.width, seed=ctx.seed)
    centre = LK.CenterCrop(s.height, s.width)
    return lambda xs: centre(crop(xs[0]))


LAYERS: Registry[Callable[[LayerSpec, LayerContext], Apply]] = Registry(
    "layer",
    {
        "activation": _one(lambda s, c: LK.Activation(ACTIVATIONS.get(s.activation))),
        "add": _merge(LK.Add),
        "average_pool1d": _pool(LK.AveragePooling1D),
        "average_pool2d": _pool(LK.AveragePooling2D),
        "batch_normalization": _one(
            lambda s, c: LK.BatchNormalization(**_options(s, "momentum", "epsilon"))
        ),
        "bidirectional": _one(
            lambda s, c: LK.Bidirectional(
                _rnn_layer(s.cell or "lstm", s, c), merge_mode=s.merge_mode or "concat"
            )
        ),
        "concatenate": _merge(LK.Concatenate),
        "conv1d": _conv(LK.Conv1D),
        "conv2d": _conv(LK.Conv2D),
        "conv2d_transpose": _conv(LK.Conv2DTranspose),
        "dense": _one(
            lambda s, c: LK.Dense(s.units, activation=s.activation or c.default_activation)
        ),
        "depthwise_conv1d": _conv(LK.DepthwiseConv1D, depth=True),
        "depthwise_conv2d": _conv(LK.DepthwiseConv2D, depth=True),
        "dropout": _one(lambda s, c: LK.Dropout(s.rate, seed=c.seed)),
        "embedding": _embedding,
        "flatten": _one(lambda s, c: LK.Flatten()),
        "global_average_pool1d": _one(lambda s, c: LK.GlobalAveragePooling1D()),
        "global_average_pool2d": _one(lambda s, c: LK.GlobalAveragePooling2D()),
        "global_max_pool1d": _one(lambda s, c: LK.GlobalMaxPooling1D()),
        "global_max_pool2d": _one(lambda s, c: LK.GlobalMaxPooling2D()),
        "group_normalization": _one(
            lambda s, c: LK.GroupNormalization(**_options(s, "groups", "epsilon"))
        ),
        "gru": _rnn("gru"),
        "layer_normalization": _one(lambda s, c: LK.LayerNormalization(**_options(s, "epsilon"))),
        "lstm": _rnn("lstm"),
        "max_pool1d": _pool(LK.MaxPooling1D),
        "max_pool2d": _pool(LK.MaxPooling2D),
        "multi_head_attention": _attention,
        "multiply": _merge(LK.Multiply),
        "position_embedding": _one(lambda s, c: PositionEmbedding()),
        # The random_* layers change examples only while training (Keras passes training=True
        # in fit alone), so evaluation and prediction see the data as it is.
        "random_contrast": _one(lambda s, c: LK.RandomContrast(s.factor, seed=c.seed)),
        "random_crop": _random_crop,
        "random_flip": _one(
            lambda s, c: LK.RandomFlip(s.mode or "horizontal_and_vertical", seed=c.seed)
        ),
        "random_rotation": _one(lambda s, c: LK.RandomRotation(s.factor, seed=c.seed)),
        "random_zoom": _one(lambda s, c: LK.RandomZoom(s.factor, seed=c.seed)),
        "rescaling": _one(lambda s, c: LK.Rescaling(s.scale, offset=s.offset or 0.0)),
        "reshape": _one(lambda s, c: LK.Reshape(tuple(s.target_shape or ()))),
        "separable_conv1d": _conv(LK.SeparableConv1D),
        "separable_conv2d": _conv(LK.SeparableConv2D),
        "simple_rnn": _rnn("simple_rnn"),
        "upsampling1d": _one(lambda s, c: LK.UpSampling1D(s.size or 2)),
        "upsampling2d": _one(
            lambda s, c: LK.UpSampling2D(s.size or 2, interpolation=s.interpolation or "nearest")
        ),
    },
)


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Labels:
    """How labels and outputs look, which decides the Keras class behind a metric name."""

    format: str  # sparse | one_hot | binary | dense
    units: int
    logits: bool
    threshold: float


def _accuracy(lab: Labels) -> keras.metrics.Metric:
    if lab.format == "sparse":
        return keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    if lab.units == 1:
        return keras.metrics.BinaryAccuracy(name="accuracy", threshold=lab.threshold)
    return keras.metrics.CategoricalAccuracy(name="accuracy")


M = keras.metrics
METRICS: Registry[Callable[[Labels], keras.metrics.Metric]] = Registry(
    "metric",
    {
        "accuracy": _accuracy,
        "auc": lambda lab: M.AUC(name="auc", from_logits=lab.logits),
        "binary_accuracy": lambda lab: M.BinaryAccuracy(
            name="binary_accuracy", threshold=lab.threshold
        ),
        "categorical_accuracy": lambda lab: M.CategoricalAccuracy(name="categorical_accuracy"),
        "cosine_similarity": lambda lab: M.CosineSimilarity(name="cosine_similarity"),
        "log_cosh_error": lambda lab: M.LogCoshError(name="log_cosh_error"),
        "mean_absolute_error": lambda lab: M.MeanAbsoluteError(name="mean_absolute_error"),
        "mean_absolute_percentage_error": lambda lab: M.MeanAbsolutePercentageError(
            name="mean_absolute_percentage_error"
        ),
        "mean_squared_error": lambda lab: M.MeanSquaredError(name="mean_squared_error"),
        "mean_squared_logarithmic_error": lambda lab: M.MeanSquaredLogarithmicError(
            name="mean_squared_logarithmic_error"
        ),
        "precision": lambda lab: M.Precision(name="precision", thresholds=lab.threshold),
        "r2_score": lambda lab: M.R2Score(name="r2_score"),
        "recall": lambda lab: M.Recall(name="recall", thresholds=lab.threshold),
        "root_mean_squared_error": lambda lab: M.RootMeanSquaredError(
            name="root_mean_squared_error"
        ),
        "sparse_categorical_accuracy": lambda lab: M.SparseCategoricalAccuracy(
            name="sparse_categorical_accuracy"
        ),
        "sparse_top_k_categorical_accuracy": lambda lab: M.SparseTopKCategoricalAccuracy(
            name="sparse_top_k_categorical_accuracy", k=min(5, max(lab.units - 1, 1))
        ),
        "top_k_categorical_accuracy": lambda lab: M.TopKCategoricalAccuracy(
            name="top_k_categorical_accuracy", k=min(5, max(lab.units - 1, 1))
        ),
    },
)
