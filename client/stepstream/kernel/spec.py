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
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stepstream.kernel import names

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
LAYER_OPTIONS: dict[str, frozenset[str]] = {
    "batch_normalization": frozenset({"momentum", "epsilon"}),
    "conv2d": frozenset({"filters", "kernel_size", "strides", "padding", "activation"}),
    "dense": frozenset({"units", "activation"}),
    "dropout": frozenset({"rate"}),
    "embedding": frozenset({"output_dim"}),
    "flatten": frozenset(),
    "gru": frozenset({"units", "activation", "return_sequences"}),
    "lstm": frozenset({"units", "activation", "return_sequences"}),
    "max_pool2d": frozenset({"pool_size", "strides", "padding"}),
    "simple_rnn": frozenset({"units", "activation", "return_sequences"}),
}
_LAYER_REQUIRED = {
    "conv2d": ("filters",),
    "dense": ("units",),
    "dropout": ("rate",),
    "gru": ("units",),
    "lstm": ("units",),
    "simple_rnn": ("units",),
}


class LayerSpec(_Spec):
    type: str
    units: PositiveInt | None = None
    filters: PositiveInt | None = None
    kernel_size: PositiveInt | None = None
    strides: PositiveInt | None = None
    pool_size: PositiveInt | None = None
    padding: Literal["valid", "same"] | None = None
    activation: str | None = None
    rate: Fraction | None = None
    output_dim: PositiveInt | None = None
    return_sequences: bool | None = None
    momentum: Fraction | None = None
    epsilon: Annotated[float, Field(gt=0)] | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, v: Any) -> str:
        return _name("layer", v)

    @field_validator("activation", mode="before")
    @classmethod
    def _activation(cls, v: Any) -> Any:
        return None if v is None else _name("activation", v)

    @model_validator(mode="after")
    def _options(self) -> LayerSpec:
        _only_options(self, LAYER_OPTIONS[self.type] | {"type"}, f"layer {self.type}")
        for required in _LAYER_REQUIRED.get(self.type, ()):
            if getattr(self, required) is None:
                raise _conflict(required, f"layer {self.type} needs {required}")
        return self


class LayersModel(_Head):
    """An explicit stack of hidden layers; the output layer is added to fit the data and loss."""

    architecture: Literal["layers"] = "layers"
    layers: list[LayerSpec] = Field(min_length=1)
    activation: str = Field("relu", description="For dense/conv layers that name none.")

    @field_validator("activation", mode="before")
    @classmethod
    def _default_activation(cls, v: Any) -> str:
        return _name("activation", v)


ModelSpec = Annotated[
    LinearModel | MLPModel | CNNModel | RNNModel | LayersModel,
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


class DatasetSpec(_Spec):
    name: str = "fashion_mnist"
    path: str | None = Field(
        None, description="The .npz file for dataset npz.", max_length=MAX_PATH_CHARS
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

    @model_validator(mode="after")
    def _options(self) -> DatasetSpec:
        common = {"validation_split", "evaluate_on_test", "normalize", "flatten", "one_hot"}
        if self.name == "npz":
            common.add("task")
        _only_options(self, self.info.options | common, f"dataset {self.name}")
        if self.name == "npz" and not self.path:
            raise _conflict("path", "dataset npz needs path: the .npz file to load")
        if self.path is not None and not self.path.isprintable():
            raise _conflict("path", "no control characters (NUL, newline, ...) in a path")
        return self

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

_OUTPUT_ACTIVATION = {"sparse": "softmax", "one_hot": "softmax", "binary": "sigmoid"}
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Labels are kept with the job and sent with every answer about it, so their count and sizes
# are bounded here, where both client and server check them (as Kubernetes bounds its own).
_LABEL_KEY = _JOB_NAME


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
    model: ModelSpec = Field(default_factory=MLPModel)
    loss: LossSpec | None = Field(None, description="The dataset's natural loss when unset.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    metrics: list[str] | None = Field(None, description="accuracy, or mae for regression.")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)

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
        for name in ("units", "filters", "output_dim"):
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

    image_layers = {"conv2d", "max_pool2d"}
    rnn_layers = set(names.RNN_CELLS)
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
        flat = False
        for i, layer in enumerate(model.layers):
            where = f"model.layers.{i}.type"
            if layer.type in image_layers and (kind not in ("image", None) or flat):
                yield where, f"{layer.type} needs image-shaped input (height, width, channels)"
            if layer.type in rnn_layers and kind == "tabular":
                yield where, f"{layer.type} needs sequence input; dataset {data.name} is tabular"
            if layer.type == "embedding" and (i != 0 or not (data.tokens or kind is None)):
                yield (
                    where,
                    (
                        "embedding must be the first layer and needs token ids (synthetic_sequence "
                        "with vocab_size)"
                    ),
                )
            flat = flat or layer.type in ("flatten", "dense")

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
    if evaluates and not (data.validation_split > 0 or data.evaluate_on_test):
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
