"""The training engine: `train(spec, emit, should_stop)`. Knows Keras; knows nothing of gRPC or
the store. Every step's loss and accuracy are emitted, at near-zero cost (see step_record)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from stepstream.kernel.events import (
    CheckpointEvent,
    EvalEvent,
    Event,
    LogEvent,
    ResultEvent,
    StepEvent,
)
from stepstream.kernel.failures import Failure
from stepstream.kernel.spec import JobSpec
from stepstream_service.engine import datasets, distribution, models
from stepstream_service.engine.datasets import Data, DataPaths
from stepstream_service.engine.model_cache import ModelCache, shape_key
from stepstream_service.engine.registry import LOSSES, METRICS, OPTIMIZERS, Labels, learning_rate
from stepstream_service.engine.step_record import STEP_COUNT, STEP_LOSSES, STEP_VALUES, StepRecorder
from stepstream_service.engine.streams import Stream
from stepstream_service.engine.tensorboard import FOLDER as BOARD_FOLDER
from stepstream_service.engine.tensorboard import Board
from stepstream_service.errors import TrainerError
from stepstream_service.store.artifacts import (
    CheckpointScan,
    checkpoint_name,
    record_checkpoint,
)

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]
ShouldStop = Callable[[], bool]

MAX_WINDOW = 100
WINDOW_SECONDS = 0.1  # also bounds how stale a streamed step can be
# Metrics where larger is better; everything else (loss, errors) is minimised.
_MAXIMISED = ("accuracy", "auc", "precision", "recall", "r2_score", "cosine_similarity")


@dataclass(frozen=True)
class ForkSource:
    """Where a fork starts: the checkpoints of the job it forks, fetched into `folder`'s
    checkpoints/ (as pull_checkpoint leaves them); `step` is the one to start from (the newest
    intact one when None)."""

    job: str
    folder: Path
    step: int | None = None


class ForkFailed(TrainerError):
    """A fork's source checkpoint is missing, or does not fit the fork's model or optimizer."""

    reason = "fork_failed"


@dataclass
class _Outcome:
    outcome: str = "succeeded"
    stop_reason: str = "completed"
    failure: Failure | None = None
    last_eval: dict[str, float] = field(default_factory=dict)


def train(
    spec: JobSpec,
    emit: Emit,
    should_stop: ShouldStop = lambda: False,
    *,
    workdir: Path | str,
    paths: DataPaths | None = None,
    resume: bool = False,
    resume_upto: int | None = None,
    job_id: str | None = None,
    handing_back: Callable[[], bool] = lambda: False,
    tensorboard: bool = True,
    start_from: ForkSource | None = None,
    final_checkpoint: bool = False,
    models: ModelCache | None = None,
    cluster: distribution.Cluster | None = None,
) -> ResultEvent:
    """Train `spec`, emitting events; return (and emit) the final ResultEvent.

    `workdir` receives checkpoints and the saved model. With `resume`, training continues
    from the latest checkpoint there, if any (none past step `resume_upto`). A run that fails
    while training (non-finite loss, timeout, out of memory) ends in a failed result; a
    dataset that cannot be had raises a `TrainerError`. `job_id` names the job in log lines
    (the spec's name otherwise). With `tensorboard`, the events also go to TensorBoard event
    files in `workdir`/tensorboard (see engine.tensorboard).
    When `should_stop` stops the run and `handing_back()` is true (its process is shutting
    down, not cancelling), a checkpoint is written first, so the next attempt loses no step.
    With `start_from` (a fork) and no checkpoint of its own to resume from, training starts
    from that job's checkpoint: its weights, optimizer state and step, with this spec's
    hyperparameters; one that does not fit raises ForkFailed. With `final_checkpoint`, a job
    that checkpoints (training.checkpoint_every) and succeeds also keeps a checkpoint of its
    last step, which no event announces: the state a fork of it starts from.
    With `models`, a model compiled for an earlier job of the same shape is trained again from
    this job's fresh start instead of building and tracing anew (see engine.model_cache).
    With `cluster`, this process is one rank of a job across workers (runtime.machines): every
    rank calls train alike, and the chief's (rank 0) resume or fork is every rank's start.
    """
    started = time.monotonic()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(spec.runtime.precision)
    run: _Run | None = None
    board = Board(workdir / BOARD_FOLDER, lambda: getattr(run, "model", None), job_id or spec.name)
    if tensorboard:
        emit = board.tee(emit)
    try:
        with _placement(spec, cluster):
            run = _Run(spec, emit, should_stop, workdir, paths or DataPaths(), started, job_id)
            run.handing_back = handing_back
            run.resume_upto = resume_upto
            run.fork, run.final_checkpoint = start_from, final_checkpoint
            run.models = models
            run.across = cluster is not None
            result = run.execute(resume)
        emit(result)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if tensorboard:
            board.close()  # whatever was written stays, whichever way the run ended
    return result


XLA_MIN_STEPS = 3000  # see _jit_compile
# Layers whose XLA code on the CPU beats TensorFlow's own kernels (measured; see _jit_compile).
_XLA_ON_CPU = (
    keras.layers.InputLayer,
    keras.layers.Dense,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Dropout,
    keras.layers.BatchNormalization,
    keras.layers.Activation,
)


def _placement(spec: JobSpec, cluster: distribution.Cluster | None = None):
    """A device scope only to keep a job off a visible GPU: every backend already places
    work on the GPU it can see (and on PyTorch a device scope breaks the gradients). A job on
    several devices runs inside its strategy's scope: the model, its optimizer, metrics and
    evaluation model are built there, with a copy of each variable on every device."""
    if cluster is not None:
        return distribution.multi_worker(cluster).scope()
    if spec.runtime.devices > 1:
        return distribution.strategy(spec.runtime.devices, spec.runtime.device).scope()
    if spec.runtime.device == "cpu":
        return keras.device("cpu:0")
    if spec.runtime.device == "gpu" and not gpu_available():
        raise NoGPU("the job asks for a GPU (runtime.device: gpu) but this worker has none")
    return contextlib.nullcontext()


def gpu_available() -> bool:
    return any(d.startswith("GPU") for d in devices())


def devices() -> list[str]:
    """The accelerators this process can see, as "GPU:0", "GPU:1", ..., after "CPU:0"."""
    backend = keras.config.backend()
    gpus = 0
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = len(tf.config.list_physical_devices("GPU"))
    elif backend == "jax":
        import jax

        gpus = sum(1 for d in jax.devices() if d.platform == "gpu")
    elif backend == "torch":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["CPU:0", *(f"GPU:{i}" for i in range(gpus))]


class NoGPU(RuntimeError):
    reason = "no_gpu"


def latest_checkpoint(workdir: Path | str) -> tuple[int, Path] | None:
    """(step, path) of the newest checkpoint in `workdir` that matches its sha256, if any."""
    return next(CheckpointScan(Path(workdir) / "checkpoints").intact(), None)


@dataclass
class _Start:
    """Variables' values as they were, each kept as one number where it is filled with one
    (an optimizer's fresh slots are zeros, Adagrad's its initial accumulator value)."""

    values: list

    @classmethod
    def of(cls, variables: list) -> _Start:
        values = []
        for v in variables:
            a = keras.ops.convert_to_numpy(v)
            values.append(a.flat[0] if a.size and (a == a.flat[0]).all() else a.copy())
        return cls(values)

    def restore(self, variables: list) -> None:
        for variable, value in zip(variables, self.values, strict=True):
            if np.ndim(value) == 0:
                value = np.full(variable.shape, value, dtype=np.asarray(value).dtype)
            variable.assign(value)


@dataclass
class _Compiled:
    """A compiled model and what its trace captured, as the model cache keeps it."""

    model: keras.Model
    recorders: list[StepRecorder]
    window: int
    optimizer_start: _Start
    eval_model: keras.Model | None = None
    jobs: int = 0  # the jobs it has trained
    steps_left: Any = None  # several devices: the steps its train function may still take

    @property
    def nbytes(self) -> int:
        variables = [*self.model.variables, *self.model.optimizer.variables]
        return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)

    def restart(self, fresh: keras.Model, schedule: Any) -> None:
        """This job's start on the kept program: the weights and seeds of `fresh` (built for
        this job, never traced), the optimizer as built, and this job's learning rate."""
        for variable, value in zip(self.model.variables, fresh.variables, strict=True):
            variable.assign(value)
        optimizer = self.model.optimizer
        self.optimizer_start.restore(optimizer.variables)
        if not callable(schedule):
            optimizer.learning_rate = float(schedule)


class _Run:
    def __init__(self, spec, emit, should_stop, workdir, paths, started, job_id=None):
        self.spec: JobSpec = spec
        self.emit: Emit = emit
        self.should_stop: ShouldStop = should_stop
        self.handing_back: Callable[[], bool] = lambda: False
        self.resume_upto: int | None = None  # see train()
        self.fork: ForkSource | None = None  # see train()
        self.final_checkpoint = False  # see train()
        self.models: ModelCache | None = None  # see train()
        self.across = False  # one rank of a job across workers (train's cluster)
        self.saved_step: int | None = None  # the step of the last checkpoint written
        self.workdir: Path = workdir
        self.paths: DataPaths = paths
        self.started: float = started
        self.deadline = started + spec.training.max_duration if spec.training.max_duration else None
        self.job_id = job_id or spec.name

    def log(self, message: str, *args) -> None:
        text = message % args if args else message
        log.info("job %s: %s", self.job_id, text)
        self.emit(LogEvent(text, time.time()))

    def warn(self, text: str) -> None:
        log.warning("job %s: %s", self.job_id, text)
        self.emit(LogEvent(text, time.time(), level="warning"))

    # ---------------------------------------------------------------- setup

    def execute(self, resume: bool) -> ResultEvent:
        spec = self.spec
        keras.utils.set_random_seed(spec.training.seed)
        data = datasets.load(spec, self.paths)
        n_train = data.train_rows
        self.log(
            "loaded %s from %s: %d training, %d validation, %d test examples%s",
            spec.dataset.name,
            data.source,
            n_train,
            data.val_rows,
            data.test_rows,
            ", streamed" if isinstance(data, Stream) else "",
        )
        self.data = data
        self.steps_per_epoch = math.ceil(n_train / spec.training.batch_size)
        t = spec.training
        self.total = t.steps if t.steps is not None else t.epochs * self.steps_per_epoch

        model = models.build(spec, data, self.paths)
        self.labels = Labels(
            format=spec.label_format,
            units=data.output_units,
            logits=spec.loss.logits,
            threshold=0.5 if spec.output_activation == "sigmoid" else 0.0,
        )
        self.schedule = learning_rate(spec.optimizer)
        key = self._shape_key(model, data) if self.models is not None else None
        kept = self.models.take(key) if self.models is not None and key is not None else None
        if kept is None:
            kept = self._compile(model, data)
        else:
            kept.restart(model, self.schedule)
            if kept.eval_model is not None:
                self.eval_model = kept.eval_model
        self.model, self.recorders, self.window = kept.model, kept.recorders, kept.window
        self.steps_left = kept.steps_left
        if spec.runtime.devices > 1:
            import tensorflow as tf

            strategy = tf.distribute.get_strategy()
            on = distribution.strategy_devices(strategy)
            n = strategy.num_replicas_in_sync
            self.log(
                "data-parallel on %d devices (%s%s): global batch %d, %d per device",
                n,
                ", ".join(on),
                f" on each of {spec.runtime.machines} workers" if self.across else "",
                spec.training.batch_size,
                spec.training.batch_size // n,
            )
        self.log(
            "built %s model: %s parameters; %d steps, %d per device call%s%s",
            spec.model.architecture,
            f"{self.model.count_params():,}",
            self.total,
            self.window,
            ", compiled with XLA" if self.model.jit_compile is True else "",
            "; its traced program reused from an earlier job" if kept.jobs else "",
        )
        model = self.model
        start = self._resume(model) if resume else 0
        if start == 0 and self.fork is not None:
            start = self._fork(model)
        if self.across:
            import tensorflow as tf

            start = distribution.from_chief(
                tf.distribute.get_strategy(), [*model.variables, *model.optimizer.variables], start
            )
        for r in self.recorders:
            r.count.assign(0)
        result = self._fit(start)
        # Only a run that ended by itself hands its model on; one that raised is dropped.
        if self.models is not None and key is not None:
            kept.jobs += 1
            kept.eval_model = getattr(self, "eval_model", None)
            self.models.give_back(key, kept, kept.nbytes)
        return result

    def _compile(self, model: keras.Model, data: Data) -> _Compiled:
        spec = self.spec
        loss = LOSSES.get(spec.loss.name)(spec.loss)
        window = self._window(model, data)
        recorder = StepRecorder(loss, self._step_value(data), window, self.labels.threshold)
        metrics: list | dict = [recorder]
        recorders = [recorder]
        if getattr(data, "named_outputs", None) is not None:  # a Stream has none
            # Several outputs: the one loss on each; the first output's recorder streams the
            # step value, and every output's batch loss is summed into the step loss.
            recorders += [
                StepRecorder(loss, "none", window, suffix=f"_{i}")
                for i in range(1, len(model.output_names))
            ]
            metrics = {n: [r] for n, r in zip(model.output_names, recorders, strict=True)}
        model.compile(
            optimizer=OPTIMIZERS.get(spec.optimizer.name)(spec.optimizer),
            loss=loss,
            metrics=metrics,
            steps_per_execution=window,
            jit_compile=self._jit_compile(model),
        )
        # Built now, not at the first step: its state as it starts is what a reuse restores.
        model.optimizer.build(model.trainable_variables)
        # Read only where a cache may take the model: it copies every optimizer variable.
        start = _Start.of(model.optimizer.variables) if self.models is not None else _Start([])
        compiled = _Compiled(model, recorders, window, start)
        if spec.runtime.devices > 1:
            import tensorflow as tf

            strategy = tf.distribute.get_strategy()
            model.train_function, compiled.steps_left = distribution.train_function(
                model, window, strategy
            )
            if distribution.across_workers(strategy):
                distribution.build_locally(model, strategy)
        return compiled

    def _shape_key(self, model: keras.Model, data: Data) -> str | None:
        """What the traced training program of this job depends on, beyond its variables'
        values (see engine.model_cache); None for a model that cannot say (no config)."""
        spec = self.spec
        try:
            config = _unnamed(model)
        except NotImplementedError:
            return None
        optimizer = spec.optimizer.model_dump(mode="json")
        if spec.optimizer.schedule is None:  # a variable, assigned at each reuse
            optimizer.pop("learning_rate")
        t = spec.training
        return shape_key(
            {
                "backend": keras.config.backend(),
                "model": config,
                "loss": spec.loss.model_dump(mode="json"),
                "optimizer": optimizer,
                "metrics": list(spec.metrics),
                "labels": dataclasses.asdict(self.labels),
                "step_value": self._step_value(data),
                "outputs": getattr(data, "named_outputs", None) is not None,
                "runtime": spec.runtime.model_dump(mode="json"),
                # A kept model trains under the strategy it was built in: the same devices.
                "placement": self._placement_devices(),
                "jit_compile": self._jit_compile(model),
                # They set the steps per device call (see _window).
                "window": [t.batch_size, t.eval_every, t.checkpoint_every],
            }
        )

    def _placement_devices(self) -> list[str] | None:
        if self.spec.runtime.devices == 1:
            return None
        import tensorflow as tf

        return distribution.strategy_devices(tf.distribute.get_strategy())

    def _resume(self, model: keras.Model) -> int:
        """Load the newest intact checkpoint; its step (0 when there is none). Each one passed
        over is said, with why, in the same event as the step resumed from."""
        scan = CheckpointScan(self.workdir / "checkpoints", self.resume_upto)
        if not scan.existed:
            return 0
        model.optimizer.build(model.trainable_variables)
        # A load that fails part-way must not leave a half-loaded model to start from 0 with.
        variables = [*model.weights, *model.optimizer.variables]
        fresh = [keras.ops.convert_to_numpy(v) for v in variables]
        for step, path in scan.intact():
            try:
                model.load_weights(path)
            except Exception as exc:  # whole by its checksum, yet not a model this job can use
                log.warning("job %s: checkpoint %s not loaded", self.job_id, path, exc_info=True)
                scan.passed_over(step, f"could not be loaded ({type(exc).__name__})")
                continue
            if scan.problems:
                self.warn(scan.resumed_from(step))
            else:
                self.log(scan.resumed_from(step))
            return step
        for variable, value in zip(variables, fresh, strict=True):
            variable.assign(value)
        self.warn(scan.resumed_from(None))
        return 0

    def _fork(self, model: keras.Model) -> int:
        """Start from the forked job's checkpoint: its weights, its optimizer's state and its
        step. This spec's learning rate then replaces the one the state brought back; a
        schedule is no variable, and takes up from the restored step by itself."""
        source = self.fork
        assert source is not None
        scan = CheckpointScan(source.folder / "checkpoints")
        model.optimizer.build(model.trainable_variables)
        for step, path in scan.intact():
            if source.step is not None and step != source.step:
                continue
            try:
                model.load_weights(path)
            except Exception as exc:  # whole by its checksum: another model's weights
                log.warning("job %s: checkpoint %s not loaded", self.job_id, path, exc_info=True)
                raise ForkFailed(
                    f"the checkpoint of {source.job} at step {step} does not fit this job's "
                    f"model ({type(exc).__name__}); a fork keeps the model's architecture and "
                    "layer sizes"
                ) from None
            # Keras skips, with only a warning, optimizer state that does not fit its variables.
            if int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0:
                raise ForkFailed(
                    f"the optimizer state in the checkpoint of {source.job} at step {step} "
                    f"does not fit this job's optimizer ({self.spec.optimizer.name}); a fork "
                    "keeps the optimizer"
                )
            said = f"forked from {source.job} at step {step} (checkpoint {path.name})"
            if not callable(self.schedule):
                restored = _rate(model.optimizer)
                model.optimizer.learning_rate = float(self.schedule)
                # Read back from the optimizer: the rate it trains with, not the spec's.
                said += f"; learning rate {_rate(model.optimizer):g} (it was {restored:g})"
            if scan.problems:
                self.warn(f"{'; '.join(scan.problems)}; {said}")
            else:
                self.log(said)
            return step
        at = f" at step {source.step}" if source.step is not None else ""
        why = f" ({'; '.join(scan.problems)})" if scan.problems else ""
        raise ForkFailed(f"{source.job} has no intact checkpoint{at} to start from{why}")

    def _step_value(self, data: Data) -> str:
        if data.task == "regression":
            return "mae"
        if self.labels.format == "sparse":
            return "sparse_accuracy"
        return "binary_accuracy" if data.output_units == 1 else "argmax_accuracy"

    def _jit_compile(self, model: keras.Model) -> bool | str:
        """XLA or not. Keras's 'auto' leaves it off on a machine without a GPU; there the
        service turns it on for models made only of the _XLA_ON_CPU layers, which it speeds up
        (the seed MLP 1.36x), and leaves it off for convolutions (a CNN ran at 0.38x) and
        recurrent layers (0.93x). See docs/benchmarks.md. A short job gets no XLA: compiling
        costs about a second, more than it saves over fewer than XLA_MIN_STEPS steps."""
        choice = self.spec.runtime.jit_compile
        if self.spec.runtime.devices > 1:
            # XLA cannot compile a step whose variables live on several devices (the spec
            # refuses True); Keras's own "auto" would try it on GPUs.
            return False
        if choice != "auto" or keras.config.backend() != "tensorflow":
            return choice
        if self.spec.runtime.device != "cpu" and gpu_available():
            return "auto"
        if self.total < XLA_MIN_STEPS:
            return False
        return all(isinstance(layer, _XLA_ON_CPU) for layer in model.layers)

    def _window(self, model: keras.Model, data: Data) -> int:
        """Steps per device call: about WINDOW_SECONDS of training, so per-step values arrive
        and stop requests are seen several times a second, dividing the evaluation and
        checkpoint intervals so those land on exact steps."""
        choice = self.spec.runtime.steps_per_execution
        if keras.config.backend() == "torch":
            return 1  # Keras runs PyTorch eagerly, one step per call, and refuses more
        if choice == "auto":
            batch = data.sample(self.spec.training.batch_size)
            # Compiled, not eager: eager recurrent layers are far slower than their graphs.
            model.predict_on_batch(batch)
            t0 = time.perf_counter()
            for _ in range(3):
                model.predict_on_batch(batch)
            forward = (time.perf_counter() - t0) / 3
            step_estimate = 3 * forward  # the backward pass costs about twice the forward
            choice = int(max(1, min(MAX_WINDOW, WINDOW_SECONDS / max(step_estimate, 1e-6))))
        t = self.spec.training
        for interval in (t.eval_every, t.checkpoint_every):
            if interval:
                choice = max(d for d in range(1, min(choice, interval) + 1) if interval % d == 0)
        return choice

    # ---------------------------------------------------------------- training

    def _dataset(self, start: int):
        import tensorflow as tf

        t, data = self.spec.training, self.data
        if isinstance(data, Stream):  # files read batch by batch, through a bounded buffer
            return data.batches(t.batch_size, t.shuffle, t.seed, start, self.total)
        # Arrays, or dicts of them keyed by input and output name (named data).
        x, y = tf.nest.map_structure(tf.constant, (data.x_train, data.y_train))
        order = tf.data.Dataset.range(data.train_rows)
        if t.shuffle:
            order = order.shuffle(data.train_rows, seed=t.seed, reshuffle_each_iteration=True)
        batches = order.batch(t.batch_size).repeat().skip(start).take(self.total - start)
        # One gather per batch copies each row once. A sequential map: on a small machine
        # parallel map threads compete with the training step for the same cores.
        rows = lambda i: tf.nest.map_structure(lambda a: tf.gather(a, i), (x, y))  # noqa: E731
        return batches.map(rows).prefetch(tf.data.AUTOTUNE)

    def _fit(self, start: int) -> ResultEvent:
        outcome = _Outcome()
        stream = _StepStream(self, start, outcome)
        if start < self.total:
            if self.steps_left is not None:
                self.steps_left.assign(self.total - start)
            try:
                self.model.fit(
                    self._dataset(start), epochs=1, verbose=0, shuffle=False, callbacks=[stream]
                )
            except Exception as exc:
                if not _out_of_memory(exc):
                    raise
                outcome.outcome, outcome.stop_reason = "failed", "out_of_memory"
                outcome.failure = Failure(
                    "out_of_memory",
                    f"out of memory at step {stream.step + 1} (batch_size "
                    f"{self.spec.training.batch_size}); use a smaller batch or model",
                    stream.step + 1,
                )
        steps = stream.step
        if outcome.outcome != "succeeded":
            return self._result(outcome, steps)
        every = self.spec.training.checkpoint_every
        if self.final_checkpoint and every and steps > start and self.saved_step != steps:
            self._save_checkpoint(steps)
        test_metrics = {}
        if self.data.has_test:
            test_metrics = self._evaluate(*self._split("test"))
            self.log("test: %s", _fmt(test_metrics))
        model_path = self.workdir / "model.keras"
        _sync(self.model)
        _atomic_save(keras.Model(self.model.inputs, self.model.outputs), model_path)
        return self._result(outcome, steps, test_metrics, str(model_path))

    def _result(self, outcome, steps, test_metrics=None, model_path=None) -> ResultEvent:
        return ResultEvent(
            outcome=outcome.outcome,
            steps=steps,
            stop_reason=outcome.stop_reason,
            test_metrics=test_metrics or {},
            final_eval=outcome.last_eval,
            model_path=model_path,
            failure=outcome.failure,
            duration_seconds=time.monotonic() - self.started,
            time=time.time(),
        )

    # ---------------------------------------------------------------- evaluation, checkpoints

    def _split(self, name: str) -> tuple:
        """A split as _evaluate takes it: arrays, or a streamed dataset's batches."""
        if isinstance(self.data, Stream):
            rows = self.data.val_rows if name == "validation" else self.data.test_rows
            return self.data.split(name, self._eval_batch(rows)), None
        if name == "test":
            return self.data.x_test, self.data.y_test
        return self.data.eval_split[1:]

    def _evaluate(self, x, y) -> dict[str, float]:
        if not hasattr(self, "eval_model"):
            # A second model over the same layers: its metrics are the ones the user asked
            # for, and evaluating it leaves the training model's step record untouched.
            self.eval_model = keras.Model(self.model.inputs, self.model.outputs)
            asked = lambda: [METRICS.get(m)(self.labels) for m in self.spec.metrics]  # noqa: E731
            several = getattr(self.data, "named_outputs", None) is not None
            self.eval_model.compile(
                loss=LOSSES.get(self.spec.loss.name)(self.spec.loss),
                # Several outputs: each gets the metrics, reported as <output>_<metric>.
                metrics={n: asked() for n in self.eval_model.output_names} if several else asked(),
            )
            if self.across:
                import tensorflow as tf

                strategy = tf.distribute.get_strategy()
                self.eval_model.test_function = distribution.test_function(
                    self.eval_model, strategy
                )
                distribution.build_locally(self.eval_model, strategy)
        _sync(self.model)
        if y is None:  # a tf.data dataset of batches
            values = self.eval_model.evaluate(x, verbose=0, return_dict=True)
        else:
            rows = len(keras.tree.flatten(x)[0])  # arrays, or dicts or lists of them
            values = self.eval_model.evaluate(
                x, y, batch_size=self._eval_batch(rows), verbose=0, return_dict=True
            )
        return {k: float(v) for k, v in values.items()}

    def _eval_batch(self, rows: int | None) -> int:
        batch = max(self.spec.training.batch_size, 256)
        n = self.spec.runtime.devices
        if n == 1:
            return batch
        # Under a strategy Keras builds the model from the first batch's shares, averaged
        # over the replicas, which fails unless they are of one size: a first batch that
        # splits evenly (later ones may not; the replicas take them as they come).
        batch -= batch % n
        if rows is not None and n <= rows < batch:
            batch = rows - rows % n
        return batch

    def checkpoint(self, step: int) -> None:
        path = self._save_checkpoint(step)
        self.emit(CheckpointEvent(step, str(path), time.time()))

    def _save_checkpoint(self, step: int) -> Path:
        folder = self.workdir / "checkpoints"
        folder.mkdir(exist_ok=True)
        _sync(self.model)
        _atomic_save(self.model, folder / checkpoint_name(step))
        self.saved_step = step
        # Its sha256 recorded, and older ones pruned: a resume checks each before loading.
        return record_checkpoint(folder, step)

    def learning_rates(self, first: int, count: int) -> np.ndarray:
        """The rate used by steps first..first+count-1 (1-based), in one vectorised call."""
        if not callable(self.schedule):
            return np.full(count, float(self.schedule))
        iterations = np.arange(first - 1, first - 1 + count, dtype="float32")
        return np.asarray(keras.ops.convert_to_numpy(self.schedule(iterations)), dtype=float)


class _StepStream(keras.callbacks.Callback):
    """Once per device call: turn the recorded window into step events, then act on stop
    requests, the deadline, evaluations, checkpoints and stop rules."""

    def __init__(self, run: _Run, start: int, outcome: _Outcome):
        super().__init__()
        self.run, self.outcome = run, outcome
        self.start = self.step = start
        self.seen = 0
        self.t_last = time.time()
        t = run.spec.training
        self.best: float | None = None
        self.bad_evals = 0
        self.rule = t.early_stopping
        self.target = t.target

    def on_train_batch_end(self, batch, logs=None):
        run = self.run
        count = int(logs[STEP_COUNT])
        new = count - self.seen
        if new <= 0:
            return
        losses, values = logs[STEP_LOSSES], logs[STEP_VALUES]
        for r in run.recorders[1:]:  # a model's later outputs: the step loss is the total
            losses = losses + logs[f"{STEP_LOSSES}{r.suffix}"]
        now = time.time()
        elapsed = max(now - self.t_last, 1e-9)
        sps = new / elapsed
        eps = sps * run.spec.training.batch_size
        first = self.start + self.seen + 1
        rates = run.learning_rates(first, new)
        regression = run.data.task == "regression"
        for i in range(new):
            slot = (self.seen + i) % run.window
            loss, value = float(losses[slot]), float(values[slot])
            step = first + i
            run.emit(
                StepEvent(
                    step=step,
                    loss=loss,
                    accuracy=None if regression else value,
                    mae=value if regression else None,
                    learning_rate=float(rates[i]),
                    steps_per_second=sps,
                    examples_per_second=eps,
                    time=self.t_last + elapsed * (i + 1) / new,
                )
            )
            if not math.isfinite(loss):
                self.step = step
                self._stop(
                    "failed",
                    "non_finite_loss",
                    Failure(
                        "non_finite_loss",
                        f"loss became {loss} at step {step}; lower the learning rate or check "
                        "the data",
                        step,
                    ),
                )
                return
        self.seen = count
        self.step = self.start + count
        self._after_window()
        # Time spent evaluating or checkpointing is not training time.
        self.t_last = time.time()

    def _after_window(self) -> None:
        run, step, t = self.run, self.step, self.run.spec.training
        stop = run.should_stop()
        # Its process is shutting down, not cancelling: the next attempt resumes from here.
        hand = stop and run.handing_back()
        late = run.deadline is not None and time.monotonic() > run.deadline
        if run.across:  # every rank stops at the same step, or none does
            import tensorflow as tf

            stop, hand, late = distribution.agreed(tf.distribute.get_strategy(), [stop, hand, late])
        if hand:
            if step > self.start:
                run.checkpoint(step)
            self._stop("cancelled", "handed_back")
            return
        if stop:
            self._stop("cancelled", "cancelled")
            return
        if late:
            self._stop(
                "failed",
                "max_duration_exceeded",
                Failure(
                    "max_duration_exceeded",
                    f"ran past training.max_duration ({t.max_duration:g} s) at step {step}",
                    step,
                ),
            )
            return
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < run.total:
            run.checkpoint(step)
        if t.eval_every and step % t.eval_every == 0:
            self._evaluate(step)

    def _evaluate(self, step: int) -> None:
        run = self.run
        if run.data.eval_split is None:
            return
        split = run.data.eval_split[0]
        values = run._evaluate(*run._split(split))
        self.outcome.last_eval = values
        run.emit(EvalEvent(step, split, values, time.time()))
        if self.target is not None:
            name = self.target.metric.removeprefix("val_")
            if _better_or_equal(values[name], self.target.value, name, self.target.mode):
                self.run.log(
                    "target %s %g reached at step %d", self.target.metric, values[name], step
                )
                self._stop("succeeded", "target_reached")
                return
        if self.rule is not None:
            name = self.rule.monitor.removeprefix("val_")
            value = values[name]
            sign = 1.0 if _maximised(name, self.rule.mode) else -1.0
            if self.best is None or sign * (value - self.best) > self.rule.min_delta:
                self.best, self.bad_evals = value, 0
            else:
                self.bad_evals += 1
                if self.bad_evals >= self.rule.patience:
                    self.run.log("early stopping at step %d: %s stopped improving", step, name)
                    self._stop("succeeded", "early_stopping")

    def _stop(self, outcome: str, reason: str, failure: Failure | None = None) -> None:
        self.outcome.outcome, self.outcome.stop_reason = outcome, reason
        self.outcome.failure = failure
        self.model.stop_training = True


def _unnamed(model: keras.Model) -> Any:
    """The model's config with its own and its layers' names replaced by their positions:
    Keras numbers auto-named layers process-wide (dense, dense_1, ...), so two builds of one
    spec differ in names only."""
    names = {model.name: "#model", **{layer.name: f"#{i}" for i, layer in enumerate(model.layers)}}

    def rename(node: Any) -> Any:
        if isinstance(node, str):
            return names.get(node, node)
        if isinstance(node, dict):
            return {k: rename(v) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [rename(v) for v in node]
        return node

    return rename(model.get_config())


def _maximised(name: str, mode: str) -> bool:
    return mode == "max" or (mode == "auto" and name.endswith(_MAXIMISED))


def _better_or_equal(value: float, target: float, name: str, mode: str) -> bool:
    return value >= target if _maximised(name, mode) else value <= target


def _rate(optimizer: keras.optimizers.Optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def _sync(model: keras.Model) -> None:
    # The JAX backend keeps training state outside the variables until asked.
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def _atomic_save(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(path.stem + ".partial.keras")
    model.save(tmp)
    os.replace(tmp, path)


def _out_of_memory(exc: Exception) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ in (
        "ResourceExhaustedError",
        "OutOfMemoryError",
    )


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())
